"""contrib/monitoring: the alert rules and the Grafana dashboard name only metrics
the library exports, and the gauges they need (Redis reachability, memory
against maxmemory, pending invalidations) are on the Prometheus endpoint."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

import mcp_redis
from mcp_redis.testing import RedisServer, free_port

prometheus_client = pytest.importorskip("prometheus_client")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "contrib" / "monitoring"
RULES = MONITORING / "mcp_redis.rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PACKAGE = Path(mcp_redis.__file__).resolve().parent


def scrape() -> Dict[str, List[object]]:
    """Samples of a fresh registry holding only the library's collector."""
    from prometheus_client.parser import text_string_to_metric_families

    from mcp_redis.prometheus import exposition

    samples: Dict[str, List[object]] = {}
    for family in text_string_to_metric_families(exposition()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: Dict[str, List[object]], name: str, **labels: str) -> float:
    rows = [s for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]  # type: ignore[attr-defined]
    assert len(rows) == 1, (name, labels, samples.get(name))
    return float(rows[0].value)  # type: ignore[attr-defined]


def rule_expressions() -> List[str]:
    data = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in data["groups"] for rule in group["rules"]]


def dashboard_expressions() -> List[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in data["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expressions: List[str]) -> Set[str]:
    return {m for e in expressions for m in re.findall(r"\bmcp_redis_[a-z0-9_]+", e)}


def exported_families() -> Set[str]:
    """Every family the exporter can produce: what the code records, plus the collector's gauges."""
    from mcp_redis.prometheus import _family_name

    recorded: Set[str] = set()
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        recorded.update(re.findall(r'\.(?:inc|observe)\(\s*"([a-z_]+)"', text))
        if source.parent.name == "cache":  # CachedFunction._count(name) records cache_<name>_total
            recorded.update(f"cache_{n}_total" for n in re.findall(r'_count\("([a-z_]+)"\)', text)
                            if n != "stale_served")
    families = {_family_name(n) for n in recorded}
    prometheus_source = (PACKAGE / "prometheus.py").read_text(encoding="utf-8")
    families.update(f"mcp_redis_{n}" for n in re.findall(r'f"\{NAMESPACE\}_([a-z0-9_]+)"', prometheus_source))
    return families


def series_family(name: str, families: Set[str]) -> str:
    """The family a series name belongs to (``_total`` of counters, ``_bucket`` & co of histograms)."""
    for suffix in ("_total", "_bucket", "_sum", "_count", ""):
        base = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
        if base in families:
            return base
    return name


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_the_monitoring_files_name_is_exported(source: str) -> None:
    exprs = rule_expressions() if source == "rules" else dashboard_expressions()
    names = metric_names(exprs)
    assert len(names) >= 10
    families = exported_families()
    unknown = sorted(n for n in names if series_family(n, families) not in families)
    assert unknown == []


def test_the_rules_cover_each_condition_operators_need_alerting_on() -> None:
    by_alert = {rule["alert"]: rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"]}
    wanted = {
        "McpRedisRedisUnreachable": "mcp_redis_redis_up",
        "McpRedisBreakerOpen": "mcp_redis_breaker_state",
        "McpRedisRateLimitsOnFallback": "mcp_redis_ratelimit_fallback_total",
        "McpRedisLocksOnFallback": "mcp_redis_lock_fallback_total",
        "McpRedisSessionsOnFallback": "mcp_redis_session_fallback_total",
        "McpRedisMemoryNearMaxmemory": "mcp_redis_redis_memory_max_bytes",
        "McpRedisPoolExhausted": "mcp_redis_pool_exhausted_total",
        "McpRedisLockLost": "mcp_redis_lock_lost_total",
        "McpRedisInvalidationsPending": "mcp_redis_cache_invalidations_pending",
    }
    assert {alert: metric in by_alert.get(alert, "") for alert, metric in wanted.items()} == dict.fromkeys(wanted, True)


def test_every_exported_family_the_rules_use_is_in_the_operations_doc() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    families = exported_families()
    names = {series_family(n, families) for n in metric_names(rule_expressions() + dashboard_expressions())}
    assert sorted(n for n in names if f"`{n}" not in text) == []


@pytest.fixture
def maxmemory_server() -> Iterator[RedisServer]:
    server = RedisServer(args=["--maxmemory", "64mb"]).start()
    try:
        yield server
    finally:
        server.cleanup()


def test_scrape_shows_redis_used_memory_against_maxmemory(maxmemory_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=maxmemory_server.url)
    info = maxmemory_server.client().info("memory")
    samples = scrape()
    assert value(samples, "mcp_redis_redis_up", backend="redis") == 1
    assert value(samples, "mcp_redis_redis_memory_max_bytes", backend="redis", node="master") == 64 * 1024 * 1024
    used = value(samples, "mcp_redis_redis_memory_used_bytes", backend="redis", node="master")
    assert 0 < used < 64 * 1024 * 1024 and used >= info["used_memory"] / 2


def test_redis_up_is_zero_when_redis_does_not_answer_and_the_breaker_is_not_fed() -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", breaker_failure_threshold=1)
    from mcp_redis.connections import get_redis

    samples = scrape()
    assert value(samples, "mcp_redis_redis_up") == 0
    assert "mcp_redis_redis_memory_used_bytes" not in samples
    assert get_redis().policy.breaker.state.value == "closed"


def test_a_feature_on_a_redis_of_its_own_has_its_own_up_breaker_and_pool_gauges_and_stats_entry(
        redis_mode: str) -> None:
    """MCP_REDIS_LOCKS_URL down while REDIS_URL answers: the gauges and `stats` say so for that
    deployment (before, they read REDIS_URL's alone and the alerts stayed quiet)."""
    mcp_redis.configure(redis_url=redis_mode, locks_url=f"redis://127.0.0.1:{free_port()}/0",
                        breaker_failure_threshold=1, retry_attempts=1)
    with pytest.raises(mcp_redis.BackendUnavailable):
        with mcp_redis.agent_lock("agent-1", blocking_timeout=0.1):
            pass
    samples = scrape()
    assert value(samples, "mcp_redis_redis_up", backend="redis") == 1
    assert value(samples, "mcp_redis_redis_up", backend="redis:locks") == 0
    assert value(samples, "mcp_redis_breaker_state", backend="redis:locks", state="open") == 1
    assert value(samples, "mcp_redis_breaker_state", backend="redis", state="closed") == 1
    assert value(samples, "mcp_redis_pool_connections", backend="redis:locks", state="max") > 0
    from mcp_redis.stats import redis_ok, redis_stats

    report = redis_stats()
    assert report["ok"] is True  # REDIS_URL's own entry
    assert [(e["name"], e["ok"]) for e in report["deployments"]] == [("redis", True), ("redis:locks", False)]
    assert redis_ok(report) is False


def test_no_redis_gauges_in_local_mode() -> None:
    samples = scrape()
    assert not [n for n in samples if n.startswith("mcp_redis_redis_")]


def test_invalidations_made_while_redis_is_down_show_as_pending(redis_factory: object) -> None:
    server = redis_factory()  # type: ignore[operator]
    mcp_redis.configure(redis_url=server.url, retry_attempts=1)

    @mcp_redis.cached_metadata(ttl=60, namespace="monitoring_pending")
    def load(agent_id: str) -> dict:  # type: ignore[type-arg]
        return {"agent_id": agent_id}

    load("agent-1")
    assert value(scrape(), "mcp_redis_cache_invalidations_pending", namespace="monitoring_pending") == 0
    server.stop()
    load.invalidate("agent-1")
    load.invalidate("agent-2")
    assert value(scrape(), "mcp_redis_cache_invalidations_pending", namespace="monitoring_pending") == 2


def test_cache_l2_hits_are_exported_as_the_operations_doc_lists(redis_mode: str) -> None:
    @mcp_redis.cached_metadata(ttl=60, namespace="monitoring_l2")
    def load(agent_id: str) -> dict:  # type: ignore[type-arg]
        return {"agent_id": agent_id}

    load("agent-1")  # miss: loaded, written to L1 and L2
    load.cache_clear()  # L1 only
    load("agent-1")  # L2 hit
    assert load.cache_info().l2_hits == 1
    assert value(scrape(), "mcp_redis_cache_l2_hits_total", namespace="monitoring_l2") == 1


def test_redis_up_stays_one_when_the_acl_user_may_not_run_info(redis_factory: object) -> None:
    server = redis_factory()  # type: ignore[operator]
    server.client().execute_command("ACL", "SETUSER", "app", "on", ">app-secret", "~mcp:*", "&mcp:*", "-@all",
                                    "+auth", "+ping", "+client|setname", "+get", "+set")
    mcp_redis.configure(redis_url=f"redis://app:app-secret@{server.host}:{server.port}/0")
    samples = scrape()
    assert value(samples, "mcp_redis_redis_up") == 1
    assert "mcp_redis_redis_memory_used_bytes" not in samples


def test_nothing_is_logged_per_call_at_info_or_above(redis_mode: str, database_url: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """docs/operations.md: what a healthy hot path logs at INFO or above is nothing, per call."""
    mcp_redis.configure(redis_url=redis_mode, database_url=database_url)
    limiter = mcp_redis.RateLimiter("log-quiet", limit=10**6, window=60)
    store = mcp_redis.SessionStore()
    bus = mcp_redis.EventBus()

    @mcp_redis.cached_metadata(ttl=60)
    def load(agent_id: str) -> Dict[str, str]:
        return {"agent_id": agent_id}

    def calls(n: int) -> None:
        for i in range(n):
            with mcp_redis.agent_lock(f"a{i % 3}"):
                pass
            with mcp_redis.lock(f"l{i % 3}", timeout=5, fencing=True) as lk:
                assert lk.fencing_token
            limiter.hit(f"k{i % 3}")
            load(f"a{i % 3}")
            load.invalidate(f"a{i % 3}")
            store.bind(f"s{i}", f"agent-{i}", note=i)
            store.get(f"s{i}")
            store.update(f"s{i}", note=i + 1)
            store.touch(f"s{i}")
            store.unbind(f"s{i}")
            bus.publish("log-quiet", {"i": i})

    calls(3)  # first use: clients, pools, schema (logged once, if at all)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcp_redis"):
        calls(30)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
