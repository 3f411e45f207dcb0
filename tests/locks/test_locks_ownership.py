"""Lock ownership at its edges, on a real redis-server: caller-supplied tokens,
lost holds, lost replies (through the package's fault proxy) and coroutines.

Each test states one guarantee of docs/locks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, List, Tuple

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import mcp_redis
from mcp_redis import BlockingCallInEventLoop, LockNotOwned, McpRedisError
from mcp_redis.compat import StateLockManager
from mcp_redis.connections import get_redis
from mcp_redis.locks.runtime import runtime
from mcp_redis.metrics import METRICS
from mcp_redis.testing import RedisServer, wait_for
from mcp_redis.testing.faultproxy import FaultProxy


def raw(url: str) -> redis.Redis[str]:
    return redis.Redis.from_url(url, decode_responses=True)


@pytest.fixture
def lost_reply(redis_url: str, redis_server: RedisServer) -> Iterator[FaultProxy]:
    """The library through a fault proxy whose next reply can be cut (the command ran, its answer is lost)."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=1.0, retry_attempts=3, breaker_failure_threshold=10)
        conn = get_redis()
        assert conn.call(conn.client.ping) is True  # a pooled connection, so the cut hits the call under test
        yield proxy


# -- a caller-supplied token is a dedupe id, not an identity -----------------------------
def test_two_holders_with_the_same_token_do_not_both_acquire(redis_mode: str) -> None:
    # Two lock objects with their own state: what two processes are.
    first = mcp_redis.lock("nightly-job", timeout=10)
    second = mcp_redis.lock("nightly-job", timeout=10)
    assert first.acquire(blocking_timeout=2, token="job-42") is True
    assert second.acquire(blocking_timeout=0.2, token="job-42") is False
    with pytest.raises(LockNotOwned):
        second.release()
    assert first.owned() and not second.owned()
    first.release()
    assert not first.locked()


def test_expired_holder_cannot_release_a_new_holder_using_the_same_token(redis_mode: str) -> None:
    r = raw(redis_mode)
    first = mcp_redis.lock("nightly-job", timeout=0.1)
    assert first.acquire(token="job-42")
    second = mcp_redis.lock("nightly-job", timeout=10)
    assert second.acquire(blocking_timeout=5, token="job-42")  # enters once the first lease ends
    held = r.get(second.key)
    with pytest.raises(LockNotOwned):
        first.release()
    with pytest.raises(LockNotOwned):
        first.extend(5)
    assert r.get(second.key) == held and second.owned()
    second.release()


def test_acquire_retried_after_a_lost_reply_takes_the_lock_once(lost_reply: FaultProxy) -> None:
    held = mcp_redis.lock("nightly-job", timeout=10)
    assert held.acquire(token="job-42")
    before = held.fencing_token
    held.release()
    lost_reply.reset_next_reply()
    assert held.acquire(blocking_timeout=2, token="job-42") is True  # the retry finds its own grant
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the acquire retried"
    assert before is not None and held.fencing_token is not None and held.fencing_token > before
    assert mcp_redis.lock("nightly-job").acquire(blocking=False, token="job-42") is False
    held.release()  # no orphaned lease: the lock is free at once
    assert not held.locked()


def test_a_fenced_acquire_retried_after_a_lost_reply_takes_the_lock_once_with_a_fresh_token(
        lost_reply: FaultProxy) -> None:
    held = mcp_redis.lock("fenced-job", timeout=10, fencing=True)
    assert held.acquire()
    before = held.fencing_token
    held.release()
    lost_reply.reset_next_reply()  # the reply to the pipelined SET + token script is cut
    assert held.acquire(blocking_timeout=2) is True  # the retry's SET … GET finds its own grant
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the acquire retried"
    assert before is not None and held.fencing_token is not None and held.fencing_token > before
    assert mcp_redis.lock("fenced-job").acquire(blocking=False) is False
    held.release()
    assert not held.locked()


# -- a lost lock is never re-entered -----------------------------------------------------------
def test_nested_agent_lock_refuses_to_enter_a_lost_lock(redis_mode: str, tmp_path: Path) -> None:
    r = raw(redis_mode)
    with pytest.raises(LockNotOwned):
        with mcp_redis.agent_lock("lost-nest", timeout=0.3) as outer:
            r.set(outer.key, "someone-else", px=10_000)  # a takeover behind our back
            assert outer.lost_event.wait(5)
            with pytest.raises(LockNotOwned):
                with mcp_redis.agent_lock("lost-nest", blocking_timeout=0):
                    pytest.fail("entered a lock that was already lost")
            # The compat manager is not reentrant: it is one more waiter for the new holder.
            with pytest.raises(TimeoutError):
                with StateLockManager(lock_dir=tmp_path).acquire_agent_lock("lost-nest", timeout=0, max_retries=1):
                    pytest.fail("entered a lock that was already lost")
    assert r.get(outer.key) == "someone-else"


# -- a lost reply never turns a done release into LockNotOwned ----------------------------------
def test_release_retried_after_a_lost_reply_is_reported_done(lost_reply: FaultProxy) -> None:
    held = mcp_redis.lock("release-lost", timeout=10)
    assert held.acquire()
    lost_reply.reset_next_reply()
    held.release()  # the retry finds the lock gone within this hold's lease: no LockNotOwned
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the release retried"
    assert not held.locked() and not held.lost


def test_release_handed_to_a_waiter_is_reported_done_after_a_lost_reply(
    lost_reply: FaultProxy, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    held = mcp_redis.lock("release-lost", timeout=10)
    assert held.acquire()
    waiter = held.key + "#wfeedfacefeedfacefeedface"  # a waiter queued from another process
    r.rpush(held.key + "#queue", waiter)
    r.pexpire(held.key + "#queue", 10_000)
    lost_reply.reset_next_reply()
    held.release()
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the release retried"
    assert r.get(held.key) == "r:" + waiter, "reserved for the waiter once, not touched by the retry"
    assert r.lrange(waiter, 0, -1) == ["1"]


def test_release_retried_after_a_lost_reply_past_the_lease_still_raises_not_owned(
    lost_reply: FaultProxy, redis_server: RedisServer
) -> None:
    """The retry rule never hides a lock that was really lost: past its lease, a
    release whose reply was lost and whose lock someone else now holds raises."""
    r = redis_server.client()
    held = mcp_redis.lock("release-lost-late", timeout=0.2)
    assert held.acquire()
    wait_for(lambda: not r.exists(held.key), timeout=5, what="the lease to run out")
    r.set(held.key, "someone-else", px=10_000)  # the next holder
    lost_reply.reset_next_reply()
    with pytest.raises(LockNotOwned):
        held.release()
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the release retried"
    assert r.get(held.key) == "someone-else"


# -- the holder process's liveness (LIVENESS_TTL) at its edges ------------------------------
def _redis_busy(server: RedisServer) -> bool:
    """True while the server runs a blocking command: a PING gets no answer within 50 ms."""
    probe = server.client(socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
    try:
        probe.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        probe.close()


def test_a_grant_redis_runs_after_the_holders_liveness_lapsed_is_not_given_twice(redis_factory: Any) -> None:
    # Redis busy for 2.5 s (DEBUG SLEEP, as a slow command or a stall would):
    # the holder's SET waits behind it, its process's liveness key (1.5 s)
    # lapses meanwhile, and the grant names a process Redis thinks dead.
    # Before, the next caller took it over at once: two holders.
    server = redis_factory(args=["--enable-debug-command", "yes"])
    holder_client = mcp_redis.Client(redis_url=server.url, socket_timeout=5)
    other_client = mcp_redis.Client(redis_url=server.url)
    try:
        warm = mcp_redis.lock("warm-up", client=holder_client)  # a process already using locks: beaten just now
        warm.acquire()
        warm.release()
        sleeper = threading.Thread(target=lambda: server.client(socket_timeout=10).execute_command(
            "DEBUG", "SLEEP", "2.5"))
        sleeper.start()
        wait_for(lambda: _redis_busy(server), timeout=5, what="Redis busy")
        first = mcp_redis.lock("late-grant", timeout=30, client=holder_client)
        assert first.acquire(blocking_timeout=10)
        second = mcp_redis.lock("late-grant", timeout=30, client=other_client)
        got = second.acquire(blocking=False)
        sleeper.join(10)
        assert not (got and not first.lost), "two callers told they hold it, neither told otherwise"
        assert not got and first.owned(), "the first grant stands, its process alive"
        first.release()
    finally:
        holder_client.close()
        other_client.close()


@contextlib.contextmanager
def holder_and_other(redis_server: RedisServer, **holder_settings: Any) -> Iterator[Tuple[FaultProxy, Any, Any]]:
    """(proxy, the holder's client through it, another process's client straight to the server)."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        holder_client = mcp_redis.Client(redis_url=proxy.url(), **holder_settings)
        other_client = mcp_redis.Client(redis_url=redis_server.url)
        try:
            yield proxy, holder_client, other_client
        finally:
            holder_client.close()
            other_client.close()


def test_a_release_retried_after_a_takeover_raises_not_owned(redis_server: RedisServer) -> None:
    # The holder is cut off (its liveness lapses), another caller takes the
    # lock over within the lease, then the holder's release reply is lost:
    # the retry must not report the lost lock as released.
    with holder_and_other(redis_server, socket_timeout=1.0, retry_attempts=3,
                          breaker_failure_threshold=10) as (proxy, holder_client, other_client):
        first = mcp_redis.lock("taken-over", timeout=30, client=holder_client)
        assert first.acquire(blocking=False)
        proxy.blackhole()
        second = mcp_redis.lock("taken-over", timeout=30, client=other_client)
        assert second.acquire(blocking_timeout=10), "taken over as a dead holder's, within the 30 s lease"
        proxy.pass_through()
        proxy.reset_next_reply()
        with pytest.raises(LockNotOwned):
            first.release()
        assert first.lost and second.owned()
        second.release()


def test_a_release_that_could_not_reach_redis_frees_the_lock_once_redis_answers(redis_server: RedisServer) -> None:
    # The holder's link drops at release: release() raises BackendUnavailable,
    # and the lock must not stay taken for the rest of its 30 s lease (a live
    # process keeps beating for its other holds, so no waiter could take it
    # over as a dead holder's).
    with holder_and_other(redis_server, socket_timeout=0.5, retry_attempts=1,
                          breaker_failure_threshold=100) as (proxy, holder_client, other_client):
        other_hold = mcp_redis.agent_lock("kept", timeout=30, client=holder_client)
        other_hold.acquire()  # keeps this process's liveness beating
        first = mcp_redis.agent_lock("cut-at-release", timeout=30, client=holder_client)
        first.acquire()
        proxy.drop()
        with pytest.raises(mcp_redis.BackendUnavailable):
            first.release()
        proxy.pass_through()
        healed = time.monotonic()
        second = mcp_redis.agent_lock("cut-at-release", timeout=30, blocking_timeout=10, client=other_client)
        assert second.acquire()
        assert time.monotonic() - healed < 5, "freed by the background release, not at the end of the lease"
        assert not other_hold.lost
        second.release()
        wait_for(lambda: METRICS.counter("lock_release_total", backend="redis", outcome="released_late") == 1,
                 timeout=5, what="the background release counted as done")
        # A release that ran but whose reply came too late is a retry too: counted as done, not as expired.
        late = mcp_redis.agent_lock("late-reply", timeout=30, client=holder_client)
        late.acquire()
        proxy.add_latency(1.0)
        with pytest.raises(mcp_redis.BackendUnavailable):
            late.release()
        proxy.pass_through()
        wait_for(lambda: METRICS.counter("lock_release_total", backend="redis", outcome="released_late") == 2,
                 timeout=5, what="the background retry of a release that ran counted as done")
        assert METRICS.counter("lock_release_total", backend="redis", outcome="expired_unreleased") == 0
        assert runtime(holder_client).watchdog.pending_releases() == 0
        other_hold.release()


def test_a_holder_cut_off_past_its_liveness_learns_it_lost_the_lock_when_it_reconnects(
        redis_server: RedisServer) -> None:
    # A stall longer than LIVENESS_TTL lets another caller take the lock over
    # (as a dead holder's); the holder's next beat sees the gap and checks its
    # holds, instead of waiting for a renewal a third of the lease away (10 s).
    with holder_and_other(redis_server, socket_timeout=1.0) as (proxy, holder_client, other_client):
        first = mcp_redis.agent_lock("stalled", timeout=30, client=holder_client)
        first.acquire()
        proxy.blackhole()
        second = mcp_redis.agent_lock("stalled", timeout=30, blocking_timeout=10, client=other_client)
        assert second.acquire()
        assert not first.lost
        proxy.pass_through()
        reconnected = time.monotonic()
        wait_for(lambda: first.lost, timeout=10, what="the holder to learn its lock was taken over")
        assert time.monotonic() - reconnected < 5, "learned at the first beats, not at the renewal (10 s)"
        second.release()
        with pytest.raises(LockNotOwned):
            first.release()


@pytest.mark.long
def test_a_process_holding_many_locks_keeps_them_all_through_a_stall_of_its_link(
        redis_server: RedisServer) -> None:
    # 200 holds over a 15 ms link, then one 2 s stall: the gap check after it
    # must not starve the liveness beats (checked one round trip per hold in
    # the beating thread, it let the key lapse again and again, and a healthy
    # process lost every lock to the next caller).
    with holder_and_other(redis_server, socket_timeout=5.0) as (proxy, holder_client, other_client):
        holds = [mcp_redis.lock(f"many-{i}", timeout=60, auto_renew=True, client=holder_client)
                 for i in range(200)]
        for hold in holds:
            assert hold.acquire(blocking_timeout=5)
        proxy.add_latency(2.0)  # the stall: nothing is lost yet (nobody tries to take over)
        wait_for(lambda: redis_server.client().exists(*[h.key for h in holds]) == 200 and
                 redis_server.client().pttl(holds[0]._hold().backend._live_key) == -2,  # type: ignore[union-attr]
                 timeout=10, what="the holder's liveness to lapse during the stall")
        proxy.add_latency(0.015)
        live_key = holds[0]._hold().backend._live_key  # type: ignore[union-attr]
        wait_for(lambda: redis_server.client().pttl(live_key) > 0, timeout=10, what="the beats to resume")
        healed = time.monotonic()
        others = [mcp_redis.lock(f"many-{i}", timeout=60, client=other_client) for i in range(200)]
        stolen = 0
        while time.monotonic() - healed < 6:  # takers keep trying for two renewal periods
            stolen += sum(1 for other in others[:20] if other.acquire(blocking_timeout=0.05))  # takes over the dead
        assert stolen == 0, f"{stolen} locks taken over from a healthy process"
        assert not any(hold.lost for hold in holds)


def test_a_process_holding_many_locks_renews_them_in_batches_over_a_slow_link(
        redis_server: RedisServer) -> None:
    """300 agent_locks with a 1.5 s lease over a 20 ms link. Renewed one round trip per hold, a
    renewal cycle took 6 s, and the leases ran out under their live holders (so they did on a
    fast link in a process whose busy threads made each round trip wait for the GIL). The
    watchdog renews one connection's due holds in one round trip. The server forgot its scripts
    first: the batch loads the renewal script itself."""
    with holder_and_other(redis_server, socket_timeout=5.0) as (proxy, holder_client, _):
        holds = [mcp_redis.agent_lock(f"batch-{i}", timeout=1.5, client=holder_client) for i in range(300)]
        for hold in holds:
            assert hold.acquire()
        redis_server.client().script_flush()
        proxy.add_latency(0.02)
        held_since = time.monotonic()
        keys = [hold.key for hold in holds]
        while time.monotonic() - held_since < 4.5:  # three leases
            assert redis_server.client().exists(*keys) == 300
            time.sleep(0.1)
        assert not any(hold.lost for hold in holds)
        proxy.add_latency(0)
        for hold in holds:
            hold.release()


def test_releasing_a_hold_known_lost_raises_not_owned_even_while_redis_is_unreachable(
        redis_server: RedisServer) -> None:
    """API.md: releasing after the lease was lost raises LockNotOwned. A hold the watchdog had
    already marked lost raised the outage's BackendUnavailable instead when Redis did not answer
    the release (a reviewer, on a cluster with one master down)."""
    with holder_and_other(redis_server, socket_timeout=0.3, retry_attempts=1,
                          breaker_failure_threshold=1000) as (proxy, holder_client, _):
        held = mcp_redis.agent_lock("lost-then-unreachable", timeout=1, client=holder_client)
        assert held.acquire()
        proxy.blackhole()  # renewals fail until the lease has ended: lost
        assert held.lost_event.wait(10)
        with pytest.raises(LockNotOwned):
            held.release()


def test_extend_retried_after_a_lost_reply_adds_the_time_once(lost_reply: FaultProxy,
                                                              redis_server: RedisServer) -> None:
    r = redis_server.client()
    held = mcp_redis.lock("extend-lost", timeout=10)
    assert held.acquire()
    lost_reply.reset_next_reply()
    assert held.extend(20) is True
    assert lost_reply.stats.get("reset") == 1, "the reply was cut and the extend retried"
    assert 20_000 < r.pttl(held.key) <= 30_000, "10 s lease + 20 s, added once"
    held.release()


# -- coroutines: refused, with the way out named --------------------------------------------------
def _run_handlers(handler: Callable[[], Awaitable[None]], n: int = 10) -> List[object]:
    """Run `n` copies of `handler` concurrently on one event loop; their results or exceptions."""

    async def main() -> List[object]:
        return list(await asyncio.gather(*(handler() for _ in range(n)), return_exceptions=True))

    return asyncio.run(main())


def test_agent_lock_in_coroutines_on_one_loop_raises_naming_the_async_alternative(redis_mode: str) -> None:
    counter = {"n": 0}

    async def handler() -> None:
        with mcp_redis.agent_lock("coro-agent"):
            n = counter["n"]
            await asyncio.sleep(0)  # the awaited read-modify-write of a legacy handler
            counter["n"] = n + 1

    results = _run_handlers(handler)
    assert all(isinstance(r, BlockingCallInEventLoop) for r in results), results
    error = results[0]
    assert isinstance(error, McpRedisError) and isinstance(error, RuntimeError)
    assert not isinstance(error, mcp_redis.LockError)
    message = str(error)
    assert "StateLockManager.acquire_agent_lock_async" in message and "asyncio.to_thread" in message
    assert counter["n"] == 0
    assert not raw(redis_mode).exists(mcp_redis.agent_lock("coro-agent").key)


def test_every_lock_entry_point_refuses_a_thread_running_an_event_loop(redis_mode: str, tmp_path: Path) -> None:
    async def attempts() -> List[str]:
        refused = []
        for name, call in [
            ("lock().acquire", lambda: mcp_redis.lock("coro").acquire()),
            ("lock().acquire(blocking=False)", lambda: mcp_redis.lock("coro").acquire(blocking=False)),
            ("with lock()", lambda: mcp_redis.lock("coro").__enter__()),
            ("agent_lock().acquire", lambda: mcp_redis.agent_lock("coro").acquire()),
            ("StateLockManager", lambda: StateLockManager(lock_dir=tmp_path).acquire_agent_lock("coro").__enter__()),
        ]:
            try:
                call()
            except BlockingCallInEventLoop:
                refused.append(name)
        return refused

    assert len(asyncio.run(attempts())) == 5
    assert not raw(redis_mode).keys("*coro*")


def test_agent_lock_under_asyncio_to_thread_excludes_every_coroutine(redis_mode: str) -> None:
    r = raw(redis_mode)

    def section() -> None:
        with mcp_redis.agent_lock("coro-agent", blocking_timeout=30):
            n = int(r.get("coro-counter") or 0)
            r.set("coro-counter", n + 1)

    async def handler() -> None:
        await asyncio.to_thread(section)

    results = _run_handlers(handler)
    assert results == [None] * 10
    assert r.get("coro-counter") == "10"


def test_a_lock_left_held_by_a_thread_that_ended_is_released_not_renewed_forever(
        redis_mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """A thread-local hold can be released only by its thread: once that thread has ended, the
    watchdog releases it at its next renewal instead of renewing it until the process exits.
    A lock other threads may release (thread_local=False) is left to them, renewed."""
    held = [mcp_redis.agent_lock("orphan", timeout=1),
            mcp_redis.lock("shared", timeout=1, thread_local=False, auto_renew=True)]
    for lock in held:
        worker = threading.Thread(target=lambda lk=lock: lk.acquire())
        worker.start()
        worker.join()
    assert all(lock.locked() for lock in held)
    with caplog.at_level("WARNING", logger="mcp_redis.locks"):
        # Leases of 1 s renewed every 0.33 s: taken within 5 s only if the renewals stopped
        # (renewed for ever, never).
        waiter = mcp_redis.agent_lock("orphan", blocking_timeout=5)
        assert waiter.acquire()
        waiter.release()
        assert mcp_redis.lock("shared").acquire(blocking_timeout=1.5) is False  # still renewed
    assert caplog.text.count("a thread ended holding a lock it never released") == 1
    held[1].release()  # from this thread: a shared lock's holder is any thread


def test_a_block_left_in_another_thread_says_so_and_the_entering_thread_keeps_the_hold(
        redis_mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """A generator holding an agent_lock, entered in one thread and closed in another: the block
    ends in a thread that does not hold the lock. Nothing is released there (a thread never
    releases another's hold), the warning says why (it said "no longer owned" of a lock still
    held and renewed), and the entering thread's end releases it."""
    def holding() -> Iterator[None]:
        with mcp_redis.agent_lock("generator", timeout=1):
            yield

    gen = holding()
    entered, leave = threading.Event(), threading.Event()

    def enter() -> None:
        next(gen)
        entered.set()
        leave.wait(30)

    owner = threading.Thread(target=enter)
    owner.start()
    try:
        assert entered.wait(10)
        with caplog.at_level("WARNING", logger="mcp_redis.locks"):
            gen.close()  # GeneratorExit at the yield: the block ends in this thread
        assert "ended in a thread that did not enter it" in caplog.text
        assert "no longer owned" not in caplog.text
        # Kept, renewed: a lease of 1 s outlives 1.5 s of waiting.
        assert mcp_redis.agent_lock("generator").acquire(blocking_timeout=1.5) is False
    finally:
        leave.set()
        owner.join()
    with mcp_redis.agent_lock("generator", blocking_timeout=5):  # the owner ended: the watchdog released it
        pass
    caplog.clear()
    own = mcp_redis.lock("released-inside", raise_on_release_error=False)
    with caplog.at_level("WARNING", logger="mcp_redis.locks"):
        with own:
            own.release()  # this thread's own release, inside its block: not another thread's
    assert "no longer owned when leaving its block" in caplog.text
    assert "did not enter it" not in caplog.text


_MAIN_RETURNS = """
import sys, threading, time
import mcp_redis
mcp_redis.configure(redis_url=sys.argv[1])
leader = mcp_redis.lock("leader", timeout=1, auto_renew=True)
assert leader.acquire()

def serve():  # the process works on under the lock its main thread took, after main returned
    time.sleep(2.5)
    print("held" if leader.locked() and not leader.lost else "released", flush=True)

threading.Thread(target=serve).start()
"""


def test_a_lock_held_by_the_main_thread_is_kept_after_the_main_script_returns(redis_mode: str) -> None:
    """The main thread counts as ended once the script returns, while the process runs on in
    other threads: the watchdog keeps renewing its holds (a 1 s lease, 2.5 s on)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MAIN_RETURNS, redis_mode], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "held", proc.stderr
    assert "never released" not in proc.stderr
