"""The metadata cache on every Redis topology: single server, Sentinel, Cluster.

Runs once per topology (``MCP_REDIS_TOPOLOGIES`` narrows the set). On a
Cluster, an entry's value and epoch keys share a hash slot (the scripts need
both), `get_many` reads across slots with ``mget_nonatomic`` and writes back
with a non-transactional pipeline of ``EVAL``.
"""

from __future__ import annotations

from typing import Any, Dict, List

from mcp_redis.cache import cached_metadata, wait_for_listener
from mcp_redis.testing import wait_for


def test_cache_round_trip_invalidation_and_batch_on_every_topology(any_redis_mode: str) -> None:
    rows: Dict[str, int] = {}
    loads: List[str] = []

    def source(agent_id: str) -> Dict[str, Any]:
        loads.append(agent_id)
        return {"agent_id": agent_id, "version": rows.get(agent_id, 0)}

    first = cached_metadata(namespace="tests.topology", ttl=60)(source)
    second = cached_metadata(namespace="tests.topology", ttl=60)(source)
    first("warmup")
    assert wait_for_listener(15)

    assert first("a1")["version"] == 0
    assert second("a1")["version"] == 0  # L2 hit
    assert second.cache_info().l2_hits == 1
    rows["a1"] = 1
    first.invalidate("a1")
    assert second("a1")["version"] == 1

    ids = [f"b{i}" for i in range(50)]  # spread over many hash slots
    assert first.get_many(ids) == {i: {"agent_id": i, "version": 0} for i in ids}
    second.cache_clear()
    before = len(loads)
    assert second.get_many(ids) == {i: {"agent_id": i, "version": 0} for i in ids}
    assert len(loads) == before  # all 50 written back and read from L2

    rows["b1"] = 7
    first.invalidate_all()
    wait_for(lambda: second("b1")["version"] == 7, 5, what="invalidate_all seen")
