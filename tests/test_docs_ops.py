"""The operator-facing docs say what the code does: stats namespaces, the demo's
"to workers", `lock.backend` after the block, asyncio, and the API reference's
docstrings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mcp_redis
from mcp_redis.demo import workers_delivery_note
from mcp_redis.stats import stats

ROOT = Path(__file__).resolve().parent.parent


def test_operations_doc_names_the_key_namespaces_stats_reports(redis_mode: str) -> None:
    held = mcp_redis.lock("nightly-report", timeout=30)
    assert held.acquire(blocking_timeout=5)
    try:
        with mcp_redis.agent_lock("agent-1") as agent:
            assert agent.fencing_token  # drawn: its counter outlives the hold, as in the example
        mcp_redis.RateLimiter("kg_store", limits=[(5, 60)]).hit("agent-1")

        @mcp_redis.cached_metadata(ttl=60)
        def load(agent_id: str) -> dict:  # type: ignore[type-arg]
            return {"agent_id": agent_id}

        load("agent-1")
        mcp_redis.SessionStore().bind("session-1", "agent-1")
        reported = set(stats()["redis"]["keys"])
    finally:
        held.release()
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    example = re.search(r'"keys": (\{[^}]*\})', text)
    assert example, "docs/operations.md shows a stats example with keys"
    documented = set(json.loads(example.group(1)))
    assert documented <= reported, f"the example shows namespaces stats never reports: {documented - reported}"
    assert sorted(n for n in reported if f"`{n}`" not in text) == []


def test_demo_report_explains_worker_deliveries_as_fan_out_to_every_worker() -> None:
    note = workers_delivery_note(1025, 4)
    assert "every subscribed worker" in note and "1025 x 4 = 4100" in note
    assert "4100" in (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")


def test_lock_backend_is_none_after_the_with_block_as_the_locks_doc_says() -> None:
    with mcp_redis.agent_lock("agent-1") as lock:
        assert lock.backend == "local"
    assert lock.backend is None
    assert "`None` after the `with` block" in (ROOT / "docs" / "locks.md").read_text(encoding="utf-8")


def test_readme_says_plainly_that_importing_the_library_loads_asyncio_through_redis_py() -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys, mcp_redis; print('asyncio' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=True)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "no asyncio anywhere" not in readme
    if proc.stdout.strip() == "True":
        assert "redis-py 8 imports `asyncio`" in readme


def test_production_guide_names_only_settings_that_exist() -> None:
    import dataclasses

    from mcp_redis.config import _ENV, Settings

    text = (ROOT / "docs" / "production.md").read_text(encoding="utf-8")
    variables = {var for var, _ in _ENV.values()} | {"REDIS_URL", "DATABASE_URL"}
    named_variables = set(re.findall(r"`((?:MCP_)?REDIS_[A-Z_]+|DATABASE_URL)`", text))
    assert named_variables, "the guide names its variables"
    assert sorted(named_variables - variables) == []
    fields = {f.name for f in dataclasses.fields(Settings)}
    keywords = set(re.findall(r"`([a-z][a-z_]+_[a-z_]+)`", text))
    libpq = {"statement_timeout", "tcp_user_timeout"}  # PostgreSQL's names, not the library's
    settings_like = {k for k in keywords if k.endswith(("_timeout", "_interval", "_connections", "_backoff"))} - libpq
    assert settings_like and sorted(settings_like - fields) == []
    assert "contrib/monitoring/mcp_redis.rules.yml" in text


def test_each_subscription_and_the_cache_listener_hold_one_pooled_connection(redis_mode: str) -> None:
    """What docs/production.md's pool-sizing table counts."""
    from mcp_redis.connections import get_redis

    conn = get_redis()
    conn.call(conn.client.ping)
    assert conn.pool_stats()["in_use"] == 0
    sub = mcp_redis.EventBus().subscribe("agent:updates", lambda event: None)
    try:
        assert conn.pool_stats()["in_use"] == 1

        @mcp_redis.cached_metadata(ttl=60)
        def load(agent_id: str) -> dict:  # type: ignore[type-arg]
            return {"agent_id": agent_id}

        load("agent-1")  # the first Redis-mode miss starts the listener
        from mcp_redis.cache import wait_for_listener

        assert wait_for_listener(10)
        assert conn.pool_stats()["in_use"] == 2
    finally:
        sub.close()
