"""Local mode end to end: no REDIS_URL, every public call works on one host."""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any, Dict, List

import pytest

import mcp_redis
from mcp_redis import RateLimitExceeded


def _locked_increments(lock_dir: str, path: str, n: int) -> None:
    os.environ["MCP_REDIS_LOCK_DIR"] = lock_dir
    mcp_redis.reset(configuration=True)
    for _ in range(n):
        with mcp_redis.agent_lock("agent-1", blocking_timeout=30):
            with open(path) as f:
                value = int(f.read())
            with open(path, "w") as f:
                f.write(str(value + 1))


def test_agent_lock_is_exclusive_across_processes_with_file_locks(tmp_path: Any) -> None:
    assert mcp_redis.settings().local_mode
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_locked_increments, args=(os.environ["MCP_REDIS_LOCK_DIR"], str(counter), 200))
             for _ in range(3)]
    for p in procs:
        p.start()
    _locked_increments(os.environ["MCP_REDIS_LOCK_DIR"], str(counter), 200)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text() == "800"  # no lost update


def test_agent_lock_is_reentrant_and_times_out_for_other_threads() -> None:
    with mcp_redis.agent_lock("a") as outer:
        with mcp_redis.agent_lock("a"):
            pass
        box: List[BaseException] = []

        def contend() -> None:
            try:
                with mcp_redis.agent_lock("a", blocking_timeout=0.05):
                    pass  # pragma: no cover
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=contend)
        t.start()
        t.join()
        assert isinstance(box[0], mcp_redis.LockTimeout) and isinstance(box[0], TimeoutError)
        assert isinstance(outer.fencing_token, int)


def test_rate_limits_are_exact_in_process() -> None:
    calls: List[str] = []

    @mcp_redis.rate_limited("kg_store", limit=3, window=60, key="agent_id")
    def store(agent_id: str, payload: str) -> str:
        calls.append(payload)
        return payload

    assert [store("a", str(i)) for i in range(3)] == ["0", "1", "2"]
    with pytest.raises(RateLimitExceeded) as info:
        store("a", "x")
    assert info.value.limit == 3 and info.value.retry_after > 0
    assert store("b", "y") == "y" and calls == ["0", "1", "2", "y"]


def test_metadata_cache_serves_from_process_memory_and_invalidates() -> None:
    db: Dict[str, Dict[str, int]] = {"a1": {"v": 1}}
    loads: List[str] = []

    @mcp_redis.cached_metadata(ttl=60)
    def load(agent_id: str) -> Dict[str, int]:
        loads.append(agent_id)
        return dict(db[agent_id])

    assert load("a1") == {"v": 1} and load("a1") == {"v": 1}
    assert loads == ["a1"]
    db["a1"] = {"v": 2}
    load.invalidate("a1")
    assert load("a1") == {"v": 2} and loads == ["a1", "a1"]
    info = load.cache_info()
    assert info.l1_hits >= 1 and info.misses == 2


def test_sessions_bind_get_unbind_in_process() -> None:
    store = mcp_redis.SessionStore()
    store.bind("s1", "agent-1", ttl=60)
    assert store.get("s1") == "agent-1"
    store.unbind("s1")
    assert store.get("s1") is None
    with pytest.raises(ValueError, match="ttl"):
        store.bind("s1", "agent-1", ttl=0)


def test_events_are_delivered_inside_the_process() -> None:
    got: List[Dict[str, Any]] = []
    done = threading.Event()

    def handler(event: Dict[str, Any]) -> None:
        got.append(event)
        done.set()

    bus = mcp_redis.EventBus()
    sub = bus.subscribe("agent:updates", handler)
    try:
        bus.publish("agent:updates", {"agent_id": "a1", "event": "state_changed", "metrics": {}})
        assert done.wait(5)
        assert got == [{"agent_id": "a1", "event": "state_changed", "metrics": {}}]
    finally:
        sub.close()


def test_health_reports_local_mode_ok() -> None:
    report = mcp_redis.health()
    assert report["ok"] and report["mode"] == "local"
    assert set(report["features"].values()) == {"local"}
