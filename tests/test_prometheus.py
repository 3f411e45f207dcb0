"""The Prometheus endpoint, scraped over HTTP, shows the metrics docs/operations.md lists."""

from __future__ import annotations

import pathlib
import sys
import threading
import time
import urllib.request
from typing import Dict, Iterator, List, Set

import pytest

import mcp_redis
from mcp_redis.connections import get_redis
from mcp_redis.errors import ConfigurationError
from mcp_redis.metrics import LATENCY_BUCKETS, METRICS
from mcp_redis.testing import free_port

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "operations.md"

# Sample names a scrape shows once each feature has been used (and Redis has failed once).
DOCUMENTED_AFTER_USE = [
    "mcp_redis_lock_acquire_total",
    "mcp_redis_lock_wait_seconds_bucket",
    "mcp_redis_ratelimit_rejections_total",
    "mcp_redis_cache_misses_total",
    "mcp_redis_cache_loader_calls_total",
    "mcp_redis_cache_l1_hits_total",
    "mcp_redis_cache_l1_entries",
    "mcp_redis_cache_load_seconds_bucket",
    "mcp_redis_session_bind_total",
    "mcp_redis_events_published_total",
    "mcp_redis_events_delivered_total",
    "mcp_redis_backend_failures_total",
    "mcp_redis_backend_retries_total",
    "mcp_redis_breaker_transitions_total",
    "mcp_redis_breaker_rejections_total",
    "mcp_redis_breaker_state",
    "mcp_redis_pool_connections",
]


@pytest.fixture
def endpoint() -> Iterator[str]:
    from mcp_redis.prometheus import start_http_server

    registry = prometheus_client.CollectorRegistry()
    port = free_port()
    server, _thread = start_http_server(port, registry=registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def scrape(url: str) -> Dict[str, List[object]]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        text = resp.read().decode("utf-8")
    samples: Dict[str, List[object]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def use_every_feature() -> object:
    """What a server does in its first minute: every feature once, over Redis."""
    # A contended acquisition (only those are timed): another thread holds the
    # lock until this one has joined the queue of waiters.
    from mcp_redis.keys import KeySpace

    queue = KeySpace(mcp_redis.settings().key_prefix).key("agent-lock", "agent-1", tag=True, suffix="queue")
    held = threading.Event()

    def holder() -> None:
        with mcp_redis.agent_lock("agent-1", blocking_timeout=5):
            held.set()
            client = get_redis().client
            deadline = time.monotonic() + 10
            while not client.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.001)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    with mcp_redis.agent_lock("agent-1", blocking_timeout=15):
        pass
    thread.join(10)

    @mcp_redis.rate_limited("prom_test", limit=1, window=60, key="agent_id")
    def store_knowledge(agent_id: str) -> None:
        pass

    store_knowledge("agent-1")
    with pytest.raises(mcp_redis.RateLimitExceeded):
        store_knowledge("agent-1")

    @mcp_redis.cached_metadata(ttl=60)
    def load_agent_metadata(agent_id: str) -> dict:  # type: ignore[type-arg]
        return {"agent_id": agent_id}

    for _ in range(3):
        load_agent_metadata("agent-1")

    mcp_redis.SessionStore().bind("session-1", "agent-1")

    got: List[object] = []
    bus = mcp_redis.EventBus()
    sub = bus.subscribe("agent:updates", got.append)
    try:
        mcp_redis.publish_agent_update("agent-1", "state_changed", {"n": 1})
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sub.close()
    return load_agent_metadata  # a server keeps its cached functions alive


def fail_redis_until_the_breaker_opens() -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", breaker_failure_threshold=2,
                        retry_attempts=2, retry_initial_backoff=0.001, retry_max_backoff=0.002)
    conn = get_redis()
    for _ in range(3):
        with pytest.raises(mcp_redis.BackendUnavailable):
            conn.call(conn.client.ping)


def test_scrape_shows_the_documented_metrics_after_use(redis_mode: str, endpoint: str) -> None:
    keep = use_every_feature()
    fail_redis_until_the_breaker_opens()
    samples = scrape(endpoint)
    missing = [name for name in DOCUMENTED_AFTER_USE if name not in samples]
    assert not missing, f"not exposed: {missing}"
    del keep
    rejections = samples["mcp_redis_ratelimit_rejections_total"]
    assert sum(s.value for s in rejections) == 1  # type: ignore[attr-defined]
    states = {s.labels["state"]: s.value for s in samples["mcp_redis_breaker_state"]  # type: ignore[attr-defined]
              if s.labels["backend"] == "redis"}  # type: ignore[attr-defined]
    assert states["open"] + states["half_open"] == 1 and states["closed"] == 0


def test_every_metric_the_test_expects_is_listed_in_the_operations_doc() -> None:
    text = DOCS.read_text(encoding="utf-8")
    base = {n.removesuffix("_bucket") for n in DOCUMENTED_AFTER_USE}
    assert [n for n in sorted(base) if f"`{n}`" not in text] == []


def test_histograms_carry_the_library_buckets_cumulatively(endpoint: str) -> None:
    METRICS.observe("lock_wait_seconds", 0.0003, backend="redis")
    METRICS.observe("lock_wait_seconds", 0.02, backend="redis")
    METRICS.observe("lock_wait_seconds", 99.0, backend="redis")
    samples = scrape(endpoint)
    buckets = {s.labels["le"]: s.value for s in samples["mcp_redis_lock_wait_seconds_bucket"]}  # type: ignore[attr-defined]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert buckets["0.0005"] == 1 and buckets["0.025"] == 2 and buckets["+Inf"] == 3
    (count,) = samples["mcp_redis_lock_wait_seconds_count"]
    assert count.value == 3  # type: ignore[attr-defined]


def test_counters_with_different_label_sets_share_one_family(endpoint: str) -> None:
    METRICS.inc("lock_acquire_total", backend="redis", outcome="acquired")
    METRICS.inc("lock_acquire_total", backend="local")
    samples = scrape(endpoint)
    labels: Set[tuple] = {tuple(sorted(s.labels.items())) for s in samples["mcp_redis_lock_acquire_total"]}  # type: ignore[attr-defined,type-arg]
    assert labels == {(("backend", "redis"), ("outcome", "acquired")), (("backend", "local"), ("outcome", ""))}


def test_register_is_idempotent_per_registry() -> None:
    from mcp_redis.prometheus import register

    registry = prometheus_client.CollectorRegistry()
    assert register(registry) is register(registry)


def test_every_new_registry_gets_the_collector_even_where_an_old_one_was_freed() -> None:
    # A registry that is garbage-collected frees its id(); CPython hands the
    # same address to the next object, so a cache keyed by id() answered
    # "already registered" for a registry that had nothing.
    from prometheus_client import CollectorRegistry

    from mcp_redis.prometheus import register

    METRICS.inc("lock_acquire_total", backend="redis", outcome="acquired")
    for _ in range(50):
        registry = CollectorRegistry()
        register(registry)
        assert registry.get_sample_value(
            "mcp_redis_lock_acquire_total", {"backend": "redis", "outcome": "acquired"}) == 1.0
        del registry


def test_without_prometheus_client_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp_redis import prometheus

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"mcp_redis\[prometheus\]"):
        prometheus.start_http_server(free_port())


def test_every_metric_the_library_records_is_in_the_operations_doc() -> None:
    import re

    package = pathlib.Path(mcp_redis.__file__).resolve().parent
    recorded = set()
    for source in package.glob("*.py"):
        for name in re.findall(r'\.(?:inc|observe)\(\s*"([a-z_]+)"', source.read_text(encoding="utf-8")):
            recorded.add(name)
    text = DOCS.read_text(encoding="utf-8")
    undocumented = sorted(n for n in recorded if f"`mcp_redis_{n.removesuffix('_total')}" not in text)
    assert undocumented == [], "add these to docs/operations.md's metric list"


@pytest.mark.parametrize("kwargs,argument", [({"port": -1}, "port"), ({"port": 70000}, "port"),
                                             ({"port": True}, "port"), ({"port": "9100"}, "port"),
                                             ({"port": 0, "addr": "no such host.invalid"}, "addr"),
                                             ({"port": 0, "addr": ""}, "addr")])
def test_start_http_server_refuses_bad_arguments_naming_them(kwargs: Dict[str, object], argument: str) -> None:
    from mcp_redis.errors import InvalidArgument, InvalidArgumentType
    from mcp_redis.prometheus import start_http_server

    registry = prometheus_client.CollectorRegistry()
    with pytest.raises((InvalidArgument, InvalidArgumentType)) as info:
        start_http_server(registry=registry, **kwargs)  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert list(registry.collect()) == [], "nothing registered"
