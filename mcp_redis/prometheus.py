"""Prometheus exposition of `METRICS` (needs the ``prometheus`` extra).

::

    from mcp_redis.prometheus import start_http_server
    start_http_server(9464)            # serves /metrics on 127.0.0.1:9464

or register the collector in a registry you already serve::

    from mcp_redis.prometheus import register
    register()                         # prometheus_client.REGISTRY by default

Every in-process counter ``<name>_total`` becomes the Prometheus counter
``mcp_redis_<name>_total``, every latency histogram ``<name>`` the histogram
``mcp_redis_<name>`` (seconds, buckets `LATENCY_BUCKETS`), with the same
labels. Gauge families describe the backends: ``mcp_redis_breaker_state``,
``mcp_redis_pool_connections`` and, read from Redis ``INFO memory`` at scrape
time, ``mcp_redis_redis_up`` and ``mcp_redis_redis_memory_{used,max}_bytes``;
``mcp_redis_cache_invalidations_pending`` counts cache invalidations waiting
for Redis. The metric list is in docs/operations.md; alert rules and a
Grafana dashboard over these names are in contrib/monitoring/.
prometheus_client is imported lazily, so this module imports without it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from .metrics import LATENCY_BUCKETS, METRICS, Metrics

__all__ = ["MetricsCollector", "register", "start_http_server", "exposition", "NAMESPACE", "DOCS"]

NAMESPACE = "mcp_redis"
log = logging.getLogger("mcp_redis.prometheus")

# Help text of the metrics the library records (others get a generic line).
DOCS: Dict[str, str] = {
    "backend_retries_total": "Retries of a transient backend failure (label backend).",
    "backend_failures_total": "Backend calls that failed with a transient error (label backend).",
    "configuration_errors_total": "Backend refusals only the operator can fix: credentials, ACL, DB index, ... (label backend).",
    "breaker_transitions_total": "Circuit-breaker state changes (labels backend, to).",
    "breaker_rejections_total": "Calls refused at once because the breaker was open (label backend).",
    "health_checks_total": "health() probes (labels backend, ok).",
    "pubsub_reconnects_total": "Pub/sub listener reconnects.",
    "pubsub_handler_errors_total": "Exceptions raised by pub/sub handlers (logged, not fatal).",
    "lock_acquire_total": "Lock acquisitions (labels backend, outcome: acquired, reentered, timeout).",
    "lock_wait_seconds": "Time spent waiting for a lock, in seconds.",
    "lock_release_total": "Releases that found the lease lost, or were retried in the background (labels backend, outcome).",
    "lock_renew_total": "Background lease renewals (label outcome).",
    "lock_lost_total": "Leases lost while held (label backend).",
    "lock_takeover_total": "Locks taken over from a holder whose process liveness key was gone.",
    "lock_fallback_total": "Locks taken by the fallback backend (label to).",
    "ratelimit_rejections_total": "Rate-limited calls refused (labels limiter, backend).",
    "ratelimit_fallback_total": "Rate-limit decisions made by the fallback (labels backend, to).",
    "ratelimit_local_full_total": "Calls refused because the in-process limiter was full of live state (label limiter).",
    "cache_l2_hits_total": "Metadata-cache hits in Redis (L2).",
    "cache_misses_total": "Metadata-cache lookups found in neither tier.",
    "cache_loader_calls_total": "Metadata loader runs (queries to the source of truth).",
    "cache_load_seconds": "Metadata loader latency, in seconds.",
    "cache_errors_total": "Metadata-cache errors absorbed (Redis errors, bad values).",
    "cache_invalidations_total": "Metadata-cache invalidations made in this process.",
    "session_bind_total": "Session bindings written (label mode).",
    "session_fallback_total": "Session calls served by PostgreSQL while Redis was down (label op).",
    "events_published_total": "Events published.",
    "events_delivered_total": "Events handed to handlers in this process (label kind).",
}

_BREAKER_STATES = ("closed", "open", "half_open")


def _require_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ConfigurationError(
            "prometheus exposition needs prometheus_client: pip install 'mcp_redis[prometheus]'"
        ) from exc
    return prometheus_client


def _family_name(name: str) -> str:
    base = name[: -len("_total")] if name.endswith("_total") else name
    return f"{NAMESPACE}_{base}"


def _label_names(rows: Sequence[Mapping[str, str]]) -> List[str]:
    names: set[str] = set()
    for labels in rows:
        names.update(labels)
    return sorted(names)


class MetricsCollector:
    """A prometheus_client collector reading a `Metrics` at scrape time."""

    def __init__(self, metrics: Metrics = METRICS, *, backends: bool = True) -> None:
        self.metrics = metrics
        self.backends = backends

    def describe(self) -> List[Any]:
        # Families appear as features record; no fixed description up front.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        counters: Dict[str, List[Tuple[Mapping[str, str], float]]] = {}
        for name, labels, value in self.metrics.counters():
            counters.setdefault(name, []).append((labels, value))
        for name, rows in counters.items():
            label_names = _label_names([lb for lb, _ in rows])
            fam = CounterMetricFamily(_family_name(name), DOCS.get(name, f"mcp_redis counter {name}."),
                                      labels=label_names)
            for labels, value in rows:
                fam.add_metric([labels.get(n, "") for n in label_names], value)
            yield fam

        hists: Dict[str, List[Tuple[Mapping[str, str], List[int], float, int]]] = {}
        for name, labels, counts, total, count in self.metrics.histograms():
            hists.setdefault(name, []).append((labels, counts, total, count))
        for name, hrows in hists.items():
            label_names = _label_names([row[0] for row in hrows])
            hfam = HistogramMetricFamily(f"{NAMESPACE}_{name}",
                                         DOCS.get(name, f"mcp_redis latency of {name}, in seconds."),
                                         labels=label_names)
            for labels, counts, total, count in hrows:
                buckets: List[Tuple[str, float]] = []
                cumulative = 0
                for bound, c in zip(LATENCY_BUCKETS, counts):
                    cumulative += c
                    buckets.append((repr(float(bound)), cumulative))
                buckets.append(("+Inf", count))
                hfam.add_metric([labels.get(n, "") for n in label_names], buckets, total)
            yield hfam

        yield from _cache_families(skip=set(counters) | set(hists))

        if self.backends:
            breaker = GaugeMetricFamily(f"{NAMESPACE}_breaker_state",
                                        "1 for the current circuit-breaker state of each backend.",
                                        labels=["backend", "state"])
            pool = GaugeMetricFamily(f"{NAMESPACE}_pool_connections",
                                     "Connection-pool use of each backend (state: in_use, idle, max).",
                                     labels=["backend", "state"])
            for backend, state, stats in _backend_facts():
                for s in _BREAKER_STATES:
                    breaker.add_metric([backend, s], 1.0 if s == state else 0.0)
                for key in ("in_use", "idle", "max"):
                    if key in stats:
                        pool.add_metric([backend, key], float(stats[key]))
            yield breaker
            yield pool
            yield from _redis_memory_families()


def _cache_families(skip: set[str]) -> Iterator[Any]:
    """L1/L2 hits and L1 sizes from ``cache_info()`` (those hits are not in `METRICS`), pending invalidations."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from .stats import cache_functions

    functions = cache_functions()
    if not functions:
        return
    hits = CounterMetricFamily(f"{NAMESPACE}_cache_l1_hits", "Metadata-cache hits served from the in-process L1.",
                               labels=["namespace"])
    l2_hits = CounterMetricFamily(f"{NAMESPACE}_cache_l2_hits", "Metadata-cache hits in Redis (L2).",
                                  labels=["namespace"])
    size = GaugeMetricFamily(f"{NAMESPACE}_cache_l1_entries", "Entries in the in-process L1 metadata cache.",
                             labels=["namespace"])
    for namespace, info in functions.items():
        hits.add_metric([namespace], float(info.get("l1_hits", 0)))
        l2_hits.add_metric([namespace], float(info.get("l2_hits", 0)))
        size.add_metric([namespace], float(info.get("l1_size", 0)))
    if "cache_l1_hits_total" not in skip and "cache_l1_hits" not in skip:  # the feature may count them itself
        yield hits
    if "cache_l2_hits_total" not in skip:  # counted in cache_info() only, like L1 hits
        yield l2_hits
    yield size
    pending = GaugeMetricFamily(f"{NAMESPACE}_cache_invalidations_pending",
                                "Invalidations made while Redis was unreachable, not yet published to other "
                                "processes (an invalidate_all counts as one).", labels=["namespace"])
    for namespace, count in _pending_invalidations().items():
        pending.add_metric([namespace], float(count))
    yield pending


def _pending_invalidations() -> Dict[str, int]:
    """Invalidations each namespace still has to replay into Redis (see cache.py ``_pending``)."""
    from .cache.invalidation import all_caches

    out: Dict[str, int] = {}
    for fn in all_caches():
        # Read without the function's lock: a gauge may be one scrape behind.
        count = len(getattr(fn, "_pending", ())) + (1 if getattr(fn, "_pending_all", False) else 0)
        namespace = str(getattr(fn, "namespace", "?"))
        out[namespace] = out.get(namespace, 0) + count
    return out


def _redis_memory_families() -> Iterator[Any]:
    """``mcp_redis_redis_up`` and the memory gauges, from one ``INFO memory`` per deployment and scrape.

    Labelled ``backend`` by deployment: ``redis`` (``REDIS_URL``), or
    ``redis:<features>`` for a ``MCP_REDIS_<FEATURE>_URL`` of its own. The
    probe bypasses the resilience policy, so a failing scrape never feeds
    the circuit breaker, and it is skipped while the breaker is open (Redis
    is then reported down without waiting a timeout). On Cluster each primary
    is one ``node``; otherwise the one node is ``node="master"``. An error
    reply (e.g. ``NOPERM``: the user lacks ``+info``) counts as up, without
    memory gauges. Nothing is yielded when no Redis URL is set.
    """
    from prometheus_client.core import GaugeMetricFamily

    deployments = _redis_deployments()
    if not deployments:
        return
    up = GaugeMetricFamily(f"{NAMESPACE}_redis_up",
                           "1 when Redis answered INFO at this scrape, 0 when it did not or the breaker is open.",
                           labels=["backend"])
    used = GaugeMetricFamily(f"{NAMESPACE}_redis_memory_used_bytes", "Redis used_memory, bytes (INFO memory).",
                             labels=["backend", "node"])
    limit = GaugeMetricFamily(f"{NAMESPACE}_redis_memory_max_bytes",
                              "Redis maxmemory, bytes (INFO memory); 0 means no limit.", labels=["backend", "node"])
    any_memory = False
    for name, feature in deployments:
        answered, nodes = _redis_memory(feature)
        up.add_metric([name], 1.0 if answered else 0.0)
        for node, info in nodes.items():
            used.add_metric([name, node], float(info.get("used_memory", 0)))
            limit.add_metric([name, node], float(info.get("maxmemory", 0)))
            any_memory = True
    yield up
    if any_memory:
        yield used
        yield limit


def _redis_deployments() -> List[Tuple[str, Optional[str]]]:
    """(backend label, feature) of each Redis deployment (see `health.redis_deployments`); never raises."""
    from .config import settings
    from .health import redis_deployments

    try:
        return [(name, feature) for name, _, feature in redis_deployments(settings())]
    except Exception:
        return []


def _redis_memory(feature: Optional[str]) -> Tuple[bool, Dict[str, Mapping[str, Any]]]:
    """(answered, INFO memory by node) of one deployment, bypassing its policy."""
    import redis.exceptions

    try:
        from .client import default_client
        from .resilience import BreakerState

        client = default_client()
        conn = client.redis(feature) if feature is not None else client.redis()
        if conn.policy.breaker.state is BreakerState.OPEN:
            return False, {}
        nodes: Dict[str, Mapping[str, Any]]
        if conn.is_cluster:
            reply = conn.client.info("memory", target_nodes=conn.client.PRIMARIES)
            nodes = {str(k): v for k, v in reply.items() if isinstance(v, dict)}
        else:
            nodes = {"master": conn.client.info("memory")}
        return bool(nodes), nodes
    except redis.exceptions.ResponseError:
        # Redis answered with an error reply: reachable, but INFO is not allowed
        # (the least-privilege ACL of docs/security.md has no +info).
        log.debug("redis INFO memory refused", exc_info=True)
        return True, {}
    except Exception:
        log.debug("redis INFO memory unavailable", exc_info=True)
        return False, {}


def _backend_facts() -> List[Tuple[str, str, Mapping[str, int]]]:
    """(backend, breaker state, pool stats) of the configured backends; never raises."""
    from .config import settings

    out: List[Tuple[str, str, Mapping[str, int]]] = []
    try:
        s = settings()
    except Exception:
        return out
    for name, feature in _redis_deployments():
        try:
            from .client import default_client

            client = default_client()
            conn = client.redis(feature) if feature is not None else client.redis()
            out.append((name, conn.policy.breaker.state.value, _pool_stats(conn.pool_stats)))
        except Exception:
            log.debug("redis facts unavailable", exc_info=True)
    if s.database_url:
        try:
            from .client import default_client

            pg = default_client().postgres()
            out.append(("postgres", pg.policy.breaker.state.value, _pool_stats(pg.pool_stats)))
        except Exception:
            log.debug("postgres facts unavailable", exc_info=True)
    return out


def _pool_stats(read: Callable[[], Mapping[str, int]]) -> Mapping[str, int]:
    """Pool figures, read without locks: a pool changing under us is retried, then skipped."""
    for _ in range(3):
        try:
            return read()
        except RuntimeError:  # e.g. "deque mutated during iteration"
            continue
    return {}


_registered_lock = threading.Lock()
# Keyed by the registry itself (weakly): an id() would be reused by a new
# registry once an old one is collected, which then got no collector.
_registered: weakref.WeakKeyDictionary[Any, MetricsCollector] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    global _registered_lock
    _registered_lock = threading.Lock()  # a parent thread may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register(registry: Optional[Any] = None, metrics: Metrics = METRICS) -> MetricsCollector:
    """Register a `MetricsCollector` in `registry` (default: prometheus_client's) once."""
    client = _require_client()
    reg = registry if registry is not None else client.REGISTRY
    with _registered_lock:
        existing = _registered.get(reg)
        if existing is not None:
            return existing
        collector = MetricsCollector(metrics)
        reg.register(collector)
        _registered[reg] = collector
        return collector


def start_http_server(port: int, addr: str = "127.0.0.1", registry: Optional[Any] = None) -> Tuple[Any, Any]:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns (server, thread).

    Loopback by default: bind another address only behind your own access
    control. Uses prometheus_client's default registry unless `registry`
    is given, so the process's other metrics are served alongside.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidArgumentType("port", f"must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise InvalidArgument("port", f"must be between 0 and 65535, got {port}")
    if not isinstance(addr, str) or not addr:
        raise InvalidArgumentType("addr", f"must be a non-empty str, not {addr!r}")
    client = _require_client()
    reg = registry if registry is not None else client.REGISTRY
    try:
        socket.getaddrinfo(addr, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise InvalidArgument("addr", f"cannot bind {addr!r}: {exc}") from None
    register(reg)
    result = client.start_http_server(port, addr=addr, registry=reg)
    if isinstance(result, tuple):
        return result[0], result[1]
    return result, None  # pragma: no cover - prometheus_client < 0.20 returned None (setup.cfg asks for 0.20)


def exposition(registry: Optional[Any] = None) -> str:
    """The text exposition of the library's metrics (for an existing HTTP route)."""
    client = _require_client()
    if registry is None:
        registry = client.CollectorRegistry()
        registry.register(MetricsCollector())
    data: bytes = client.generate_latest(registry)
    return data.decode("utf-8")
