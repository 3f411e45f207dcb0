"""Lock fallback tiers: one holder per name across Redis and the fallback, fences that keep rising.

Real redis-server processes (killed and restarted) and a real PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

import mcp_redis
from mcp_redis import LockNotOwned
from mcp_redis.metrics import METRICS
from mcp_redis.postgres import get_postgres
from mcp_redis.resilience import BreakerState
from mcp_redis.testing import free_port, wait_for
from mcp_redis.testing.faultproxy import FaultProxy
from tests import workers_locks

SPAWN = multiprocessing.get_context("spawn")


def _spawn(target: Any, *args: Any) -> Any:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _stop(proc: Any) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    # Not join(): it waits on a pipe that a forked child of `proc` still holds open (for its whole
    # timeout); exitcode reaps the process itself.
    wait_for(lambda: proc.exitcode is not None, 10, what="the killed process to be reaped")


def _fallback_settings(redis_url: str, database_url: str, fallback: str = "postgres") -> Dict[str, Any]:
    # One try per call and a breaker that never opens: each acquire goes to
    # Redis first, so which tier granted it follows Redis's state alone.
    return {"redis_url": redis_url, "database_url": database_url, "lock_fallback": fallback,
            "retry_attempts": 1, "breaker_failure_threshold": 1_000_000}


# -- item 2: one holder per name across both tiers ---------------------------------------------
def test_postgres_fallback_holder_excludes_redis_acquirers_after_recovery(redis_factory: Any,
                                                                          database_url: str) -> None:
    server = redis_factory()
    mcp_redis.configure(**_fallback_settings(server.url, database_url))
    server.kill()
    fallback = mcp_redis.lock("recovered", timeout=0.5)
    assert fallback.acquire(blocking_timeout=10) and fallback.backend == "postgres"
    server.start()  # back, and empty
    # A process that never saw the outage, and this one, both reach Redis now.
    ready = SPAWN.Queue()
    fresh = _spawn(workers_locks.try_lock, _fallback_settings(server.url, database_url), "recovered", 0.5, ready)
    try:
        assert ready.get(timeout=60) == (False, None)
    finally:
        _stop(fresh)
    assert mcp_redis.lock("recovered", timeout=0.5).acquire(blocking_timeout=0.3) is False
    fallback.release()
    after = mcp_redis.lock("recovered", timeout=0.5)
    assert after.acquire(blocking_timeout=10) and after.backend == "redis"
    assert after.fencing_token is not None and fallback.fencing_token is not None
    assert after.fencing_token > fallback.fencing_token
    after.release()
    assert METRICS.counter("lock_gate_total", outcome="fallback_held") >= 1


def test_fallback_grant_waits_out_a_redis_lease_granted_before_the_outage(redis_factory: Any,
                                                                          database_url: str) -> None:
    server = redis_factory()
    mcp_redis.configure(**_fallback_settings(server.url, database_url))
    before = mcp_redis.lock("outage-start", timeout=0.5)
    assert before.acquire(blocking_timeout=0) and before.backend == "redis"
    server.kill()  # `before` may still be inside its section until its lease ends
    assert mcp_redis.lock("outage-start", timeout=0.5).acquire(blocking_timeout=0) is False
    during = mcp_redis.lock("outage-start", timeout=0.5)
    assert during.acquire(blocking_timeout=10) and during.backend == "postgres"
    during.release()


def test_partial_outage_fallback_holder_excludes_processes_that_reach_redis(redis_factory: Any,
                                                                            database_url: str) -> None:
    server = redis_factory()
    settings = _fallback_settings(server.url, database_url)
    mcp_redis.configure(**settings)
    held = mcp_redis.agent_lock("partial", timeout=0.5)  # renewed while held, through Redis
    assert held.acquire() and held.backend == "redis"
    # Another process whose Redis is unreachable (its own URL: a closed port) falls back.
    cut_off = dict(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    ready = SPAWN.Queue()
    other = _spawn(workers_locks.hold_forever, cut_off, "partial", 0.5, ready)
    try:
        ready.get(timeout=60)  # the fallback granted it ...
        assert held.lost_event.wait(5)  # ... only once our renewals were refused
        with pytest.raises(LockNotOwned):
            held.release()
        assert mcp_redis.agent_lock("partial", timeout=0.5).acquire(blocking_timeout=0.3) is False
    finally:
        _stop(other)  # its PostgreSQL session ends, and its lock with it
    with mcp_redis.agent_lock("partial", timeout=0.5, blocking_timeout=10) as again:
        assert again.backend == "redis"


def test_a_holder_that_reaches_redis_but_not_postgres_is_lost_before_a_fallback_holder_enters(
        redis_factory: Any, database_url: str) -> None:
    """A partition: `a` reaches Redis, not PostgreSQL; `b` reaches PostgreSQL, not Redis. Once
    the gate has expired, `a`'s renewals cannot ask PostgreSQL: they must fail with the lease as
    it was (a lease grown before the refusal was grown again by every retry, for ever, and `b`'s
    fallback grant entered beside `a`)."""
    server = redis_factory()
    pg = urlsplit(database_url)
    with FaultProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        through_proxy = urlunsplit(pg._replace(netloc=f"{pg.username or 'postgres'}@127.0.0.1:{proxy.port}"))
        a = mcp_redis.Client(**_fallback_settings(server.url, through_proxy), postgres_timeout=2)
        b = mcp_redis.Client(**_fallback_settings(f"redis://127.0.0.1:{free_port()}/0", database_url),
                             postgres_timeout=2)
        try:
            held = mcp_redis.agent_lock("partition", timeout=1.0, client=a)
            assert held.acquire() and held.backend == "redis"
            proxy.stop()  # `a` can no longer reach PostgreSQL
            other = mcp_redis.agent_lock("partition", timeout=1.0, client=b)
            assert other.acquire(blocking_timeout=20) and other.backend == "postgres"
            assert not redis.Redis.from_url(server.url).exists(held.key)  # `a`'s lease had ended
            assert held.lost_event.wait(5)  # and `a` is told
            other.release()
        finally:
            a.close()
            b.close()


def test_local_fallback_excludes_other_processes_on_the_same_host(tmp_path: Any) -> None:
    settings = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "lock_fallback": "local",
                "retry_attempts": 1, "lock_dir": str(tmp_path / "locks")}
    mcp_redis.configure(**settings)
    ready = SPAWN.Queue()
    other = _spawn(workers_locks.hold_forever, settings, "same-host", 5.0, ready)
    try:
        ready.get(timeout=60)
        assert mcp_redis.agent_lock("same-host", blocking_timeout=0.2).acquire() is False
    finally:
        _stop(other)
    with mcp_redis.agent_lock("same-host", blocking_timeout=5) as held:
        assert held.backend == "local"


# -- item 3: fencing tokens rise across backends and episodes -----------------------------------
@pytest.mark.parametrize("fallback", ["postgres", "local"])
def test_fencing_tokens_rise_across_alternating_fallback_episodes(redis_factory: Any, database_url: str,
                                                                  fallback: str) -> None:
    server = redis_factory()
    mcp_redis.configure(**_fallback_settings(server.url, database_url, fallback))
    seen: List[Tuple[str, int]] = []
    for _ in range(2):
        for redis_up in (False, True):
            if redis_up:
                server.start()
            else:
                server.kill()
            held = mcp_redis.lock("episodes", timeout=0.3)
            assert held.acquire(blocking_timeout=10)
            seen.append((held.backend or "?", held.fencing_token or 0))
            held.release()
    assert [backend for backend, _ in seen] == [fallback, "redis"] * 2
    tokens = [token for _, token in seen]
    assert all(a < b for a, b in zip(tokens, tokens[1:])), seen


# -- item 6: a forked child does not keep a crashed parent's file lock ------------------------
@pytest.mark.long
def test_forked_child_does_not_keep_a_killed_parents_file_lock(tmp_path: Any) -> None:
    lock_dir = str(tmp_path / "locks")
    mcp_redis.configure(lock_dir=lock_dir)
    ready = SPAWN.Queue()
    parent = _spawn(workers_locks.hold_then_fork, {"lock_dir": lock_dir}, "forked-parent", ready)
    _, child = ready.get(timeout=60)
    try:
        assert mcp_redis.agent_lock("forked-parent", blocking_timeout=0).acquire() is False
        _stop(parent)  # SIGKILL: its child lives on
        os.kill(child, 0)  # still alive
        with mcp_redis.agent_lock("forked-parent", blocking_timeout=0) as held:
            assert held.backend == "local"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- item 7: PostgreSQL lock waits are contention, not failure ---------------------------------
@pytest.mark.long
def test_postgres_lock_waits_outlast_postgres_timeout_and_never_open_the_breaker(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url, locks="postgres", postgres_timeout=1)
    holder = mcp_redis.lock("pg-wait", thread_local=False)
    assert holder.acquire()
    forever: List[bool] = []

    def wait_forever() -> None:  # blocking_timeout None (the default of mcp_redis.lock)
        with mcp_redis.lock("pg-wait") as held:
            forever.append(held.backend == "postgres")

    patient = threading.Thread(target=wait_forever)
    patient.start()
    releaser = threading.Timer(3.0, holder.release)  # holds three postgres_timeouts
    releaser.start()
    try:
        waiter = mcp_redis.lock("pg-wait")
        assert waiter.acquire(blocking_timeout=6) and waiter.backend == "postgres"
        waiter.release()
        patient.join(30)
        assert forever == [True]
    finally:
        releaser.join()
    assert waiter.acquire(blocking_timeout=0)
    # Five waiters each give up after 1.5 s on a held lock: contention, not a failure.
    outcomes: List[Any] = []

    def wait() -> None:
        try:
            outcomes.append(mcp_redis.lock("pg-wait").acquire(blocking_timeout=1.5))
        except Exception as exc:  # pragma: no cover - the failure this test guards against
            outcomes.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    waiter.release()
    assert outcomes == [False] * 5
    assert get_postgres().policy.breaker.state is BreakerState.CLOSED
    store = mcp_redis.SessionStore()
    store.bind("pg-wait-session", "agent-1")
    assert store.get("pg-wait-session") == "agent-1"


# -- the outage run: mutual exclusion and fences across a Redis outage and recovery ------------
@pytest.mark.slow
@pytest.mark.long
def test_four_processes_by_four_threads_lose_no_update_across_a_redis_outage(redis_factory: Any, database_url: str,
                                                                             tmp_path: Any) -> None:
    server = redis_factory()
    counter = str(tmp_path / "counter")
    settings = _fallback_settings(server.url, database_url)
    processes, threads, sections = 4, 4, 320
    total = processes * threads * sections
    results = SPAWN.Queue()
    procs = [_spawn(workers_locks.outage_worker, settings, "outage", threads, sections, 1.0, counter, results)
             for _ in range(processes)]

    def count() -> int:
        with open(counter) as f:
            return int(f.read() or 0)

    try:
        wait_for(lambda: count() >= total // 4, timeout=120, what="a quarter of the sections, through Redis")
        server.stop()
        down_at = count()
        wait_for(lambda: count() >= down_at + total // 8, timeout=120, what="sections through the fallback")
        server.start()  # empty: the lock, its gate and its fence counter are gone
        seen: List[Tuple[int, int, str]] = []
        tallies: Dict[str, int] = {}
        for _ in procs:
            part, errors = results.get(timeout=240)
            seen += part
            for k, v in errors.items():
                tallies[k] = tallies.get(k, 0) + v
    finally:
        for p in procs:
            _stop(p)
    print("errors:", tallies, "backends:", {b: sum(1 for s in seen if s[2] == b) for b in ("redis", "postgres")})
    assert count() == total
    assert sorted(c for c, _, _ in seen) == list(range(total))  # each section read the last one's write
    in_order = [fence for _, fence, _ in sorted(seen)]
    assert all(a < b for a, b in zip(in_order, in_order[1:]))
    backends = [backend for _, _, backend in sorted(seen)]
    assert backends[0] == "redis" and "postgres" in backends and backends[-1] == "redis"


def test_redis_grant_fails_closed_when_postgres_cannot_rule_out_a_fallback_hold(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, lock_fallback="postgres", retry_attempts=1,
                        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none?connect_timeout=1")
    probe = mcp_redis.lock("unconfirmed", timeout=5)
    with pytest.raises(mcp_redis.BackendUnavailable):
        probe.acquire(blocking_timeout=0)
    assert not redis.Redis.from_url(redis_url).exists(probe.key)  # the Redis grant was given back


def test_postgres_wait_whose_timeout_fires_as_the_lock_is_granted_keeps_it() -> None:
    """PostgreSQL raises lock_timeout *and* keeps a session lock granted at that instant.

    The race cannot be produced on demand with a real server, so a scripted
    cursor plays it: the wait must count the lock as taken (its holder later
    releases it), never hand the session back to the pool still holding it.
    """
    import psycopg2.errors

    from mcp_redis.locks.postgres import _wait_advisory

    class Cursor:
        def __init__(self) -> None:
            self.statements: List[str] = []
            self.row: Tuple[Any, ...] = ()

        def execute(self, sql: str, params: Any = ()) -> None:
            self.statements.append(sql)
            if "pg_try_advisory_lock" in sql:
                self.row = (False,)
            elif sql.startswith("SELECT pg_advisory_lock"):
                raise psycopg2.errors.LockNotAvailable("canceling statement due to lock timeout")
            elif "FROM pg_locks" in sql:
                self.row = (1,)  # ... but the lock was granted as the timeout fired
            else:
                self.row = ("",)

        def fetchone(self) -> Tuple[Any, ...]:
            return self.row

    cursor = Cursor()
    assert _wait_advisory(cursor, 42, time.monotonic() + 1.0, 0.5) is True
    assert cursor.statements[-1] == "RESET lock_timeout"
