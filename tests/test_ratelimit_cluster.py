"""Rate limiting on a Redis Cluster client: a one-node cluster owning every slot.

Cluster mode enforces CROSSSLOT even on one node, so a multi-limit call whose
keys did not share a hash slot would fail here.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

import mcp_redis
from mcp_redis import Algorithm, RateLimiter
from mcp_redis.testing import RedisServer, wait_for

ALGORITHMS = [a for a in Algorithm if a.name != "TOKEN_BUCKET"]


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    from mcp_redis.testing import redis_binary

    if redis_binary() is None:
        pytest.skip("redis-server binary not found")
    directory = str(tmp_path_factory.mktemp("rl_cluster"))
    server = RedisServer(args=["--cluster-enabled", "yes", "--cluster-config-file",
                               os.path.join(directory, "nodes.conf")], directory=directory)
    server.start()
    try:
        server.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: server.client().cluster("info")["cluster_state"] == "ok", 10, what="cluster ok")
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_multi_limit_hits_work_on_a_cluster_client(cluster_node: RedisServer, algorithm: Algorithm) -> None:
    mcp_redis.configure(redis_url=f"redis+cluster://127.0.0.1:{cluster_node.port}")
    from mcp_redis.connections import get_redis

    assert get_redis().is_cluster
    limiter = RateLimiter(f"cl-{algorithm.value}", limits=[(3, 3600), (2, 60)], algorithm=algorithm)
    results = [limiter.hit("agent*{1}") for _ in range(3)]
    assert [r.backend for r in results] == ["redis"] * 3
    assert [r.allowed for r in results] == [True, True, False]
    client: Any = cluster_node.client()
    keys = sorted(client.scan_iter(match=f"mcp:ratelimit:{{cl-{algorithm.value}*"))
    assert len(keys) == 2
    assert len({client.cluster("keyslot", k) for k in keys}) == 1
    limiter.reset("agent*{1}")
    assert limiter.hit("agent*{1}").allowed
