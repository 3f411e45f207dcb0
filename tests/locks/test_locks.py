"""Locks on a real redis-server: exclusion, ownership, fencing, handoff, renewal, fork.

Timing bounds named by the issue (a waiter enters within 50 ms of a crashed
holder's lease end) are asserted on the median of several trials, so one slow
scheduling slice on a loaded box does not fail the run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import redis
import redis.exceptions as rex
from redis.crc import key_slot

import mcp_redis
from mcp_redis import BackendUnavailable, LockNotOwned, LockTimeout, McpRedisError
from mcp_redis.compat import StateLockManager
from mcp_redis.locks import HANDOFF_GRACE
from mcp_redis.locks.redis import FENCE_TTL
from mcp_redis.locks.runtime import runtime
from mcp_redis.metrics import METRICS
from mcp_redis.testing import free_port, wait_for
from tests import workers_locks

SPAWN = multiprocessing.get_context("spawn")


def raw(url: str) -> redis.Redis[str]:
    return redis.Redis.from_url(url, decode_responses=True)


def evalsha_calls(r: redis.Redis[str]) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


# -- ownership and the redis-py contract ---------------------------------------------
def test_acquire_yields_strictly_increasing_fencing_tokens(redis_mode: str) -> None:
    held = mcp_redis.lock("fenced", timeout=5)
    fences = []
    for _ in range(5):
        assert held.acquire()
        fences.append(held.fencing_token)
        held.release()
    assert all(isinstance(f, int) for f in fences)
    assert fences == sorted(set(fences)) and len(fences) == 5


def test_fencing_tokens_keep_rising_after_redis_loses_its_data(redis_mode: str) -> None:
    held = mcp_redis.lock("fence-restart", timeout=5)
    with held:
        before = held.fencing_token
    raw(redis_mode).flushall()  # what a restart without persistence does
    with held:
        after = held.fencing_token
    assert before is not None and after is not None and after > before


def _server_us(r: redis.Redis[str]) -> int:
    seconds, micros = r.time()
    return seconds * 1_000_000 + micros


def _fence_below_its_expiry(r: redis.Redis[str], key: str) -> bool:
    """The invariant the counter's TTL rests on: its value is below its expiry time (µs, server clock)."""
    return int(r.get(key) or 0) < int(r.execute_command("PEXPIRETIME", key)) * 1000


def test_fencing_tokens_keep_rising_when_the_counter_expires_or_is_deleted(redis_mode: str) -> None:
    r = raw(redis_mode)
    held = mcp_redis.lock("fence-expiry", timeout=5)
    fence_key = held.key + "#fence"
    tokens: List[int] = []
    for how in ("first", "kept", "expired", "kept", "deleted", "kept"):
        if how == "expired":
            r.pexpire(fence_key, 1)
            wait_for(lambda: not r.exists(fence_key), timeout=5, what="the fencing counter to expire")
        elif how == "deleted":
            r.delete(fence_key)
        with held:
            assert held.fencing_token is not None
            tokens.append(held.fencing_token)
        assert 0 < r.pttl(fence_key) <= FENCE_TTL * 1000
        assert _fence_below_its_expiry(r, fence_key)
        assert int(r.get(fence_key)) == tokens[-1]
    assert tokens == sorted(set(tokens)) and len(tokens) == 6
    assert all(t <= _server_us(r) for t in tokens)  # floored at TIME, never ahead of it here


def test_a_counter_ahead_of_the_clock_is_followed_and_outlives_its_lead(redis_mode: str) -> None:
    # E.g. raised to PostgreSQL's token by the fallback gate, or a server
    # clock stepped back: the counter, not TIME, gives the next token, and it
    # is written with a fresh FENCE_TTL, so it expires only once the clock has
    # passed it (tokens stay above it after the expiry too).
    r = raw(redis_mode)
    held = mcp_redis.lock("fence-ahead", timeout=5)
    fence_key = held.key + "#fence"
    ahead = _server_us(r) + 600 * 1_000_000  # ten minutes ahead of the server's clock
    r.set(fence_key, ahead, px=1000)  # a short TTL: the grant must give it a full one back
    tokens = []
    for _ in range(3):
        with held:
            assert held.fencing_token is not None
            tokens.append(held.fencing_token)
        assert FENCE_TTL * 1000 - 60_000 < r.pttl(fence_key) <= FENCE_TTL * 1000  # a full FENCE_TTL
        assert _fence_below_its_expiry(r, fence_key)
    assert tokens == [ahead + 1, ahead + 2, ahead + 3]


def test_a_counter_without_a_ttl_gets_one_back(redis_mode: str) -> None:
    # Left by a version before the counter expired (or by one still running
    # during a rolling upgrade, whose writes drop the TTL): a grant in the
    # first tenth of a second of the server's clock sets a fresh one.
    r = raw(redis_mode)
    held = mcp_redis.lock("fence-legacy", timeout=5)
    fence_key = held.key + "#fence"
    r.set(fence_key, _server_us(r) - 1_000_000)
    assert r.pttl(fence_key) == -1
    tokens: List[int] = []

    def grant() -> bool:
        with held:
            assert held.fencing_token is not None
            tokens.append(held.fencing_token)
        return r.pttl(fence_key) > 0

    wait_for(grant, timeout=10, what="a grant to give the counter a TTL")
    assert tokens == sorted(set(tokens))
    assert _fence_below_its_expiry(r, fence_key)


def test_the_fallback_gate_raises_the_counter_with_a_ttl(redis_mode: str) -> None:
    # lock_gate.lua (lock_fallback=postgres) raises the counter above
    # PostgreSQL's last token; it must never leave it without a TTL, even
    # when the counter was gone.
    r = raw(redis_mode)
    conn = mcp_redis.default_client().redis("locks")
    gate = conn.script("lock_gate")
    keys = mcp_redis.lock("fence-gate").key
    pg_token = _server_us(r) + 60 * 1_000_000
    for counter in (None, pg_token - 5, pg_token + 5):
        r.delete(keys + "#fence")
        if counter is not None:
            r.set(keys + "#fence", counter)
        token = int(conn.run_script(gate, [keys + "#gate", keys + "#fence"], [1000, pg_token, pg_token - 1]))
        assert token == max(counter or 0, pg_token) + 1 == int(r.get(keys + "#fence"))
        assert 0 < r.pttl(keys + "#fence") <= FENCE_TTL * 1000
    # A caller's token already above PostgreSQL's is kept, the counter untouched.
    assert int(conn.run_script(gate, [keys + "#gate", keys + "#fence"], [1000, 5, 7])) == 7


def test_a_release_reserves_the_lock_for_the_head_waiter_for_handoff_grace(redis_mode: str) -> None:
    # The release does not send the grace: the script's default must be HANDOFF_GRACE.
    r = raw(redis_mode)
    held = mcp_redis.lock("grace", timeout=10)
    assert held.acquire()
    waiter = held.key + "#wfeedfacefeedfacefeedface"  # a waiter queued from another process
    r.rpush(held.key + "#queue", waiter)
    held.release()
    assert r.get(held.key) == "r:" + waiter and r.lrange(waiter, 0, -1) == ["1"]
    for key in (held.key, waiter):
        assert HANDOFF_GRACE * 1000 - 500 < r.pttl(key) <= HANDOFF_GRACE * 1000


def test_release_after_expiry_keeps_new_holders_lock(redis_mode: str) -> None:
    r = raw(redis_mode)
    first = mcp_redis.lock("job", timeout=0.1)
    assert first.acquire()
    wait_for(lambda: not r.exists(first.key), timeout=5, what="lease end")
    second = mcp_redis.lock("job", timeout=10)
    assert second.acquire(blocking=False)
    token = r.get(second.key)
    with pytest.raises(LockNotOwned) as info:
        first.release()
    assert isinstance(info.value, rex.LockNotOwnedError) and isinstance(info.value, McpRedisError)
    assert r.get(second.key) == token and second.owned()
    with pytest.raises(LockNotOwned):
        first.extend(5)
    assert r.get(second.key) == token
    second.release()


def test_leaving_block_after_takeover_raises_and_spares_new_holder(redis_mode: str) -> None:
    r = raw(redis_mode)
    with pytest.raises(LockNotOwned):
        with mcp_redis.lock("blk", timeout=0.1) as first:
            wait_for(lambda: not r.exists(first.key), timeout=5, what="lease end")
            thief = mcp_redis.lock("blk", timeout=10)
            assert thief.acquire(blocking=False)
    assert thief.owned()
    thief.release()


def test_extend_and_reacquire_follow_redis_py(redis_mode: str) -> None:
    r = raw(redis_mode)
    held = mcp_redis.lock("ext", timeout=10)
    assert held.acquire()
    assert held.extend(20) is True
    assert 25_000 < r.pttl(held.key) <= 30_000
    assert held.extend(3, replace_ttl=True)
    assert r.pttl(held.key) <= 3_000
    assert held.reacquire()
    assert 9_000 < r.pttl(held.key) <= 10_000
    assert held.locked() and held.owned()
    held.release()
    assert not held.locked() and not held.owned()
    with pytest.raises(rex.LockError):
        held.release()


def test_timeout_error_is_lock_timeout_timeouterror_and_redis_lock_error(redis_mode: str) -> None:
    holder = mcp_redis.lock("busy", timeout=10)
    assert holder.acquire()
    other = mcp_redis.lock("busy", timeout=10, blocking_timeout=0)
    assert other.acquire() is False
    assert other.acquire(blocking=False) is False
    for kind in (LockTimeout, TimeoutError, rex.LockError, McpRedisError):
        with pytest.raises(kind):
            with other:
                pass
    holder.release()


def test_blocking_timeout_is_a_float_honoured_closely(redis_mode: str) -> None:
    holder = mcp_redis.lock("slow", timeout=10)
    assert holder.acquire()
    waits = []
    for _ in range(3):
        start = time.monotonic()
        assert mcp_redis.lock("slow", timeout=10).acquire(blocking_timeout=0.25) is False
        waits.append(time.monotonic() - start)
    assert min(waits) >= 0.25
    assert statistics.median(waits) < 0.25 + 0.1
    holder.release()


def test_bad_arguments_raise_naming_the_argument_before_writing(redis_mode: str) -> None:
    r = raw(redis_mode)
    cases = [
        (lambda: mcp_redis.agent_lock(None), TypeError, "agent_id"),  # type: ignore[arg-type]
        (lambda: mcp_redis.agent_lock(""), ValueError, "agent_id"),
        (lambda: mcp_redis.agent_lock("x" * 1025), ValueError, "agent_id"),
        (lambda: mcp_redis.agent_lock("a", timeout=0), ValueError, "timeout"),
        (lambda: mcp_redis.agent_lock("a", timeout=True), TypeError, "timeout"),  # type: ignore[arg-type]
        (lambda: mcp_redis.agent_lock("a", blocking_timeout=-1), ValueError, "blocking_timeout"),
        (lambda: mcp_redis.lock(b"n"), TypeError, "name"),  # type: ignore[arg-type]
        (lambda: mcp_redis.lock("n", timeout=float("nan")), ValueError, "timeout"),
        (lambda: mcp_redis.lock("n").extend(-1), ValueError, "additional_time"),
        (lambda: StateLockManager(lock_dir=mcp_redis.settings().lock_dir).acquire_agent_lock("a", timeout="5"), TypeError, "timeout"),  # type: ignore[arg-type]
    ]
    for make, kind, argument in cases:
        with pytest.raises(kind, match=argument):
            make()
    assert r.dbsize() == 0


def test_odd_names_are_distinct_locks(redis_mode: str) -> None:
    names = ["*", "a*", "a:b", "{a}", "a b", "a\nb", "a\x00b", "ünï", "a" * 1024]
    held = [mcp_redis.lock(n, timeout=5) for n in names]
    for h in held:
        assert h.acquire(blocking=False)
    keys = {h.key for h in held}
    assert len(keys) == len(names) and all(k.startswith("mcp:") for k in keys)
    for h in held:
        h.release()


def test_lock_keys_share_one_slot_and_every_one_has_a_ttl(redis_mode: str) -> None:
    r = raw(redis_mode)
    holder = mcp_redis.agent_lock("slotted", timeout=10, fencing=True)  # the fencing counter too
    holder.acquire()
    seen: List[str] = []
    waiter = threading.Thread(target=lambda: seen.append(str(mcp_redis.agent_lock("slotted", fencing=True).acquire())))
    waiter.start()
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="a queued waiter")
    # The process's liveness key (one per client and process, not per lock) lives apart, with a TTL.
    liveness = r.keys("*lock-live:*")
    assert len(liveness) == 1 and 0 < r.pttl(liveness[0]) <= 1500
    keys = [k for k in r.keys("*") if k not in liveness]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(holder.key.encode())}
    assert [k for k in keys if r.pttl(k) < 0] == []
    assert 0 < r.pttl(holder.key + "#fence") <= FENCE_TTL * 1000
    holder.release()
    waiter.join(5)
    assert seen == ["True"]
    keys = [k for k in r.keys("*") if k not in liveness]
    assert {key_slot(k.encode()) for k in keys} == {key_slot(holder.key.encode())}
    assert holder.key + "#fence" in keys and [k for k in keys if r.pttl(k) == -1] == []


# -- waiting: signalled, fair, bounded by the lease --------------------------------------
def test_waiter_is_woken_by_release_not_by_polling(redis_mode: str) -> None:
    r = raw(redis_mode)
    holder = mcp_redis.lock("signal", timeout=10)
    holder.acquire()
    entered: List[float] = []

    def wait() -> None:
        waiter = mcp_redis.lock("signal", timeout=10)
        waiter.acquire(blocking_timeout=5)
        entered.append(time.perf_counter())
        waiter.release()

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="a queued waiter")
    before = evalsha_calls(r)
    time.sleep(0.5)  # the waiter blocks in BLPOP meanwhile; it must not retry
    assert evalsha_calls(r) - before <= 1
    holder.release()
    released = time.perf_counter()
    thread.join(5)
    assert entered and entered[0] - released < 0.1


def test_handoff_to_a_blocked_waiter_is_fast(redis_mode: str) -> None:
    """Median over 10 handoffs from release() returning to the waiter entering."""
    gaps = []
    for i in range(10):
        holder = mcp_redis.lock(f"hand{i}", timeout=10)
        holder.acquire()
        entered: List[float] = []
        ready = threading.Event()

        def wait(name: str = f"hand{i}") -> None:
            waiter = mcp_redis.lock(name, timeout=10)
            ready.set()
            waiter.acquire(blocking_timeout=5)
            entered.append(time.perf_counter())
            waiter.release()

        thread = threading.Thread(target=wait)
        thread.start()
        ready.wait()
        wait_for(lambda: raw(redis_mode).llen(holder.key + "#queue") == 1, timeout=5, what="queued")
        holder.release()
        released = time.perf_counter()
        thread.join(5)
        gaps.append(entered[0] - released)
    assert statistics.median(gaps) < 0.02


def test_eight_threads_without_pause_take_turns(redis_mode: str) -> None:
    order: List[int] = []
    rounds = 40
    barrier = threading.Barrier(8)

    def run(n: int) -> None:
        held = mcp_redis.lock("fair", timeout=10, blocking_timeout=30)
        barrier.wait()
        for _ in range(rounds):
            with held:
                order.append(n)
                time.sleep(0.0002)  # a section does some I/O; none between sections

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(order) == 8 * rounds
    longest = streak = 1
    for a, b in zip(order, order[1:]):
        streak = streak + 1 if a == b else 1
        longest = max(longest, streak)
    assert longest <= 10


def test_waiter_that_gave_up_does_not_delay_the_next(redis_mode: str) -> None:
    r = raw(redis_mode)
    holder = mcp_redis.lock("gaveup", timeout=10)
    holder.acquire()
    impatient = threading.Thread(target=lambda: mcp_redis.lock("gaveup").acquire(blocking_timeout=0.2))
    impatient.start()
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="first waiter queued")
    entered: List[float] = []

    def patient() -> None:
        held = mcp_redis.lock("gaveup", timeout=10)
        held.acquire(blocking_timeout=10)
        entered.append(time.perf_counter())
        held.release()

    second = threading.Thread(target=patient)
    second.start()
    impatient.join(5)
    wait_for(lambda: r.lrange(holder.key + "#queue", 0, -1) and r.llen(holder.key + "#queue") == 1,
             timeout=5, what="only the patient waiter queued")
    holder.release()
    released = time.perf_counter()
    second.join(5)
    assert entered and entered[0] - released < HANDOFF_GRACE / 2


def _spawn(target: Any, *args: Any) -> Any:
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


@pytest.mark.long
def test_killed_holder_blocks_others_no_longer_than_its_lease(redis_mode: str) -> None:
    """Median over 3 holders SIGKILLed while holding: waiters enter within 50 ms of lease end."""
    r = raw(redis_mode)
    lease = 1.0
    ready = SPAWN.Queue()
    names = [f"crash{i}" for i in range(3)]
    procs = [_spawn(workers_locks.hold_forever, {"redis_url": redis_mode}, n, lease, ready) for n in names]
    try:
        for _ in names:
            ready.get(timeout=60)
        entered: Dict[str, float] = {}

        def wait(name: str) -> None:
            with mcp_redis.agent_lock(name, timeout=5, blocking_timeout=30):
                entered[name] = time.monotonic()

        waiters = [threading.Thread(target=wait, args=(n,)) for n in names]
        for w in waiters:
            w.start()
        keys = [mcp_redis.agent_lock(n).key for n in names]
        wait_for(lambda: all(r.llen(k + "#queue") == 1 for k in keys), timeout=10, what="queued waiters")
        ends = {}
        for name, key, proc in zip(names, keys, procs):
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            before = time.monotonic()
            ends[name] = before + r.pttl(key) / 1000
        for w in waiters:
            w.join(10)
        lags = [entered[n] - ends[n] for n in names]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    print("lags after lease end (s):", lags)
    assert statistics.median(lags) < 0.05, lags
    assert max(lags) < 1.0, lags


# -- mutual exclusion across processes -----------------------------------------------
def _run_mutex(url: str, processes: int, threads: int, sections: int, lease: Any,
               long_every: int = 0, long_sleep: float = 0.0) -> Dict[str, int]:
    results = SPAWN.Queue()
    procs = [
        _spawn(workers_locks.mutex_worker, {"redis_url": url}, "rmw", threads, sections, lease,
               "test:counter", long_every, long_sleep, results)
        for _ in range(processes)
    ]
    totals = {"sections": 0, "fence_not_increasing": 0, "lost": 0, "errors": 0}
    try:
        for _ in procs:
            for k, v in results.get(timeout=240).items():
                totals[k] += v
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return totals


@pytest.mark.slow
@pytest.mark.long
def test_four_processes_by_four_threads_lose_no_update(redis_mode: str) -> None:
    totals = _run_mutex(redis_mode, 4, 4, 320, None)
    count = int(raw(redis_mode).get("test:counter").split(",")[0])
    assert totals == {"sections": 5120, "fence_not_increasing": 0, "lost": 0, "errors": 0}
    assert count == 5120


@pytest.mark.slow
@pytest.mark.long
def test_leases_shorter_than_the_work_are_renewed_and_lose_no_update(redis_mode: str) -> None:
    # Lease 0.4 s for all 2,560 sections; the last section of each thread holds
    # 0.45 s, longer than the lease, so only renewal keeps it.
    totals = _run_mutex(redis_mode, 4, 4, 160, 0.4, long_every=160, long_sleep=0.45)
    count = int(raw(redis_mode).get("test:counter").split(",")[0])
    assert totals == {"sections": 2560, "fence_not_increasing": 0, "lost": 0, "errors": 0}
    assert count == 2560
    # Left behind: the fencing counter only (a release leaves no record), and it expires.
    assert raw(redis_mode).keys("mcp:agent-lock:*") == ["mcp:agent-lock:{rmw}#fence"]
    assert 0 < raw(redis_mode).pttl("mcp:agent-lock:{rmw}#fence") <= FENCE_TTL * 1000


def test_fencing_tokens_strictly_increase_across_processes(redis_mode: str) -> None:
    totals = _run_mutex(redis_mode, 2, 2, 25, 5.0)
    assert totals["sections"] == 100 and totals["fence_not_increasing"] == 0


# -- renewal --------------------------------------------------------------------------
def test_agent_lock_renews_its_lease_while_the_block_runs(redis_mode: str) -> None:
    r = raw(redis_mode)
    with mcp_redis.agent_lock("long", timeout=0.5) as held, mcp_redis.agent_lock("long2", timeout=0.5):
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert r.exists(held.key)
            time.sleep(0.05)
        assert held.owned() and not held.lost
        watchdogs = [t for t in threading.enumerate() if t.name == "mcp_redis-lock-watchdog"]
        assert len(watchdogs) == 1
    assert METRICS.counter("lock_renew_total", outcome="renewed") >= 4


def test_plain_lock_is_not_renewed_unless_asked(redis_mode: str) -> None:
    r = raw(redis_mode)
    plain = mcp_redis.lock("plain", timeout=0.4)
    renewing = mcp_redis.lock("renewing", timeout=0.4, auto_renew=True)
    plain.acquire()
    renewing.acquire()
    wait_for(lambda: not r.exists(plain.key), timeout=5, what="plain lease end")
    time.sleep(0.3)
    assert renewing.owned()
    renewing.release()
    with pytest.raises(LockNotOwned):
        plain.release()


def test_lost_lease_sets_the_flag_and_release_raises(redis_mode: str) -> None:
    r = raw(redis_mode)
    with pytest.raises(LockNotOwned):
        with mcp_redis.agent_lock("stolen", timeout=0.3) as held:
            r.set(held.key, "someone-else", px=10_000)  # a takeover behind our back
            assert held.lost_event.wait(2)
            assert held.lost
    assert r.get(held.key) == "someone-else"
    assert METRICS.counter("lock_lost_total", backend="redis") == 1


# -- reentrancy and threads ---------------------------------------------------------------
def test_nested_agent_lock_in_one_thread_enters_at_once(redis_mode: str) -> None:
    r = raw(redis_mode)
    other_entered = threading.Event()
    with mcp_redis.agent_lock("nest") as outer:
        start = time.monotonic()
        with mcp_redis.agent_lock("nest", blocking_timeout=0) as inner:
            with outer:
                assert time.monotonic() - start < 0.5
                assert inner.fencing_token == outer.fencing_token
        assert r.exists(outer.key) and outer.owned()

        def other() -> None:
            with mcp_redis.agent_lock("nest", blocking_timeout=10):
                other_entered.set()

        t = threading.Thread(target=other)
        t.start()
        assert not other_entered.wait(0.2)
    assert other_entered.wait(5)
    t.join(5)


def test_shared_lock_object_never_releases_another_threads_hold(redis_mode: str) -> None:
    shared = mcp_redis.lock("shared", timeout=10)
    assert shared.acquire()
    errors: List[BaseException] = []

    def intruder() -> None:
        try:
            shared.release()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        errors.append(shared.acquire(blocking_timeout=0.05))  # type: ignore[arg-type]

    t = threading.Thread(target=intruder)
    t.start()
    t.join(5)
    assert isinstance(errors[0], LockNotOwned) and errors[1] is False
    assert shared.owned()
    shared.release()


def test_state_lock_manager_takes_the_agent_lock_and_is_not_reentrant(redis_mode: str, tmp_path: Path) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    with mcp_redis.agent_lock("legacy"):
        # Same key as agent_lock, and not reentrant (like the legacy manager): even this thread waits.
        with pytest.raises(TimeoutError, match="legacy"):
            with manager.acquire_agent_lock("legacy", timeout=0.1, max_retries=1):
                pytest.fail("entered a lock this thread already holds through agent_lock")
    with manager.acquire_agent_lock("legacy", timeout=0.1) as held:
        assert held is None  # the legacy `as` target
        with pytest.raises(TimeoutError):
            with manager.acquire_agent_lock("legacy", timeout=0.1, max_retries=1):
                pytest.fail("a nested acquire of the same agent entered")
        got: List[bool] = []
        t = threading.Thread(target=lambda: got.append(mcp_redis.agent_lock("legacy", blocking_timeout=0.1).acquire()))
        t.start()
        t.join(5)
        assert got == [False]
    assert not raw(redis_mode).exists(mcp_redis.agent_lock("legacy").key)


# -- fork ----------------------------------------------------------------------------------
def _in_child(fn: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_child_cannot_release_or_free_parents_lock(redis_mode: str) -> None:
    r = raw(redis_mode)
    held = mcp_redis.agent_lock("forked", timeout=5)
    held.acquire()
    token = r.get(held.key)

    def child_release() -> int:
        try:
            held.release()
        except LockNotOwned:
            return 0 if not held.owned() else 3
        return 2

    def child_exits_the_block() -> int:
        try:
            held.__exit__(None, None, None)
        except LockNotOwned:
            pass
        return 0

    def child_takes_its_own_lock() -> int:
        mine = mcp_redis.agent_lock("child-own", timeout=0.6)
        mine.acquire()
        time.sleep(0.8)  # its own watchdog must renew it
        ok = mine.owned()
        mine.release()
        return 0 if ok and not mcp_redis.agent_lock("forked", blocking_timeout=0).acquire() else 4

    assert _in_child(child_release) == 0
    assert _in_child(child_exits_the_block) == 0
    assert _in_child(child_takes_its_own_lock) == 0
    assert r.get(held.key) == token and held.owned()
    held.release()


# -- Redis down -------------------------------------------------------------------------
def test_redis_down_fails_closed_by_default() -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1)
    with pytest.raises(BackendUnavailable):
        mcp_redis.agent_lock("down").acquire()
    assert METRICS.counter("lock_backend_unavailable_total", backend="redis") == 1


def test_redis_down_falls_back_to_a_local_file_lock_when_asked() -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1, lock_fallback="local")
    with mcp_redis.agent_lock("down") as held:
        assert held.backend == "local"
        got: List[bool] = []
        t = threading.Thread(target=lambda: got.append(mcp_redis.agent_lock("down", blocking_timeout=0).acquire()))
        t.start()
        t.join(5)
        assert got == [False]
    assert METRICS.counter("lock_fallback_total", to="local") >= 1
    assert METRICS.counter("lock_unsafe_total", backend="local") >= 1


def test_redis_down_falls_back_to_postgres_advisory_locks_when_asked(database_url: str) -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1,
                        database_url=database_url, lock_fallback="postgres")
    # The first fallback grant of an episode waits two leases (see test_locks_fallback.py).
    with mcp_redis.agent_lock("down", timeout=0.5) as held:
        assert held.backend == "postgres" and held.owned()
        first = held.fencing_token
        got: List[bool] = []
        t = threading.Thread(
            target=lambda: got.append(mcp_redis.agent_lock("down", timeout=0.5, blocking_timeout=0.1).acquire()))
        t.start()
        t.join(5)
        assert got == [False]
    with mcp_redis.agent_lock("down", timeout=0.5) as again:
        assert again.fencing_token is not None and first is not None and again.fencing_token > first
    assert METRICS.counter("lock_fallback_total", to="postgres") == 3  # two holds and one refused try


def test_every_queued_waiter_enters_once_in_turn(redis_mode: str) -> None:
    """Three waiters on one holder each enter exactly once, in turn.

    Each through its own client, as three processes would be: the threads of
    one client queue in Redis one at a time (the others wait their turn in
    the process, holding no connection).
    """
    holder = mcp_redis.lock("many", timeout=10)
    holder.acquire()
    done: queue.Queue[int] = queue.Queue()
    clients = [mcp_redis.Client(redis_url=redis_mode) for _ in range(3)]

    def wait(n: int) -> None:
        with mcp_redis.lock("many", timeout=10, blocking_timeout=10, client=clients[n]):
            done.put(n)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: raw(redis_mode).llen(holder.key + "#queue") == 3, timeout=5, what="three queued")
        holder.release()
        for t in threads:
            t.join(10)
    finally:
        for client in clients:
            client.close()
    assert sorted(done.get_nowait() for _ in range(3)) == [0, 1, 2]


def test_threads_of_one_process_queue_in_redis_one_at_a_time(redis_mode: str) -> None:
    """Waiters of one client on one lock: one in Redis's queue, the rest wait their turn in the process."""
    holder = mcp_redis.lock("crowd", timeout=10)
    holder.acquire()
    entered: List[int] = []
    turns = runtime(mcp_redis.default_client()).primary._turns._turns  # type: ignore[attr-defined]

    def wait(n: int) -> None:
        with mcp_redis.lock("crowd", timeout=10, blocking_timeout=10):
            entered.append(n)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    r = raw(redis_mode)
    wait_for(lambda: holder.key in turns and turns[holder.key].users == 5, timeout=5, what="all five waiting")
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="one queued")
    assert r.llen(holder.key + "#queue") == 1 and turns[holder.key].users == 5
    holder.release()
    for t in threads:
        t.join(10)
    assert sorted(entered) == [0, 1, 2, 3, 4]


def test_a_thread_interrupted_while_waiting_its_turn_neither_keeps_nor_loses_it(redis_mode: str) -> None:
    """A signal handler that raises in a thread waiting its turn (a request timeout, Ctrl-C)."""
    holder = mcp_redis.lock("interrupted", timeout=10)
    holder.acquire()
    turns = runtime(mcp_redis.default_client()).primary._turns._turns  # type: ignore[attr-defined]
    r = raw(redis_mode)
    entered: List[int] = []

    def wait() -> None:
        with mcp_redis.lock("interrupted", timeout=10, blocking_timeout=10):
            entered.append(1)

    queued = threading.Thread(target=wait)
    queued.start()
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="the turn's holder queued in Redis")

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            mcp_redis.lock("interrupted", timeout=10, blocking_timeout=5).acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    holder.release()
    queued.join(10)
    assert entered == [1]
    assert holder.key not in turns, "the turn was handed to the interrupted thread and never came back"
    holder.acquire()  # the next waiter of this process still gets its turn
    again = threading.Thread(target=wait)
    again.start()
    wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=5, what="the next waiter queued in Redis")
    holder.release()
    again.join(10)
    assert entered == [1, 1]


def test_reconfiguring_forgets_reentrancy_of_earlier_holds(redis_mode: str) -> None:
    held = mcp_redis.agent_lock("gen", timeout=5)
    held.acquire()
    mcp_redis.configure(redis_url=redis_mode)  # drops clients; the hold stays in Redis
    with pytest.raises(LockTimeout):
        with mcp_redis.agent_lock("gen", blocking_timeout=0):
            pass
    held.release()  # the earlier hold can still be given back
    with mcp_redis.agent_lock("gen", blocking_timeout=0):
        pass


def test_a_hold_from_before_configure_loses_its_liveness_and_can_be_taken_over(redis_mode: str) -> None:
    held = mcp_redis.agent_lock("gen-live", timeout=30)
    held.acquire()
    mcp_redis.configure(redis_url=redis_mode)  # nothing beats the old client's liveness any more
    started = time.monotonic()
    with mcp_redis.agent_lock("gen-live", blocking_timeout=10):
        waited = time.monotonic() - started
    assert waited < 10, "taken over as a dead holder's, long before the 30 s lease"
    with pytest.raises(LockNotOwned):
        held.release()


def test_waiter_killed_while_queued_delays_the_next_by_at_most_the_handoff_grace(redis_mode: str) -> None:
    r = raw(redis_mode)
    holder = mcp_redis.agent_lock("deadwaiter", timeout=10)
    holder.acquire()
    doomed = _spawn(workers_locks.wait_forever, {"redis_url": redis_mode}, "deadwaiter")
    try:
        wait_for(lambda: r.llen(holder.key + "#queue") == 1, timeout=60, what="the doomed waiter queued")
        entered: List[float] = []

        def patient() -> None:
            with mcp_redis.agent_lock("deadwaiter", blocking_timeout=10):
                entered.append(time.monotonic())

        t = threading.Thread(target=patient)
        t.start()
        wait_for(lambda: r.llen(holder.key + "#queue") == 2, timeout=5, what="the patient waiter queued")
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(10)
        holder.release()  # reserves the lock for the dead waiter first
        released = time.monotonic()
        t.join(10)
    finally:
        if doomed.is_alive():
            doomed.kill()
    assert entered and entered[0] - released < HANDOFF_GRACE + 0.5


def test_thread_local_false_lets_another_thread_release_as_in_redis_py(redis_mode: str) -> None:
    shared = mcp_redis.lock("handover", timeout=10, thread_local=False)
    assert shared.acquire()
    t = threading.Thread(target=shared.release)
    t.start()
    t.join(5)
    assert not shared.locked()


def test_postgres_fallback_without_database_url_is_refused_up_front() -> None:
    with pytest.raises(mcp_redis.ConfigurationError, match="lock_fallback"):
        mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", lock_fallback="postgres")


# -- Redis failing under a held or awaited lock ------------------------------------------
def test_redis_restart_under_a_held_agent_lock_flags_it_lost(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    with pytest.raises(LockNotOwned):
        with mcp_redis.agent_lock("restarted", timeout=0.6) as held:
            server.restart()  # comes back empty: the lease is gone
            assert held.lost_event.wait(5)
    assert METRICS.counter("lock_lost_total", backend="redis") == 1


def test_redis_dying_under_a_waiter_fails_it_closed_promptly(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    holder = mcp_redis.lock("dying", timeout=30)
    holder.acquire()
    outcome: List[Any] = []

    def wait() -> None:
        start = time.monotonic()
        try:
            mcp_redis.lock("dying").acquire(blocking_timeout=20)
        except BackendUnavailable as exc:
            outcome.append((exc, time.monotonic() - start))

    t = threading.Thread(target=wait)
    t.start()
    wait_for(lambda: server.client().llen(holder.key + "#queue") == 1, timeout=5, what="queued")
    server.kill()
    t.join(15)
    assert outcome and isinstance(outcome[0][0], BackendUnavailable) and outcome[0][1] < 10
