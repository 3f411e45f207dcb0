"""Crash recovery (a dead holder's lock is taken over long before its lease ends),
live holders kept however long they work, stalled holders told they lost, and fenced writes.

Timings belong to bench/bench_crash.py; here every wait is a bound far from
the behaviour tested (a 10 s wait against the default 30 s lease).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Dict

import psycopg2
import pytest

import mcp_redis
from mcp_redis.fencing import fenced_update
from tests import workers_compat

SPAWN = multiprocessing.get_context("spawn")


def start_holder(settings: Dict[str, Any], agent_id: str, renewing: bool = True) -> Any:
    commands, replies = SPAWN.Queue(), SPAWN.Queue()
    proc = SPAWN.Process(target=workers_compat.hold, args=(settings, agent_id, commands, replies, renewing),
                         daemon=True)
    proc.start()
    kind, fence = replies.get(timeout=60)
    assert kind == "held"
    return proc, commands, replies, fence


def test_a_killed_holder_process_stops_blocking_long_before_its_lease_ends(redis_mode: str) -> None:
    proc, _, _, _ = start_holder({"redis_url": redis_mode}, "crashed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    # The holder's lease is the default 30 s: entering within 10 s is the takeover, not the expiry.
    assert mcp_redis.settings().lock_timeout == 30.0
    lock = mcp_redis.agent_lock("crashed", blocking_timeout=10)
    assert lock.acquire()
    lock.release()


@pytest.mark.slow
@pytest.mark.long
def test_a_live_holder_keeps_its_lock_through_a_40s_section_with_default_settings(redis_mode: str) -> None:
    assert mcp_redis.settings().lock_timeout == 30.0  # the default lease: the section outlasts it
    proc, commands, replies, _ = start_holder({"redis_url": redis_mode}, "busy-40s")
    try:
        # The 40 s section: another process's client waits all of it, and never enters.
        waiter = mcp_redis.agent_lock("busy-40s", blocking_timeout=40)
        assert waiter.acquire() is False
        commands.put("release")
        assert replies.get(timeout=60) == ("released", True, False, "")
    finally:
        proc.join(10)


@pytest.mark.long
def test_a_holder_paused_for_less_than_its_liveness_ttl_keeps_its_lock(redis_mode: str) -> None:
    """`lock_liveness_ttl` (MCP_REDIS_LOCK_LIVENESS_TTL): a holder process whose watchdog cannot
    run for 2.5 s (stopped here; a C call holding the GIL alike) is not taken over when it set
    6 s, and releases its lock owned; with the default 1.5 s it is (the stopped-holder test)."""
    proc, commands, replies, _ = start_holder({"redis_url": redis_mode, "lock_liveness_ttl": 6}, "paused")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert mcp_redis.agent_lock("paused", blocking_timeout=2.5).acquire() is False
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    commands.put("release")
    assert replies.get(timeout=60) == ("released", True, False, "")
    proc.join(10)


@pytest.fixture
def fenced_table(database_url: str) -> Any:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS fenced_rows")
        cur.execute("CREATE TABLE fenced_rows (id INT PRIMARY KEY, value TEXT, fence BIGINT)")
        cur.execute("INSERT INTO fenced_rows VALUES (1, 'initial', NULL)")
    yield conn
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS fenced_rows")
    conn.close()


@pytest.mark.long
def test_a_stopped_holder_learns_it_lost_and_its_fenced_write_is_refused(redis_mode: str, database_url: str,
                                                                         fenced_table: Any) -> None:
    proc, commands, replies, stale_fence = start_holder({"redis_url": redis_mode}, "stalled")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        lock = mcp_redis.agent_lock("stalled", blocking_timeout=10)
        assert lock.acquire()  # taken over from the stopped holder (its lease has 30 s to go)
        assert lock.fencing_token is not None and lock.fencing_token > stale_fence
        with fenced_table.cursor() as cur:
            assert fenced_update(cur, "fenced_rows", {"value": "new holder"}, {"id": 1}, "fence", lock.fencing_token)
        commands.put(("fenced_write", database_url))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    kind, lost, written, release_error = replies.get(timeout=60)
    proc.join(10)
    assert (kind, lost, written, release_error) == ("fenced_write", True, False, "LockNotOwned")
    with fenced_table.cursor() as cur:
        cur.execute("SELECT value, fence FROM fenced_rows WHERE id = 1")
        assert cur.fetchone() == ("new holder", lock.fencing_token)
    lock.release()


# -- fenced_update itself ---------------------------------------------------------------------
def test_fenced_update_writes_only_with_a_higher_token(fenced_table: Any) -> None:
    with fenced_table.cursor() as cur:
        assert fenced_update(cur, "fenced_rows", {"value": "a"}, {"id": 1}, "fence", 10)  # NULL fence counts as 0
        assert not fenced_update(cur, "fenced_rows", {"value": "b"}, {"id": 1}, "fence", 10)
        assert not fenced_update(cur, "fenced_rows", {"value": "c"}, {"id": 1}, "fence", 9)
        assert fenced_update(cur, ("public", "fenced_rows"), {"value": "d"}, {"id": 1}, "fence", 11)
        assert not fenced_update(cur, "fenced_rows", {"value": "e"}, {"id": 2}, "fence", 99)  # no such row
        cur.execute("SELECT value, fence FROM fenced_rows")
        assert cur.fetchall() == [("d", 11)]


@pytest.mark.parametrize("kwargs, kind, argument", [
    ({"token": 0}, ValueError, "token"),
    ({"token": 2 ** 63}, ValueError, "token"),
    ({"token": True}, TypeError, "token"),
    ({"token": "5"}, TypeError, "token"),
    ({"set_values": {}}, ValueError, "set_values"),
    ({"where": {}}, ValueError, "where"),
    ({"where": {"id": None}}, ValueError, "where"),
    ({"set_values": {"fence": 1}}, ValueError, "fence_column"),
    ({"fence_column": ""}, ValueError, "fence_column"),
    ({"table": "a.b.c.d"}, ValueError, "table"),
    ({"table": ""}, ValueError, "table"),
])
def test_fenced_update_refuses_bad_input_naming_it_and_writes_nothing(fenced_table: Any, kwargs: Dict[str, Any],
                                                                      kind: type, argument: str) -> None:
    call: Dict[str, Any] = {"table": "fenced_rows", "set_values": {"value": "x"}, "where": {"id": 1},
                            "fence_column": "fence", "token": 5}
    call.update(kwargs)
    with fenced_table.cursor() as cur:
        with pytest.raises(kind, match=argument):
            fenced_update(cur, **call)
        cur.execute("SELECT value, fence FROM fenced_rows")
        assert cur.fetchall() == [("initial", None)]


@pytest.mark.long
def test_a_live_holder_of_a_lock_without_renewal_keeps_it_for_its_whole_lease(redis_mode: str) -> None:
    proc, commands, replies, _ = start_holder({"redis_url": redis_mode}, "unrenewed", renewing=False)
    try:
        # lock(name, timeout=30), no auto_renew, in another live process: a wait well past
        # LIVENESS_TTL (and well inside the lease) never enters.
        assert mcp_redis.lock("unrenewed").acquire(blocking_timeout=5) is False
        commands.put("release")
        assert replies.get(timeout=60) == ("released", True, False, "")
    finally:
        proc.join(10)
