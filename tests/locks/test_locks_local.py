"""Locks without Redis: fcntl file locks (local mode), PostgreSQL advisory locks, and off."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

import mcp_redis
from mcp_redis import LockNotOwned, LockTimeout
from mcp_redis.compat import StateLockManager
from mcp_redis.locks import legacyfile
from mcp_redis.locks.file import FileBackend
from mcp_redis.metrics import METRICS
from tests import workers_locks

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def local_mode(tmp_path: Any) -> str:
    lock_dir = str(tmp_path / "locks")
    mcp_redis.configure(lock_dir=lock_dir)
    assert mcp_redis.settings().mode("locks") is mcp_redis.Mode.LOCAL
    return lock_dir


@pytest.fixture
def postgres_mode(database_url: str) -> str:
    mcp_redis.configure(database_url=database_url, locks="postgres")
    return database_url


def _contend(threads: int, rounds: int, name: str = "shared") -> List[int]:
    """Threads take `name` in turn; returns the number of overlaps seen."""
    inside = [0]
    overlaps: List[int] = []
    guard = threading.Lock()

    def run() -> None:
        for _ in range(rounds):
            with mcp_redis.agent_lock(name, blocking_timeout=30):
                with guard:
                    inside[0] += 1
                    if inside[0] > 1:
                        overlaps.append(1)
                time.sleep(0.0005)
                with guard:
                    inside[0] -= 1

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return overlaps


# -- local mode: fcntl file locks ------------------------------------------------------
def test_local_mode_excludes_threads(local_mode: str) -> None:
    assert _contend(4, 25) == []


def test_local_mode_excludes_processes_and_loses_no_update(local_mode: str, tmp_path: Any) -> None:
    counter = str(tmp_path / "counter")
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=workers_locks.mutex_worker,
                      args=({"lock_dir": local_mode}, "rmw", 2, 50, None, counter, 0, 0.0, results), daemon=True)
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    totals: Dict[str, int] = {}
    for _ in procs:
        for k, v in results.get(timeout=120).items():
            totals[k] = totals.get(k, 0) + v
    for p in procs:
        p.join(10)
    assert totals == {"sections": 300, "fence_not_increasing": 0, "lost": 0, "errors": 0}
    with open(counter) as f:
        assert f.read().split(",")[0] == "300"


def test_local_mode_times_out_reenters_and_fences(local_mode: str) -> None:
    with mcp_redis.agent_lock("a") as outer:
        first = outer.fencing_token
        with mcp_redis.agent_lock("a", blocking_timeout=0) as inner:
            assert inner.backend == "local" and inner.fencing_token == first
        outcome: List[BaseException] = []

        def other() -> None:
            start = time.monotonic()
            try:
                mcp_redis.agent_lock("a", blocking_timeout=0.2).__enter__()
            except LockTimeout as exc:
                outcome.append(exc)
                outcome.append(time.monotonic() - start)  # type: ignore[arg-type]

        t = threading.Thread(target=other)
        t.start()
        t.join(5)
        assert isinstance(outcome[0], TimeoutError) and 0.2 <= outcome[1] < 0.5  # type: ignore[operator]
    with mcp_redis.agent_lock("a") as again:
        assert first is not None and again.fencing_token is not None and again.fencing_token > first
    with pytest.raises(LockNotOwned):
        again.release()


def test_local_lock_file_left_behind_never_blocks(local_mode: str) -> None:
    held = mcp_redis.agent_lock("stale")
    with held:
        pass
    path = FileBackend.path(held._resolve_keys())
    assert os.path.exists(path)  # the file stays (it keeps the fencing counter) ...
    with mcp_redis.agent_lock("stale", blocking_timeout=0):  # ... and is not a lock by itself
        pass
    assert not held.locked()


def test_local_lock_of_a_killed_holder_is_free_at_once(local_mode: str) -> None:
    ready = SPAWN.Queue()
    proc = SPAWN.Process(target=workers_locks.hold_forever, args=({"lock_dir": local_mode}, "crash", 30.0, ready),
                         daemon=True)
    proc.start()
    ready.get(timeout=60)
    assert mcp_redis.agent_lock("crash").locked()
    assert not mcp_redis.agent_lock("crash", blocking_timeout=0).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    start = time.monotonic()
    with mcp_redis.agent_lock("crash", blocking_timeout=5):
        assert time.monotonic() - start < 0.5


def test_forked_child_cannot_release_parents_file_lock(local_mode: str) -> None:
    held = mcp_redis.agent_lock("forked")
    held.acquire()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                held.release()
                code = 2
            except LockNotOwned:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not mcp_redis.agent_lock("forked2", blocking_timeout=0).locked()
    got: List[bool] = []
    t = threading.Thread(target=lambda: got.append(mcp_redis.agent_lock("forked", blocking_timeout=0).acquire()))
    t.start()
    t.join(5)
    assert got == [False]
    held.release()


def test_state_lock_manager_in_local_mode_takes_the_legacy_lock_file(local_mode: str, tmp_path: Path) -> None:
    manager = StateLockManager(lock_dir=tmp_path)
    with manager.acquire_agent_lock("legacy", timeout=5.0) as held:
        assert held is None
        info = json.loads((tmp_path / "legacy.lock").read_text())
        assert info["pid"] == os.getpid() and info["agent_id"] == "legacy" and isinstance(info["timestamp"], float)
        # What a legacy StateLockManager process does: flock the same file. It is refused.
        fd = os.open(str(tmp_path / "legacy.lock"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_stale_cleanup_unlinking_the_file_never_lets_two_holders_in(local_mode: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The legacy manager's lost updates: a cleanup unlinks the file between another
    acquirer's open and its flock; that acquirer must not count a lock on the orphan."""
    manager = StateLockManager(lock_dir=tmp_path)
    path = tmp_path / "raced.lock"
    path.write_text("{}")
    real_open = os.open
    legacy_fds: List[int] = []
    raced: List[bool] = []

    def open_then_race(file: Any, flags: int, *args: Any) -> int:
        fd = real_open(file, flags, *args)
        if not raced and str(file) == str(path) and flags & os.O_CREAT:  # the acquire's open
            raced.append(True)
            assert manager._check_and_clean_stale_lock(path)  # nobody holds it yet: unlinked
            legacy = real_open(str(path), os.O_CREAT | os.O_RDWR)  # a legacy process enters anew
            fcntl.flock(legacy, fcntl.LOCK_EX | fcntl.LOCK_NB)
            legacy_fds.append(legacy)
        return fd

    monkeypatch.setattr(legacyfile.os, "open", open_then_race)
    try:
        with pytest.raises(TimeoutError):
            with manager.acquire_agent_lock("raced", timeout=0.2, max_retries=1):
                pytest.fail("entered while a legacy process held the lock file")
    finally:
        for fd in legacy_fds:
            os.close(fd)


# -- PostgreSQL advisory locks ------------------------------------------------------------
def test_postgres_mode_excludes_threads_and_fences(postgres_mode: str) -> None:
    assert _contend(3, 10) == []
    fences = []
    for _ in range(3):
        with mcp_redis.agent_lock("pg-f") as held:
            assert held.backend == "postgres" and held.owned() and held.locked()
            fences.append(held.fencing_token)
    assert fences == sorted(set(fences))


def test_postgres_mode_times_out_and_releases(postgres_mode: str) -> None:
    holder = mcp_redis.lock("pg-t")
    assert holder.acquire()
    start = time.monotonic()
    outcome: List[Any] = []
    t = threading.Thread(target=lambda: outcome.append(mcp_redis.lock("pg-t").acquire(blocking_timeout=0.2)))
    t.start()
    t.join(5)
    assert outcome == [False] and time.monotonic() - start >= 0.2
    assert mcp_redis.lock("pg-t").acquire(blocking=False) is False
    holder.release()
    assert not holder.locked()
    again = mcp_redis.lock("pg-t")
    assert again.acquire(blocking=False)
    again.release()


# -- off -------------------------------------------------------------------------------------
def test_off_mode_always_enters_and_counts_it_unsafe() -> None:
    mcp_redis.configure(locks="off")
    with mcp_redis.agent_lock("x") as a, mcp_redis.lock("x", blocking_timeout=0) as b:
        assert a.backend == b.backend == "off"
        assert b.fencing_token == 0
    assert METRICS.counter("lock_unsafe_total", backend="off") == 2


def test_local_mode_threads_without_pause_take_turns(local_mode: str) -> None:
    order: List[int] = []
    barrier = threading.Barrier(8)

    def run(n: int) -> None:
        barrier.wait()
        for _ in range(30):
            with mcp_redis.agent_lock("fair", blocking_timeout=30):
                order.append(n)
                time.sleep(0.0002)  # the section does some I/O (frees the GIL), as real ones do

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(order) == 240
    longest = streak = 1
    for a, b in zip(order, order[1:]):
        streak = streak + 1 if a == b else 1
        longest = max(longest, streak)
    assert longest <= 10, order


def test_waiter_signal_keys_are_keyspace_keys() -> None:
    from mcp_redis.keys import KeySpace
    from mcp_redis.locks.base import keys_for

    for name in ("plain", "a b\n{x}*", "ü" * 300):
        keys = keys_for("mcp:", "agent-lock", (name,))
        expected = KeySpace("mcp:").key("agent-lock", name, tag=True, suffix="w" + "0a" * 12)
        assert keys.signal("0a" * 12) == expected


def test_a_postgres_hold_whose_session_died_is_marked_lost_and_never_reentered(postgres_mode: str,
                                                                             pg_database: Any) -> None:
    """The holder's session was killed (a restart, pg_terminate_backend): its advisory lock went
    with it and another holder got in, yet the first was never told (lost stayed False, a nested
    agent_lock re-entered). The watchdog now checks a PostgreSQL hold's session every second."""
    import psycopg2

    held = mcp_redis.agent_lock("agent-1")
    assert held.acquire(blocking_timeout=1) and not held.lost
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (pg_database.name,))
    finally:
        admin.close()
    assert held.lost_event.wait(10) and held.lost
    with pytest.raises(mcp_redis.LockNotOwned):
        with mcp_redis.agent_lock("agent-1", blocking_timeout=0):
            pass  # pragma: no cover
    other = mcp_redis.lock("agent-1", thread_local=False)
    assert other.acquire(blocking_timeout=5)  # the lock is free: the session took it along
    other.release()
    with pytest.raises(mcp_redis.LockNotOwned):
        held.release()


def test_a_postgres_session_that_stops_answering_does_not_stall_the_other_holds_checks(
        database_url: str, pg_database: Any) -> None:
    """The session check has no client-side deadline (libpq cannot bound a stopped server process).
    Run on the client's one watchdog thread, one stopped backend froze every renewal and check of
    the client: another hold's killed session went unnoticed, and a Redis lease of the same client
    ran out under its holder. Each check now runs in a thread of its own."""
    import psycopg2

    client = mcp_redis.Client(database_url=database_url, locks="postgres", postgres_timeout=2)
    a = mcp_redis.lock("stuck-a", client=client, thread_local=False)
    b = mcp_redis.lock("stuck-b", client=client, thread_local=False)
    assert a.acquire(blocking_timeout=2) and b.acquire(blocking_timeout=2)
    pid_a = a._state.hold.handle.connection.get_backend_pid()  # type: ignore[attr-defined]
    pid_b = b._state.hold.handle.connection.get_backend_pid()  # type: ignore[attr-defined]
    try:
        os.kill(pid_a, 0)
    except PermissionError:
        pytest.skip("signalling PostgreSQL's backend processes needs root or the postgres user")
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    stopped = False
    try:
        with admin.cursor() as cur:
            for _ in range(200):  # stop it between two checks, not inside one (it would hold LWLocks)
                cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid_a,))
                if cur.fetchone()[0] == "idle":
                    os.kill(pid_a, signal.SIGSTOP)
                    stopped = True
                    break
                time.sleep(0.005)
            assert stopped
            time.sleep(1.5)  # a's check is now stuck
            cur.execute("SELECT pg_terminate_backend(%s)", (pid_b,))
        assert b.lost_event.wait(6), "b's dead session went unnoticed behind a's stuck check"
        assert not a.lost  # stuck is not dead: unknown, never marked lost
    finally:
        if stopped:
            os.kill(pid_a, signal.SIGCONT)
        admin.close()
    a.release()
    client.close()


def test_releasing_a_dead_threads_postgres_lock_on_a_stopped_session_does_not_stall_the_watchdog(
        database_url: str, pg_database: Any) -> None:
    """A thread that ended holding a PostgreSQL lock is released by the watchdog. That release ran
    on the client's one watchdog thread with no deadline: with the session's server process
    stopped, every renewal, liveness beat and check of the client stopped (a reviewer: another
    hold's killed session went unnoticed, and with a Redis lock of the same client, a live holder
    was taken over once its liveness lapsed). The release now runs in a thread of its own."""
    import psycopg2

    client = mcp_redis.Client(database_url=database_url, locks="postgres", postgres_timeout=2)
    pids: List[int] = []

    def orphan() -> None:
        held = mcp_redis.lock("orphan-a", client=client)  # thread-local: its thread must release it
        assert held.acquire(blocking_timeout=2)
        pids.append(held._state.hold.handle.connection.get_backend_pid())  # type: ignore[attr-defined]

    thread = threading.Thread(target=orphan)
    thread.start()
    thread.join()
    assert pids
    try:
        os.kill(pids[0], 0)
    except PermissionError:
        pytest.skip("signalling PostgreSQL's backend processes needs root or the postgres user")
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    stopped = False
    b = mcp_redis.lock("orphan-b", client=client, thread_local=False)
    try:
        with admin.cursor() as cur:
            for _ in range(200):  # stopped idle, before the watchdog finds the orphan (within 1 s)
                cur.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pids[0],))
                if cur.fetchone()[0] == "idle":
                    os.kill(pids[0], signal.SIGSTOP)
                    stopped = True
                    break
                time.sleep(0.005)
            assert stopped
            assert b.acquire(blocking_timeout=2)
            pid_b = b._state.hold.handle.connection.get_backend_pid()  # type: ignore[attr-defined]
            time.sleep(1.5)  # the orphan's release is now stuck on the stopped session
            cur.execute("SELECT pg_terminate_backend(%s)", (pid_b,))
        assert b.lost_event.wait(6), "b's dead session went unnoticed behind the orphan's stuck release"
    finally:
        if stopped:
            os.kill(pids[0], signal.SIGCONT)
        admin.close()
    other = mcp_redis.lock("orphan-a", client=client, thread_local=False)
    assert other.acquire(blocking_timeout=5)  # the orphan's release went through once the session answered
    other.release()
    client.close()


def test_extend_of_a_postgres_lock_whose_check_is_cancelled_raises_a_library_error(
        postgres_mode: str, pg_database: Any) -> None:
    """A cancelled check (a DBA's pg_cancel_backend, a statement timeout) surfaced as a raw
    psycopg2 QueryCanceled from lock.extend(); the lock is still held."""
    import psycopg2

    held = mcp_redis.lock("cancelled", thread_local=False)
    assert held.acquire(blocking_timeout=2)
    pid = held._state.hold.handle.connection.get_backend_pid()  # type: ignore[attr-defined]
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    stop = threading.Event()

    def cancel_forever() -> None:
        with admin.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT pg_cancel_backend(%s)", (pid,))

    canceller = threading.Thread(target=cancel_forever)
    canceller.start()
    seen: List[BaseException] = []
    try:
        for _ in range(20_000):
            try:
                held.extend(10)
            except Exception as exc:
                seen.append(exc)
                break
    finally:
        stop.set()
        canceller.join(10)
        admin.close()
    assert seen, "no check was cancelled in 20,000 tries"
    assert isinstance(seen[0], mcp_redis.BackendUnavailable), repr(seen[0])
    assert held.owned() and not held.lost
    held.release()
