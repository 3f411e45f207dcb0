"""Rate limiting on every topology: single server, Sentinel (master_for) and Cluster.

On the cluster (three masters), a multi-limit call whose keys did not share a
hash slot would fail with CROSSSLOT; the one-slot rule is checked directly too.
"""

from __future__ import annotations

from typing import Any

import pytest

import mcp_redis
from mcp_redis import Algorithm, RateLimiter, settings
from mcp_redis.connections import get_redis
from mcp_redis.testing import wait_for

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
        keys = limiter._plan(settings()).policy.keys_for("agent*{1}")
        assert len({client.keyslot(k) for k in keys}) == 1


@pytest.mark.sentinel
def test_sentinel_failover_keeps_limiting_on_the_new_master(sentinel_topology: Any) -> None:
    mcp_redis.configure(redis_url=sentinel_topology.url, breaker_reset_timeout=0.2)
    limiter = RateLimiter("failover", 1000, 3600)
    assert limiter.hit("k").backend == "redis"
    new_master = sentinel_topology.failover()
    new_master.client().script_flush()  # whatever it inherited: NOSCRIPT must be handled
    wait_for(lambda: limiter.hit("k").backend == "redis", 20, what="rate limiting on the new master")
    results = [limiter.hit("k") for _ in range(3)]
    assert all(r.allowed and r.backend == "redis" for r in results)
    assert new_master.client().exists(*limiter._plan(settings()).policy.keys_for("k")) == 1
