"""`health()` and `stats()` in-process: what an operator (or a server's admin route) sees."""

from __future__ import annotations

import json
import time

import pytest

import mcp_redis
from mcp_redis.client import default_client
from mcp_redis.metrics import METRICS
from mcp_redis.stats import process_stats, stats
from mcp_redis.testing import free_port
from mcp_redis.testing.topology import ClusterTopology


def test_health_in_local_mode_is_ok_and_says_local() -> None:
    report = mcp_redis.health()
    assert report["ok"] is True
    assert report["mode"] == "local"
    assert report["redis"] == {"configured": False}
    assert report["postgres"] == {"configured": False}
    json.dumps(report)  # JSON-ready


def test_health_reports_ping_latency_pool_and_breaker_when_redis_answers(redis_mode: str) -> None:
    report = mcp_redis.health()
    assert report["ok"] is True
    redis_part = report["redis"]
    assert redis_part["ok"] is True
    assert redis_part["ping_ms"] >= 0
    assert redis_part["breaker"] == "closed"
    assert set(redis_part["pool"]) >= {"in_use", "idle", "max"}


def test_health_is_not_ok_within_seconds_when_redis_is_down_and_never_shows_the_password() -> None:
    port = free_port()  # nothing listens there
    mcp_redis.configure(redis_url=f"redis://:hunter2secret@127.0.0.1:{port}/0")
    started = time.monotonic()
    report = mcp_redis.health()
    assert time.monotonic() - started < 5
    assert report["ok"] is False
    assert report["redis"]["ok"] is False
    assert "error" in report["redis"]
    assert "hunter2secret" not in json.dumps(report)


def test_health_reports_postgres_down_without_its_password() -> None:
    port = free_port()
    mcp_redis.configure(database_url=f"postgresql://postgres:pgsecret99@127.0.0.1:{port}/x")
    report = mcp_redis.health()
    assert report["ok"] is False
    assert report["postgres"]["ok"] is False
    assert "pgsecret99" not in json.dumps(report)


def test_health_reports_postgres_when_it_answers(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    report = mcp_redis.health()
    assert report["ok"] is True
    assert report["postgres"]["ok"] is True
    assert report["postgres"]["ping_ms"] >= 0


def test_process_stats_group_counters_and_latencies_by_feature() -> None:
    METRICS.inc("lock_acquire_total", backend="redis", outcome="timeout")
    METRICS.inc("ratelimit_rejections_total", limiter="kg", backend="redis")
    METRICS.inc("backend_retries_total", backend="redis")
    METRICS.observe("lock_wait_seconds", 0.002, backend="redis")
    out = process_stats()
    assert out["locks"]["counters"]["lock_acquire_total{backend=redis,outcome=timeout}"] == 1
    assert out["rate_limits"]["counters"]["ratelimit_rejections_total{backend=redis,limiter=kg}"] == 1
    assert out["backends"]["counters"]["backend_retries_total{backend=redis}"] == 1
    assert out["locks"]["latencies"]["lock_wait_seconds{backend=redis}"]["count"] == 1


def test_stats_counts_keys_per_namespace_under_the_prefix_only(redis_mode: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    raw = redis_server.client()
    for i in range(30):
        raw.set(f"mcp:sess:k{i}", "a")
    for i in range(5):
        raw.set(f"mcp:lock:agent-{i}", "t")
    raw.set("other-app:sess:x", "not ours")
    raw.set(b"mcp:foreign\xff:x", "another client's key, not UTF-8: counted, not an error")
    report = stats()
    redis_part = report["redis"]
    assert redis_part["ok"] is True
    assert redis_part["keys"] == {"foreign\\xff": 1, "lock": 5, "sess": 30}
    assert redis_part["keys_truncated"] is False
    assert redis_part["used_memory"] > 0
    assert set(redis_part["pool"]) >= {"in_use", "idle", "max"}
    assert redis_part["breaker"] == "closed"


def test_stats_stay_strict_json_when_a_latency_is_above_the_top_bucket() -> None:
    METRICS.observe("lock_wait_seconds", 7.0, outcome="acquired")
    latency = process_stats()["locks"]["latencies"]
    (hist,) = latency.values()
    assert hist["count"] == 1 and hist["p50_s"] is None and hist["p99_s"] is None
    json.dumps(stats(backends=False), allow_nan=False)


def test_health_of_a_read_only_replica_url_is_not_ok_and_says_so(redis_factory) -> None:  # type: ignore[no-untyped-def]
    """The calls would raise ReadOnlyServer: health must not say ok, nor close an open breaker."""
    from mcp_redis.testing import wait_for

    master = redis_factory()
    replica = redis_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up", what="the replica to sync")
    mcp_redis.configure(redis_url=replica.url, breaker_failure_threshold=1)
    breaker = default_client().redis().policy.breaker
    breaker.record_failure()  # opened, as the refused calls would have
    report = mcp_redis.health()
    assert report["ok"] is False and report["redis"]["ok"] is False
    assert "ReadOnlyServer" in report["redis"]["error"] and "REDIS_URL" in report["redis"]["error"]
    assert report["redis"]["breaker"] == "open"
    mcp_redis.configure(redis_url=master.url)
    assert mcp_redis.health()["ok"] is True


def test_health_on_a_cluster_is_not_ok_while_a_primary_does_not_answer_and_leaves_an_open_breaker_open(
        cluster_topology: ClusterTopology) -> None:
    """PING to one node says nothing of a hung primary's slots: every primary is asked."""
    mcp_redis.configure(redis_url=cluster_topology.url, socket_timeout=0.3, breaker_failure_threshold=1)
    assert mcp_redis.health()["ok"] is True
    breaker = default_client().redis().policy.breaker
    breaker.record_failure()  # opened, as calls to the hung primary's slots would have
    hung = cluster_topology.masters[-1]
    hung.pause()  # resumed well within the 2 s node timeout: no failover
    try:
        started = time.monotonic()
        report = mcp_redis.health()
        took = time.monotonic() - started
    finally:
        hung.resume()
    assert report["ok"] is False and report["redis"]["ok"] is False, report
    assert report["redis"]["breaker"] == "open"
    assert took < 1.9, took  # the pause must stay under the node timeout (no failover)


def test_stats_key_scan_is_bounded(redis_mode: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    raw = redis_server.client()
    raw.mset({f"mcp:sess:k{i}": "a" for i in range(50)})
    report = stats(scan_limit=10)
    assert report["redis"]["keys_truncated"] is True
    assert sum(report["redis"]["keys"].values()) == 10


def test_stats_show_cache_hits_per_tier_for_this_process(redis_mode: str) -> None:
    calls = []

    @mcp_redis.cached_metadata(ttl=60)
    def load_agent_metadata(agent_id: str) -> dict:  # type: ignore[type-arg]
        calls.append(agent_id)
        return {"agent_id": agent_id}

    for _ in range(3):
        load_agent_metadata("a1")
    functions = stats(backends=False)["process"]["metadata_cache"]["functions"]
    (info,) = [v for name, v in functions.items() if name.endswith(".load_agent_metadata")]
    assert info["loader_calls"] == 1
    assert info["l1_hits"] + info["l2_hits"] == 2
    assert info["hit_ratio_l1"] + info["hit_ratio_l2"] == pytest.approx(2 / 3, abs=1e-3)


def test_stats_summary_gives_the_operator_numbers_first() -> None:
    METRICS.inc("lock_acquire_total", backend="redis", outcome="timeout")
    METRICS.inc("lock_acquire_total", backend="redis", outcome="acquired")
    METRICS.observe("lock_wait_seconds", 0.5, backend="redis")
    METRICS.inc("ratelimit_rejections_total", 3, limiter="kg", backend="redis")
    METRICS.inc("lock_fallback_total", to="postgres")
    METRICS.inc("backend_retries_total", 2, backend="redis")
    summary = stats(backends=False)["summary"]
    assert summary["lock_timeouts"] == 1
    assert summary["lock_waits"] == {"count": 1, "mean_s": 0.5}
    assert summary["ratelimit_rejections"] == 3
    assert summary["fallbacks"]["locks"] == 1
    assert summary["retries"] == {"redis": 2}


def test_the_library_log_never_contains_a_password(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    mcp_redis.configure(redis_url=f"redis://:logsecret77@127.0.0.1:{port}/0", breaker_failure_threshold=1,
                        database_url=f"postgresql://u:logsecret77@127.0.0.1:{port}/db")
    with caplog.at_level("DEBUG", logger="mcp_redis"):
        mcp_redis.health()
        stats()
        from mcp_redis.connections import get_redis

        conn = get_redis()
        with pytest.raises(mcp_redis.BackendUnavailable):
            conn.call(conn.client.ping)
    assert caplog.records, "expected the failures to be logged"
    assert "logsecret77" not in caplog.text


@pytest.mark.cluster
def test_stats_on_a_cluster_sum_memory_over_primaries_and_scan_every_node() -> None:
    from mcp_redis.testing import redis_binary
    from mcp_redis.testing.topology import ClusterTopology

    if redis_binary() is None:
        pytest.skip("redis-server binary not found")
    with ClusterTopology() as cluster:
        mcp_redis.configure(redis_url=cluster.url)
        from mcp_redis.connections import get_redis

        client = get_redis().client
        for i in range(40):  # spread over the three primaries' slots
            client.set(f"mcp:sess:k{i}", "a")
        report = stats()
        assert report["redis"]["ok"] is True
        assert report["redis"]["primaries"] == 3
        assert report["redis"]["keys"] == {"sess": 40}
        assert report["redis"]["used_memory"] > 0
        assert mcp_redis.health()["redis"]["ok"] is True


def test_a_feature_url_whose_feature_is_local_configures_no_redis_in_health_as_in_stats() -> None:
    mcp_redis.configure(locks_url=f"redis://127.0.0.1:{free_port()}/0", locks="local")
    assert mcp_redis.health()["redis"] == {"configured": False}
    assert stats()["redis"] == {"configured": False}
