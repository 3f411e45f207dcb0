"""Rate limiting on every topology: single server, Sentinel (master_for) and Cluster.

On the cluster (three masters), a multi-limit call whose keys did not share a
hash slot would fail with CROSSSLOT; the one-slot rule is checked directly too.
"""

from __future__ import annotations

from typing import Any

import pytest

from mcp_redis import Algorithm, RateLimiter, settings
from mcp_redis.connections import get_redis
from tests.topologies import *  # noqa: F401,F403

ALGORITHMS = [a for a in Algorithm if a.name != "TOKEN_BUCKET"]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_multi_limit_hits_work_on_every_topology(any_redis_mode: str, redis_topology: str,
                                                 algorithm: Algorithm) -> None:
    limiter = RateLimiter(f"topo-{algorithm.value}", limits=[(3, 3600), (2, 60)], algorithm=algorithm)
    results = [limiter.hit("agent*{1}") for _ in range(3)]
    assert [r.backend for r in results] == ["redis"] * 3
    assert [r.allowed for r in results] == [True, True, False]
    assert limiter.peek("agent*{1}").statuses[0].remaining == 1
    limiter.reset("agent*{1}")
    assert limiter.hit("agent*{1}").allowed
    if redis_topology == "cluster":
        client: Any = get_redis().client
        keys = limiter._plan(settings()).keys_for(limiter.name, "agent*{1}")
        assert len({client.keyslot(k) for k in keys}) == 1
