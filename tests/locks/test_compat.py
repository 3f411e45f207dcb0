"""mcp_redis.compat.StateLockManager: the legacy server's call sites, sync and async, on both backends.

The legacy test file itself runs in tests/legacy/; these tests state what it
does not: the async variant's ownership, cancellation and loop behaviour, the
legacy `test_critical_fixes.py::test_state_locking` check, bad input, and the
4-process harness of the legacy call pattern around a PostgreSQL row.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Tuple

import psycopg2
import pytest

import mcp_redis
from mcp_redis import compat
from mcp_redis.compat import StateLockManager
from mcp_redis.testing import wait_for
from tests import workers_compat

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Dict[str, Any]:
    """Settings of one backend (also applied here): locks=local, or Redis."""
    if request.param == "redis":
        settings: Dict[str, Any] = {"redis_url": request.getfixturevalue("redis_url"), "locks": "redis"}
    else:
        settings = {"locks": "local", "lock_dir": str(tmp_path / "lib-locks")}
    mcp_redis.configure(**settings)
    return settings


def held_elsewhere(manager: StateLockManager, agent_id: str) -> bool:
    """True when another thread cannot take `agent_id` at once."""
    got: List[bool] = []

    def probe() -> None:
        try:
            with manager.acquire_agent_lock(agent_id, timeout=0, max_retries=1):
                got.append(True)
        except TimeoutError:
            got.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join(10)
    return got == [False]


# -- the legacy critical-fixes check ----------------------------------------------------------
def test_nested_acquire_of_one_agent_in_one_thread_times_out_like_the_legacy_manager(
        backend: Dict[str, Any], tmp_path: Path) -> None:
    # test_critical_fixes.py::test_state_locking, with its default max_retries.
    manager = StateLockManager(lock_dir=tmp_path)
    with manager.acquire_agent_lock("test_lock_agent", timeout=1.0):
        with pytest.raises(TimeoutError):
            with manager.acquire_agent_lock("test_lock_agent", timeout=0.5):
                pytest.fail("Should not acquire lock twice")
    assert not held_elsewhere(manager, "test_lock_agent")


def test_compat_and_agent_lock_on_one_agent_exclude_each_other(backend: Dict[str, Any], tmp_path: Path) -> None:
    # Migration step 4 mixes both kinds of call site: in local mode compat
    # took only the legacy file, agent_lock only its own, and both held at once.
    manager = StateLockManager(lock_dir=tmp_path)

    def agent_lock_free() -> bool:
        got: List[bool] = []

        def probe() -> None:
            try:
                with mcp_redis.agent_lock("agent-7", blocking_timeout=0):
                    got.append(True)
            except mcp_redis.LockTimeout:
                got.append(False)
        t = threading.Thread(target=probe)
        t.start()
        t.join(10)
        return got == [True]

    with manager.acquire_agent_lock("agent-7", timeout=1, max_retries=1):
        assert not agent_lock_free(), "agent_lock entered while compat held the agent"
    assert agent_lock_free()
    with mcp_redis.agent_lock("agent-7"):
        assert held_elsewhere(manager, "agent-7"), "compat entered while agent_lock held the agent"
    assert not held_elsewhere(manager, "agent-7")


def test_bad_max_retries_is_refused_naming_it_and_takes_nothing(backend: Dict[str, Any], tmp_path: Path) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    for bad, kind in [(0, ValueError), (-1, ValueError), ("3", TypeError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(kind, match="max_retries"):
            manager.acquire_agent_lock("a", max_retries=bad)
        with pytest.raises(kind, match="max_retries"):
            manager.acquire_agent_lock_async("a", max_retries=bad)
    assert not held_elsewhere(manager, "a")


# -- the async variant -------------------------------------------------------------------------
def test_two_tasks_on_one_loop_exclude_each_other(backend: Dict[str, Any], tmp_path: Path) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    inside: List[int] = [0]
    overlaps: List[int] = []

    async def section() -> None:
        for _ in range(20):
            async with manager.acquire_agent_lock_async("shared", timeout=5.0, max_retries=3):
                inside[0] += 1
                if inside[0] > 1:
                    overlaps.append(inside[0])
                await asyncio.sleep(0)  # let the other task run while we hold it
                inside[0] -= 1

    async def main() -> None:
        await asyncio.gather(section(), section(), section())

    asyncio.run(main())
    assert overlaps == []
    assert not held_elsewhere(manager, "shared")


def test_a_task_releases_from_a_different_worker_thread_than_it_acquired_on(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    threads: Dict[str, int] = {}
    attempt, release = compat._Acquisition.attempt, compat._Acquisition.release

    def recording_attempt(self: Any, *wait: Any) -> bool:
        threads["attempt"] = threading.get_ident()
        return attempt(self, *wait)

    def recording_release(self: Any) -> None:
        threads["release"] = threading.get_ident()
        release(self)

    monkeypatch.setattr(compat._Acquisition, "attempt", recording_attempt)
    monkeypatch.setattr(compat._Acquisition, "release", recording_release)

    async def main() -> bool:
        async with manager.acquire_agent_lock_async("across", timeout=5.0, max_retries=1):
            return held_elsewhere(manager, "across")

    assert asyncio.run(main()) is True
    assert threads["attempt"] != threads["release"] != threading.get_ident()
    monkeypatch.undo()
    assert not held_elsewhere(manager, "across")


def test_the_event_loop_runs_while_a_task_waits_for_the_lock(backend: Dict[str, Any], tmp_path: Path) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    holding, let_go = threading.Event(), threading.Event()

    def holder() -> None:
        with manager.acquire_agent_lock("busy", timeout=5.0):
            holding.set()
            let_go.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)

    async def main() -> None:
        async def waiter() -> None:
            async with manager.acquire_agent_lock_async("busy", timeout=20.0, max_retries=1):
                pass

        waiting = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # the waiter is now blocked in a worker thread...
        let_go.set()  # ...and only a running loop gets here to free the lock it waits for
        await waiting

    asyncio.run(main())
    t.join(10)


def test_cancelling_a_task_while_it_waits_leaves_nothing_held(backend: Dict[str, Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    holding, let_go, waiting_in_worker = threading.Event(), threading.Event(), threading.Event()
    attempt = compat._Acquisition.attempt

    def signalling_attempt(self: Any, *wait: Any) -> bool:
        if threading.current_thread() is not t:
            waiting_in_worker.set()
        return attempt(self, *wait)

    monkeypatch.setattr(compat._Acquisition, "attempt", signalling_attempt)

    def holder() -> None:
        with manager.acquire_agent_lock("cancelled", timeout=5.0):
            holding.set()
            let_go.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)

    async def main() -> None:
        async def waiter() -> None:
            async with manager.acquire_agent_lock_async("cancelled", timeout=10.0, max_retries=1):
                pytest.fail("a cancelled task entered")

        waiting = asyncio.ensure_future(waiter())
        assert await asyncio.get_running_loop().run_in_executor(None, waiting_in_worker.wait, 10)
        waiting.cancel()  # while its worker thread waits for the lock
        with pytest.raises(asyncio.CancelledError):
            await waiting
        let_go.set()  # the worker's wait now succeeds: its grant must be given back

    asyncio.run(main())
    t.join(10)
    # The abandoned worker gets the lock once the holder leaves, and gives it back.
    with manager.acquire_agent_lock("cancelled", timeout=10.0, max_retries=1):
        pass


def _busy(manager: StateLockManager, agent_id: str) -> Tuple[threading.Thread, threading.Event]:
    """A thread of this process holds `agent_id` until the returned event is set."""
    holding, let_go = threading.Event(), threading.Event()

    def holder() -> None:
        with manager.acquire_agent_lock(agent_id, timeout=5.0):
            holding.set()
            let_go.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)
    return t, let_go


def _count_workers(monkeypatch: pytest.MonkeyPatch, holder: threading.Thread) -> Tuple[List[int], List[int]]:
    """([attempts in worker threads now], [most at once]), counting every attempt but `holder`'s."""
    attempt, in_worker, most = compat._Acquisition.attempt, [0], [0]
    count = threading.Lock()

    def counted_attempt(self: Any, *wait: Any) -> bool:
        if threading.current_thread() is holder:
            return attempt(self, *wait)
        with count:
            in_worker[0] += 1
            most[0] = max(most[0], in_worker[0])
        try:
            return attempt(self, *wait)
        finally:
            with count:
                in_worker[0] -= 1

    monkeypatch.setattr(compat._Acquisition, "attempt", counted_attempt)
    return in_worker, most


def _record_releases(monkeypatch: pytest.MonkeyPatch, agent_id: str) -> List[threading.Thread]:
    """The thread of each `_Acquisition.release` of `agent_id`, recorded once it returned."""
    release, released_on = compat._Acquisition.release, []

    def recording_release(self: Any) -> None:
        release(self)
        if self.agent_id == agent_id:
            released_on.append(threading.current_thread())

    monkeypatch.setattr(compat._Acquisition, "release", recording_release)
    return released_on


def test_hundreds_of_tasks_waiting_on_one_agent_hold_one_worker_and_delay_no_other_agent(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tasks of a loop waiting for one agent queue in asyncio behind the one that waits in a
    worker thread: 400 of them (more than the 256 worker threads) leave the pool to the others,
    and a free agent is taken within its own timeout; each waiter's timeout still bounds it."""
    manager = StateLockManager(lock_dir=tmp_path)
    t, let_go = _busy(manager, "hot")
    in_worker, most = _count_workers(monkeypatch, t)

    async def main() -> None:
        async def hot(timeout: float) -> bool:
            try:
                async with manager.acquire_agent_lock_async("hot", timeout=timeout, max_retries=1):
                    return True
            except TimeoutError:
                return False

        loop = asyncio.get_running_loop()
        waiting = [asyncio.ensure_future(hot(30.0)) for _ in range(400)]
        deadline = loop.time() + 30
        def queued() -> int:
            gate = compat._GATES.get(loop, {}).get("hot")
            return 0 if gate is None else int(gate.held) + len(gate.waiters)

        while (queued() < 400 or in_worker[0] < 1) and loop.time() < deadline:
            await asyncio.sleep(0.01)  # until all 400 have queued, the first waiting in a worker
        short = asyncio.ensure_future(hot(0.5))  # queued behind the others: its own timeout ends it
        await asyncio.sleep(0.05)
        assert most[0] == 1  # one task of the 401 waits in a worker thread
        started = loop.time()
        async with manager.acquire_agent_lock_async("cold", timeout=2.0, max_retries=1):
            assert loop.time() - started < 2.0  # within its own timeout, not behind the hot agent's tasks
        assert await short is False and loop.time() - started < 2.0
        let_go.set()
        assert all(await asyncio.gather(*waiting))  # each in turn, FIFO through the one worker

    asyncio.run(main())
    t.join(10)


@pytest.mark.parametrize("max_retries", [1, 3])
def test_with_every_worker_busy_on_other_agents_a_task_still_ends_within_its_timeout(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_retries: int) -> None:
    """More different busy agents waited on than worker threads: an attempt still queued for a
    thread when its task's `timeout` ends is dropped unrun (it takes nothing), so the task ends
    within its `timeout` per attempt (and the backoffs between them, which never queue for a
    thread), not after the other agents' waits."""
    monkeypatch.setattr(compat, "_POOL_SIZES", {"wait": 2, "release": 8})
    monkeypatch.setattr(compat, "_POOLS", {})  # a 2-thread pool for this test
    manager = StateLockManager(lock_dir=tmp_path)
    holders = [_busy(manager, agent) for agent in ("a", "b", "c")]
    t, _ = holders[0]
    in_worker, _ = _count_workers(monkeypatch, t)
    holders_threads = {h for h, _ in holders}

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def take(agent_id: str, timeout: float, retries: int = 1) -> bool:
            try:
                async with manager.acquire_agent_lock_async(agent_id, timeout=timeout, max_retries=retries):
                    return True
            except TimeoutError:
                return False

        long_waits = [asyncio.ensure_future(take(agent, 30.0)) for agent in ("a", "b")]
        deadline = loop.time() + 30
        while in_worker[0] < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)  # both workers wait, for "a" and "b"
        assert in_worker[0] == 2
        started = loop.time()
        assert await take("c", 0.5, max_retries) is False  # no worker ever free for it
        # 3 attempts: 3 x 0.55 s and backoffs of 0.2 s and 0.4 s; not the 30 s of the waits ahead.
        assert loop.time() - started < 1.5 * max_retries + 1.5
        for _, let_go in holders:
            let_go.set()
        assert await asyncio.gather(*long_waits) == [True, True]

    asyncio.run(main())
    for h in holders_threads:
        h.join(10)
    assert not held_elsewhere(manager, "c")


def test_a_task_cancelled_as_its_turn_comes_is_cancelled_and_passes_its_turn_on(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancellation and the turn arrive together (the gate is handed to a task that has just
    been cancelled): the task raises CancelledError without entering, and the next one enters."""
    manager = StateLockManager(lock_dir=tmp_path)
    entered: List[str] = []
    cancel_on_handover: List[Any] = []
    leave = compat._Gate.leave

    def leave_then_cancel(self: Any) -> None:
        leave(self)
        while cancel_on_handover:
            cancel_on_handover.pop().cancel()  # in the same loop iteration as the handover

    monkeypatch.setattr(compat._Gate, "leave", leave_then_cancel)

    async def main() -> None:
        async def task(name: str, hold: float) -> None:
            async with manager.acquire_agent_lock_async("handover", timeout=10.0, max_retries=1):
                entered.append(name)
                await asyncio.sleep(hold)

        first = asyncio.ensure_future(task("first", 0.2))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(task("second", 0))
        third = asyncio.ensure_future(task("third", 0))
        await asyncio.sleep(0.05)  # both queued behind the first's attempt
        cancel_on_handover.append(second)
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        await third
        assert not compat._GATES.get(asyncio.get_running_loop())

    asyncio.run(main())
    assert entered == ["first", "third"]
    assert not held_elsewhere(manager, "handover")


def test_a_task_arriving_as_the_turn_is_handed_on_queues_within_its_own_timeout(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer arriving in the instant the turn passes to a waiting task neither passes the
    queue nor waits past its own timeout."""
    manager = StateLockManager(lock_dir=tmp_path)
    holding, let_go = threading.Event(), threading.Event()
    newcomer: List[Any] = []
    leave = compat._Gate.leave

    def holder() -> None:
        with manager.acquire_agent_lock("turns", timeout=5.0):
            holding.set()
            let_go.wait(30)
            time.sleep(0.3)  # the agent stays busy after the first task's attempt gives up

    async def arrive(timeout: float) -> Tuple[bool, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with manager.acquire_agent_lock_async("turns", timeout=timeout, max_retries=1):
                return True, loop.time() - started
        except TimeoutError:
            return False, loop.time() - started

    def leave_then_arrive(self: Any) -> None:
        leave(self)
        if not newcomer:
            newcomer.append(asyncio.ensure_future(arrive(0.05)))

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)
    monkeypatch.setattr(compat._Gate, "leave", leave_then_arrive)

    async def main() -> None:
        first = asyncio.ensure_future(arrive(0.1))  # its attempt gives up: the turn passes on
        await asyncio.sleep(0.02)
        patient = asyncio.ensure_future(arrive(10.0))
        assert await first == (False, pytest.approx(0.1, abs=0.09))
        got, waited = await newcomer[0]
        assert got is False and waited < 0.5  # its 0.05 s, not the patient task's wait for the holder
        let_go.set()
        assert (await patient)[0] is True

    asyncio.run(main())
    t.join(10)


def test_cancelled_waiters_keep_one_worker_for_the_agent_and_their_grant_is_given_back(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handlers with their own short deadlines, cancelled while waiting for a busy agent: the
    first one's worker keeps the agent's turn until its attempt ends (the others stay queued
    and leave no worker behind), a free agent is taken at once, and the late grant is given
    back (off the loop's thread)."""
    manager = StateLockManager(lock_dir=tmp_path)
    t, let_go = _busy(manager, "busy")
    _, most = _count_workers(monkeypatch, t)
    released_on = _record_releases(monkeypatch, "busy")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100):
            waiter = asyncio.ensure_future(manager.acquire_agent_lock_async("busy", timeout=20.0,
                                                                            max_retries=1).__aenter__())
            await asyncio.sleep(0.005)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert most[0] == 1  # the first cancelled task's worker, still waiting; no other
        started = loop.time()
        async with manager.acquire_agent_lock_async("free", timeout=2.0, max_retries=1):
            assert loop.time() - started < 2.0
        let_go.set()  # the worker's attempt now succeeds, for a task that is gone: given back
        await loop.run_in_executor(None, t.join, 10)
        deadline = loop.time() + 10
        while not given_back() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def given_back() -> List[threading.Thread]:
        return [th for th in released_on if th is not t]  # not the holder's own release

    asyncio.run(main())
    assert len(given_back()) == 1 and threading.main_thread() not in given_back()
    monkeypatch.undo()
    assert not held_elsewhere(manager, "busy")


def test_a_grant_whose_task_is_cancelled_as_it_lands_is_given_back_off_the_loop_thread(
        backend: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    attempt = compat._Acquisition.attempt
    released_on = _record_releases(monkeypatch, "landing")
    cancel: List[Any] = []

    def granted_then_cancelled(self: Any, *wait: Any) -> bool:
        got = attempt(self, *wait)
        loop, task = cancel[0]
        loop.call_soon_threadsafe(task.cancel)  # before the loop hears of the grant
        return got

    monkeypatch.setattr(compat._Acquisition, "attempt", granted_then_cancelled)

    async def main() -> None:
        async def enter() -> None:
            async with manager.acquire_agent_lock_async("landing", timeout=5.0, max_retries=1):
                pytest.fail("a cancelled task entered")

        task = asyncio.ensure_future(enter())
        cancel.append((asyncio.get_running_loop(), task))
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = asyncio.get_running_loop().time() + 10
        while not released_on and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(released_on) == 1 and released_on[0] is not threading.main_thread()
    monkeypatch.undo()
    assert not held_elsewhere(manager, "landing")


@pytest.mark.parametrize("grant", ["after_close", "while_stopped"])
def test_a_grant_no_task_will_take_because_its_loop_closed_is_given_back(
        backend: Dict[str, Any], tmp_path: Path, grant: str) -> None:
    """A loop closed with tasks still waiting (run_until_complete, then close; asyncio.run cancels
    them instead): a grant the worker gets after the close is released at once; one it got while
    the loop was stopped is released at the next use of the async lock from another loop, which
    also lets the closed loop go. Neither is renewed for ever."""
    import gc

    manager = StateLockManager(lock_dir=tmp_path)
    t, let_go = _busy(manager, "closed-loop")
    loop = asyncio.new_event_loop()

    async def waiter(agent_id: str) -> None:
        async with manager.acquire_agent_lock_async(agent_id, timeout=5.0, max_retries=1):
            pass

    tasks = [loop.create_task(waiter("closed-loop")) for _ in range(3)]
    loop.run_until_complete(asyncio.sleep(0.2))  # the first waits in a worker, two in the gate
    if grant == "while_stopped":
        let_go.set()

        def granted(gate: Any = compat._GATES[loop]["closed-loop"]) -> bool:
            return gate.current is not None and bool(gate.current[0].done())

        wait_for(granted, 10, what="the grant")
        del granted
    loop.close()
    let_go.set()
    t.join(10)
    if grant == "while_stopped":
        asyncio.run(waiter("another"))
    with manager.acquire_agent_lock("closed-loop", timeout=5.0, max_retries=1):
        pass
    closed = weakref.ref(loop)
    del loop, tasks
    gc.collect()
    assert grant == "after_close" or closed() is None


def test_a_grant_made_while_its_loop_is_stopped_is_given_back_and_the_task_tries_again_when_it_runs(
        backend: Dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A task waits; its loop stops (run_until_complete returned) and is neither run nor closed;
    the grant arrives. Nothing would ever take it: the agent stayed locked, renewed, for the life
    of the process. Now it is given back; when the loop runs again, the task finds its grant gone
    and takes the lock anew instead of entering without it."""
    manager = StateLockManager(lock_dir=tmp_path)
    t, let_go = _busy(manager, "stopped-loop")
    loop = asyncio.new_event_loop()
    inside: List[bool] = []

    async def waiter() -> None:
        async with manager.acquire_agent_lock_async("stopped-loop", timeout=5.0, max_retries=2):
            inside.append(held_elsewhere(manager, "stopped-loop"))

    try:
        task = loop.create_task(waiter())
        loop.run_until_complete(asyncio.sleep(0.2))  # the task waits in a worker; then the loop stops
        with caplog.at_level("WARNING", logger="mcp_redis.compat"):
            let_go.set()
            t.join(10)
            with manager.acquire_agent_lock("stopped-loop", timeout=10.0, max_retries=1):
                pass  # given back: free for another thread (it stayed taken)
        assert "event loop is not running" in caplog.text
        loop.run_until_complete(task)
        assert inside == [True]  # it entered holding the lock, taken anew
        assert not held_elsewhere(manager, "stopped-loop")
    finally:
        loop.close()


# -- the legacy call pattern, 4 processes x 4 threads, around a PostgreSQL row -----------------------
@pytest.mark.slow
def test_legacy_call_pattern_in_four_processes_loses_no_update(backend: Dict[str, Any], database_url: str,
                                                               tmp_path: Path) -> None:
    agents = [f"agent-{k}" for k in range(8)]
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS rmw_counts")
        cur.execute("CREATE TABLE rmw_counts (agent TEXT PRIMARY KEY, n INT NOT NULL)")
        cur.executemany("INSERT INTO rmw_counts VALUES (%s, 0)", [(a,) for a in agents])
    results = SPAWN.Queue()
    # Per process: 2 threads calling the sync manager, 2 threads each running a loop of 3 tasks.
    sections = 63  # 4 processes x (2 + 2 x 3) workers x 63 = 2,016 sections
    procs = [SPAWN.Process(target=workers_compat.rmw,
                           args=(backend, database_url, str(tmp_path / "legacy-locks"), agents, sections, 2, 2, 3,
                                 results)) for _ in range(4)]
    for p in procs:
        p.start()
    tallies = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    done = sum(t["sections"] for t in tallies)
    assert [t["first_error"] for t in tallies if t["errors"]] == []
    assert done == 4 * 8 * sections
    with conn.cursor() as cur:
        cur.execute("SELECT sum(n) FROM rmw_counts")
        assert cur.fetchone()[0] == done  # 0 lost updates
        cur.execute("DROP TABLE rmw_counts")
    conn.close()


# -- a lock lost while held (redis) -------------------------------------------------------------
def test_a_lock_lost_while_held_raises_on_exit_but_never_hides_the_blocks_own_error(
        redis_mode: str, tmp_path: Path) -> None:
    import redis as redis_py

    r = redis_py.Redis.from_url(redis_mode, decode_responses=True)
    manager = StateLockManager(lock_dir=tmp_path)
    key = mcp_redis.agent_lock("taken").key
    with pytest.raises(mcp_redis.LockNotOwned):
        with manager.acquire_agent_lock("taken", timeout=1.0):
            r.set(key, "someone-else", px=10_000)  # a takeover behind our back
    assert r.get(key) == "someone-else"
    r.delete(key)
    with pytest.raises(ValueError, match="the block's own"):
        with manager.acquire_agent_lock("taken", timeout=1.0):
            r.set(key, "someone-else", px=10_000)
            raise ValueError("the block's own error")
    assert r.get(key) == "someone-else"


def test_is_process_alive_is_the_module_function_and_reachable_from_the_class(tmp_path: Path) -> None:
    """API.md lists `is_process_alive` with StateLockManager: both legacy spellings work."""
    import os
    import subprocess

    from mcp_redis.compat import StateLockManager, is_process_alive

    dead = subprocess.Popen(["true"])
    dead.wait()
    manager = StateLockManager(lock_dir=str(tmp_path))
    for check in (is_process_alive, StateLockManager.is_process_alive, manager.is_process_alive):
        assert check(os.getpid()) is True
        assert check(dead.pid) is False
