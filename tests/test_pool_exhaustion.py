"""Pool exhaustion: more threads than connections wait, then get a clear error.

With `max_connections` (Redis) or `postgres_max_connections` (PostgreSQL)
connections all busy, a further caller waits up to `pool_timeout` per
attempt and then gets `BackendUnavailable` — never a crash, never a hang, and
the pool is whole again (nothing in use) once the holders finish.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

import mcp_redis
from mcp_redis.config import settings
from mcp_redis.connections import get_redis
from mcp_redis.errors import BackendUnavailable
from mcp_redis.testing import wait_for

SLACK = 1.0
POOL = dict(max_connections=2, pool_timeout=0.5, socket_timeout=5.0)


def exhaustion_budget() -> float:
    """Longest a caller may wait for a connection: every retry waits pool_timeout."""
    s = settings()
    return s.retry_attempts * (s.pool_timeout + s.retry_max_backoff) + SLACK


class Holders:
    """`n` threads each holding one pooled connection until released."""

    def __init__(self, n: int, hold: Callable[[threading.Event], None]) -> None:
        self.release = threading.Event()
        self.errors: List[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(hold,), daemon=True) for _ in range(n)]

    def _run(self, hold: Callable[[threading.Event], None]) -> None:
        try:
            hold(self.release)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.errors.append(exc)

    def __enter__(self) -> Holders:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads), "a holder never finished"


def hold_redis_connection(release: threading.Event) -> None:
    """Occupy one pooled connection with a blocking command (BLPOP) until `release`."""
    conn = get_redis()
    key = f"mcp:pool-test:{threading.get_ident()}"
    while not release.is_set():
        conn.client.blpop([key], timeout=0.3)


def timed(fn: Callable[[], Any]) -> Tuple[float, Optional[BaseException]]:
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def listeners() -> int:
    """Pooled connections held for the process's life by the library's pub/sub listeners."""
    from mcp_redis import pubsub

    return sum(1 for s in list(pubsub._live) if s.alive)


@pytest.fixture
def small_pool(redis_url: str) -> Iterator[None]:
    mcp_redis.configure(redis_url=redis_url, **POOL)
    yield
    wait_for(lambda: get_redis().pool_stats()["in_use"] <= listeners(), timeout=5,
             what="pool in_use back to 0 (beyond the library's listeners)")


def test_caller_beyond_max_connections_waits_pool_timeout_then_backend_unavailable(small_pool: None) -> None:
    conn = get_redis()
    with Holders(2, hold_redis_connection):
        wait_for(lambda: conn.pool_stats()["in_use"] == 2, timeout=5, what="both connections busy")
        seconds, exc = timed(lambda: conn.call(conn.client.get, "mcp:pool-test:x"))
    assert isinstance(exc, BackendUnavailable), repr(exc)
    assert "No connection available" in str(exc)
    assert settings().pool_timeout <= seconds <= exhaustion_budget()


def test_single_attempt_waits_about_one_pool_timeout(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, retry_attempts=1, **POOL)
    conn = get_redis()
    with Holders(2, hold_redis_connection):
        wait_for(lambda: conn.pool_stats()["in_use"] == 2, timeout=5, what="both connections busy")
        seconds, exc = timed(lambda: conn.call(conn.client.get, "mcp:pool-test:x"))
    assert isinstance(exc, BackendUnavailable)
    assert 0.5 <= seconds <= 0.5 + SLACK


def test_pool_recovers_once_holders_finish(small_pool: None) -> None:
    conn = get_redis()
    with Holders(2, hold_redis_connection):
        wait_for(lambda: conn.pool_stats()["in_use"] == 2, timeout=5, what="both connections busy")
        with pytest.raises(BackendUnavailable):
            conn.call(conn.client.get, "mcp:pool-test:x")
    wait_for(lambda: conn.pool_stats()["in_use"] == 0, timeout=5, what="pool drained")
    # The pool may have tripped the breaker: the next call after its reset succeeds.
    wait_for(lambda: conn.call(conn.client.ping) is True, timeout=settings().breaker_reset_timeout + 3,
             what="a call after the holders finished")
    assert conn.pool_stats()["created"] <= 2


def test_many_threads_share_two_connections_without_deadlock(small_pool: None) -> None:
    """Twelve threads × 50 round trips through 2 connections: all finish, none crash."""
    conn = get_redis()
    errors: List[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(50):
            try:
                conn.call(conn.client.incr, "mcp:pool-test:counter")
                with lock:
                    done[0] += 1
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(12)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker never returned"
    assert all(isinstance(e, BackendUnavailable) for e in errors), errors[:3]
    assert done[0] + len(errors) == 600
    assert done[0] == int(conn.call(conn.client.get, "mcp:pool-test:counter"))
    stats = conn.pool_stats()
    assert stats["created"] <= 2 and stats["in_use"] == 0
    assert time.monotonic() - start < 60


def test_features_under_an_exhausted_pool_follow_their_policies(small_pool: None) -> None:
    """Cache returns the loader's value; locks fail closed; both within the budget."""
    conn = get_redis()
    with Holders(2, hold_redis_connection):
        wait_for(lambda: conn.pool_stats()["in_use"] == 2, timeout=5, what="both connections busy")

        @mcp_redis.cached_metadata(ttl=60)
        def load(agent_id: str) -> str:
            return agent_id + "!"

        seconds, exc = timed(lambda: load("pool-agent"))
        assert exc is None, f"cache raised under pool exhaustion: {exc!r}"
        assert load("pool-agent") == "pool-agent!"
        assert seconds <= 2 * exhaustion_budget()

        def take() -> None:
            with mcp_redis.agent_lock("pool-agent", timeout=5, blocking_timeout=1):
                raise AssertionError("acquired without a connection")

        seconds, exc = timed(take)
        assert isinstance(exc, BackendUnavailable), repr(exc)
        assert seconds <= 2 * exhaustion_budget()
        # default fallback: the local limiter admits
        seconds, exc = timed(lambda: mcp_redis.RateLimiter("pool", 5, 60).hit("k"))
        assert exc is None, f"rate limit raised under pool exhaustion: {exc!r}"
        assert seconds <= 2 * exhaustion_budget()


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
def small_pg_pool(database_url: str) -> Iterator[Any]:
    from mcp_redis.postgres import get_postgres

    mcp_redis.configure(database_url=database_url, postgres_max_connections=2, pool_timeout=0.5)
    pg = get_postgres()
    pg.ensure_schema()
    yield pg
    wait_for(lambda: pg.pool_stats()["in_use"] == 0, timeout=5, what="postgres pool back to 0")


def hold_pg_connection(release: threading.Event) -> None:
    from mcp_redis.postgres import get_postgres

    with get_postgres().connection() as c, c.cursor() as cur:
        cur.execute("SELECT 1")
        release.wait(10)


def test_postgres_caller_beyond_pool_waits_pool_timeout_then_backend_unavailable(small_pg_pool: Any) -> None:
    pg = small_pg_pool
    with Holders(2, hold_pg_connection):
        wait_for(lambda: pg.pool_stats()["in_use"] == 2, timeout=5, what="both postgres connections busy")
        seconds, exc = timed(lambda: pg.execute("SELECT 1", fetch="one"))
    assert isinstance(exc, BackendUnavailable), repr(exc)
    assert "pool exhausted" in str(exc)
    assert 0.5 <= seconds <= 0.5 + SLACK
    assert pg.execute("SELECT 1", fetch="one") == (1,)


def test_postgres_many_threads_share_two_connections_without_deadlock(small_pg_pool: Any) -> None:
    pg = small_pg_pool
    errors: List[BaseException] = []
    ok = [0]
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            try:
                pg.execute("SELECT pg_sleep(0.005)", fetch="one")
                with lock:
                    ok[0] += 1
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock in the postgres pool"
    assert all(isinstance(e, BackendUnavailable) for e in errors), errors[:3]
    assert ok[0] + len(errors) == 80
    assert ok[0] > 0


def test_an_exhausted_pool_does_not_open_the_breaker(redis_url: str) -> None:
    """A busy pool is not a down Redis: the breaker (and every feature's fallback) must stay out of it."""
    from mcp_redis.resilience import BreakerState

    mcp_redis.configure(redis_url=redis_url, max_connections=2, pool_timeout=0.2, socket_timeout=5.0,
                        breaker_failure_threshold=3)
    conn = get_redis()
    with Holders(2, hold_redis_connection):
        wait_for(lambda: conn.pool_stats()["in_use"] == 2, timeout=5, what="both connections busy")
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                conn.call(conn.client.get, "mcp:pool-test:x")
        state = conn.policy.breaker.state
    assert state is BreakerState.CLOSED, f"breaker {state.value} after pool exhaustion alone"


def test_threads_queued_on_one_lock_never_starve_its_release_of_a_connection(small_pool: None) -> None:
    # 40 threads of one process on one agent_lock through 2 pooled connections:
    # one of them waits in Redis (BLPOP on a connection), the rest wait their
    # turn in the process, so the holder always finds a connection to release
    # with. Before, every waiter held (or fought for) a connection: releases
    # failed with PoolExhausted and the lock sat held by nobody for its lease.
    entered: List[int] = []
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            with mcp_redis.agent_lock("crowded", blocking_timeout=60):
                entered.append(i)
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == [] and sorted(entered) == list(range(40))
