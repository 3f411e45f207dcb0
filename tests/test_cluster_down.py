"""A Redis Cluster that is down when the process starts (issue 20).

redis-py's `RedisCluster` reads the slot map in its constructor; the library
builds it on first use (`LazyCluster`), so a process started while every node
is down degrades like one started against a stopped single server: sessions
from PostgreSQL, locks per ``lock_fallback``, rate limits per
``rate_limit_fallback``, a clear `health()` and CLI report, and the same
client object goes to Redis once the cluster is up, without a restart.

One test on the run's shared cluster (stopped, then healed): topologies are
expensive to start.
"""

from __future__ import annotations

import psycopg2
import pytest

import mcp_redis
from mcp_redis.connections import LazyCluster, get_redis
from mcp_redis.testing import wait_for
from mcp_redis.testing.topology import ClusterTopology
from tests.test_cli import run_cli


def _sessions_in_postgres(database_url: str) -> set[str]:
    conn = psycopg2.connect(mcp_redis.settings().database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT session_key FROM mcp_redis.sessions")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _session_keys_in_cluster(cluster: ClusterTopology) -> list[str]:
    return [k for node in cluster.masters for k in node.client().keys("*session*")]


@pytest.mark.cluster
def test_a_process_started_while_the_cluster_is_down_falls_back_then_recovers_without_restart(
    cluster_topology: ClusterTopology, database_url: str
) -> None:
    cluster = cluster_topology
    for node in cluster.nodes:
        node.kill()
    try:
        mcp_redis.configure(redis_url=cluster.url, database_url=database_url)
        conn = get_redis()  # no connection yet: nothing to raise
        assert conn.kind == "cluster" and isinstance(conn.client, LazyCluster) and not conn.client.built

        store = mcp_redis.SessionStore()
        store.bind("while-down", "agent-1")
        assert store.get("while-down") == "agent-1"
        assert "while-down" in _sessions_in_postgres(database_url)  # served by PostgreSQL

        assert mcp_redis.RateLimiter("down", limit=5, window=60).hit("k").backend != "redis"  # fallback: local
        with pytest.raises(mcp_redis.BackendUnavailable):  # lock_fallback=none: fail closed
            with mcp_redis.agent_lock("down-agent", timeout=5, blocking_timeout=0.2):
                pass

        report = mcp_redis.health()
        assert report["ok"] is False and report["postgres"]["ok"] is True
        assert "Redis Cluster unreachable" in report["redis"]["error"], report["redis"]
        cli = run_cli("health", env={"REDIS_URL": cluster.url, "DATABASE_URL": database_url})
        assert cli.returncode == 1, cli.stderr
        assert "Redis Cluster unreachable" in cli.stdout and "Traceback" not in cli.stdout + cli.stderr
    finally:
        cluster.heal()

    # The same process and client: once the breaker lets a call through, Redis serves.
    wait_for(lambda: _try(lambda: conn.call(conn.client.ping)), 30, interval=0.1, what="the cluster to answer")
    assert get_redis() is conn and conn.client.built
    store.bind("after-up", "agent-2")
    assert store.get("after-up") == "agent-2"
    assert any("after-up" in key for key in _session_keys_in_cluster(cluster))
    assert mcp_redis.RateLimiter("up", limit=5, window=60).hit("k").backend == "redis"
    with mcp_redis.agent_lock("up-agent", timeout=5, blocking_timeout=1) as held:
        assert held.fencing_token is not None
    assert mcp_redis.health()["ok"] is True


def _try(fn: object) -> bool:
    try:
        fn()  # type: ignore[operator]
        return True
    except mcp_redis.BackendUnavailable:
        return False
