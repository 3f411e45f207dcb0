"""Sessions on every Redis topology: single server, Sentinel, Cluster.

On Cluster the binding, the agent's index and the prefix index live in
different slots, so `bind` issues single-slot commands one after another
instead of one Lua script; the observable contract is the same.
"""

from __future__ import annotations

import mcp_redis
from mcp_redis import AmbiguousPrefix, SessionStore
from mcp_redis.connections import get_redis
from mcp_redis.keys import encode_id
from mcp_redis.sessions.records import agent_of


def test_bind_rebind_index_and_prefix_on_every_topology(any_redis_mode: str) -> None:
    store = SessionStore()
    store.bind("s1", "alice-1", ttl=60)
    store.bind("s2", "alice-1", ttl=60)
    store.bind("s\x00odd", "alice-2\ud800", ttl=60)
    assert store.get("s1") == "alice-1"
    assert store.get("s\x00odd") == "alice-2\ud800"
    store.bind("s1", "bob", ttl=60)
    assert store.sessions_for("alice-1") == ["s2"]
    assert store.sessions_for("bob") == ["s1"]
    assert store.touch("s2", ttl=120) == "alice-1"
    assert store.resolve_agent_prefix("bo") == "bob"
    try:
        store.resolve_agent_prefix("alice")
        raise AssertionError("expected AmbiguousPrefix")
    except AmbiguousPrefix as exc:
        assert sorted(exc.candidates) == ["alice-1", "alice-2\ud800"]
    store.bind("s3", "carol", ttl=60, client_type="sse")
    assert store.update("s3", turns=1) is not None
    record = store.record("s3")
    assert record is not None and (record["bound_agent_id"], record["client_type"], record["turns"]) == (
        "carol", "sse", 1)
    assert store.sessions_for("carol") == ["s3"] and store.unbind("s3") is True
    assert store.unbind("s2") is True
    assert store.sessions_for("alice-1") == []
    client = get_redis().client
    assert agent_of(client.get("mcp:session:" + encode_id("s1"))) == "bob"
    assert 0 < client.pttl("mcp:session_index:{all}") <= 2 * 120 * 1000  # twice the longest ttl written


def test_write_through_read_repair_on_every_topology(any_redis_url: str, database_url: str) -> None:
    mcp_redis.configure(redis_url=any_redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("s1", "agent-1", ttl=100)
    client = get_redis().client
    client.delete("mcp:session:s1")
    assert store.get("s1") == "agent-1"
    assert 90_000 < client.pttl("mcp:session:s1") <= 100_000
