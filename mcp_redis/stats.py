"""`stats()`: what this process has done, and what Redis holds right now.

Two kinds of facts, kept apart on purpose:

* ``process``: the in-process counters and latency histograms of `METRICS`
  (cache hits per tier, fallbacks, retries, lock waits, rate-limit
  rejections...). They describe *this* process only: a server exposes its
  own by calling `stats()` (or by serving `mcp_redis.prometheus`); the
  ``mcp-redis stats`` command, a separate process, sees only its own.
* ``redis`` / ``postgres``: facts the backends hold for every process —
  Redis ``used_memory``, key counts per namespace (a bounded ``SCAN`` of the
  key prefix), pool use and breaker state.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from redis.client import NEVER_DECODE

from .metrics import METRICS, Metrics

if TYPE_CHECKING:
    from .client import Client

__all__ = ["stats", "summary", "process_stats", "redis_stats", "redis_ok", "postgres_stats", "cache_functions",
           "FEATURE_PREFIXES"]

# Metric name prefix -> section of the report.
FEATURE_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("lock_", "locks"),
    ("ratelimit_", "rate_limits"),
    ("cache_", "metadata_cache"),
    ("session_", "sessions"),
    ("events_", "events"),
    ("pubsub_", "events"),
    ("backend_", "backends"),
    ("breaker_", "backends"),
    ("health_", "backends"),
)

DEFAULT_SCAN_LIMIT = 100_000
log = logging.getLogger("mcp_redis.stats")


def _section(name: str) -> str:
    for prefix, section in FEATURE_PREFIXES:
        if name.startswith(prefix):
            return section
    return "other"


def _flat(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def process_stats(metrics: Metrics = METRICS) -> Dict[str, Any]:
    """This process's counters and latencies, grouped by feature.

    ``{"pid": ..., "<feature>": {"counters": {...}, "latencies": {...}}}``;
    counter keys are ``name{label=value,...}``, latencies give count, p50 and
    p99 in seconds (the upper bound of the histogram bucket; None above the top one).
    """
    out: Dict[str, Any] = {"pid": os.getpid()}
    for name, labels, value in metrics.counters():
        sec = out.setdefault(_section(name), {"counters": {}, "latencies": {}})
        sec["counters"][_flat(name, labels)] = value
    snap = metrics.snapshot()
    latencies = snap.get("latencies", {})
    assert isinstance(latencies, dict)
    for key, hist in latencies.items():
        sec = out.setdefault(_section(key), {"counters": {}, "latencies": {}})
        sec["latencies"][key] = hist
    functions = cache_functions()
    if functions:
        sec = out.setdefault("metadata_cache", {"counters": {}, "latencies": {}})
        sec["functions"] = functions
    return out


def cache_functions() -> Dict[str, Dict[str, Any]]:
    """``cache_info()`` of this process's `cached_metadata` functions, summed per namespace.

    L1 hits are counted only here (not in `METRICS`, to keep the hit path
    lock-free), so this is where the per-tier hit ratio comes from.
    """
    try:
        from . import cache as cache_module
    except ImportError:  # the cache feature is not in this build
        return {}
    every = getattr(cache_module, "_all_caches", None)
    if every is None:
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for fn in every():
        try:
            info = fn.cache_info()._asdict()
        except Exception:  # a function mid-reset: skip it this time
            log.debug("cache_info() failed", exc_info=True)
            continue
        agg = out.setdefault(str(getattr(fn, "namespace", "?")), {})
        for k, v in info.items():
            if isinstance(v, (int, float)):
                agg[k] = agg.get(k, 0) + v
    for agg in out.values():
        calls = agg.get("l1_hits", 0) + agg.get("l2_hits", 0) + agg.get("misses", 0)
        if calls:
            agg["hit_ratio_l1"] = round(agg.get("l1_hits", 0) / calls, 4)
            agg["hit_ratio_l2"] = round(agg.get("l2_hits", 0) / calls, 4)
    return out


def redis_stats(scan_limit: int = DEFAULT_SCAN_LIMIT, client: Optional[Client] = None) -> Dict[str, Any]:
    """Redis-side facts: memory, keys per namespace under the prefix, pool, breaker.

    The key count walks ``SCAN MATCH <prefix>*`` and stops after `scan_limit`
    keys (``keys_truncated`` tells); it never uses ``KEYS``. The report is the
    first deployment's (``REDIS_URL``'s); with features on Redis deployments of
    their own (``MCP_REDIS_<FEATURE>_URL``), ``deployments`` lists each, named as
    in `mcp_redis.health.redis_deployments` (`redis_ok` reads them all).
    """
    from .client import resolve
    from .health import redis_deployments

    c = resolve(client)
    s = c.settings
    deployments = redis_deployments(s)
    if not deployments:
        return {"configured": False}
    entries = [{"name": name, **_deployment_stats(c, feature, scan_limit)} for name, _, feature in deployments]
    out: Dict[str, Any] = {"configured": True, **{k: v for k, v in entries[0].items() if k != "name"}}
    if len(entries) > 1:
        # Each MCP_REDIS_<FEATURE>_URL of its own too; `redis` above is the first (REDIS_URL's).
        out["deployments"] = entries
    return out


def redis_ok(report: Mapping[str, Any]) -> bool:
    """False when a configured Redis deployment of a `redis_stats` report did not answer."""
    if not report.get("configured"):
        return True
    return all(bool(entry.get("ok")) for entry in report.get("deployments") or [report])


def _deployment_stats(c: Client, feature: Optional[str], scan_limit: int) -> Dict[str, Any]:
    s = c.settings
    out: Dict[str, Any] = {}
    try:
        conn = c.redis(feature) if feature is not None else c.redis()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["url"] = conn.url
    out["kind"] = conn.kind
    try:
        if conn.is_cluster:
            # One INFO per primary ({node: info}); the cluster's memory is their sum.
            per_node = conn.call(conn.client.info, "memory", target_nodes=conn.client.PRIMARIES, attempts=1)
            nodes = [v for v in per_node.values() if isinstance(v, dict)] if isinstance(per_node, dict) else []
            if nodes:
                info = {"used_memory": sum(int(v.get("used_memory", 0)) for v in nodes)}
                out["primaries"] = len(nodes)
            else:  # a single merged reply
                info = per_node
        else:
            info = conn.call(conn.client.info, "memory", attempts=1)
        out["used_memory"] = int(info.get("used_memory", 0))
        if "used_memory_human" in info:
            out["used_memory_human"] = info["used_memory_human"]
        started = time.perf_counter()
        try:
            out["keys"], out["keys_truncated"] = _count_keys(conn, s.key_prefix, scan_limit)
            out["scan_ms"] = round((time.perf_counter() - started) * 1000, 3)
        except Exception as exc:
            refused = conn.misconfiguration(exc)
            if refused is None:
                raise
            # Managed services and least-privilege users may refuse SCAN: the
            # rest of the report stands, the key counts say why they are missing.
            out["keys"] = None
            out["keys_error"] = (f"key counts need SCAN, which this Redis refuses ({type(refused).__name__}: "
                                 f"{refused}); run stats with a user granted '+scan'")
        out["ok"] = True
    except Exception as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["breaker"] = conn.policy.breaker.state.value
    out["pool"] = conn.pool_stats()
    return out


def _count_keys(conn: Any, prefix: str, limit: int) -> Tuple[Dict[str, int], bool]:
    counts: Dict[str, int] = {}
    seen = 0
    pattern = _glob_escape(prefix) + "*"
    skip = len(prefix.encode("utf-8"))
    # Keys as bytes: a foreign key under the prefix that is not UTF-8 is counted (its
    # namespace shown with escapes), not a UnicodeDecodeError reporting Redis as down.
    for key in conn.client.scan_iter(match=pattern, count=1000, **{NEVER_DECODE: True}):
        raw = key if isinstance(key, bytes) else str(key).encode("utf-8")
        namespace = raw[skip:].split(b":", 1)[0].decode("utf-8", "backslashreplace") or "(none)"
        counts[namespace] = counts.get(namespace, 0) + 1
        seen += 1
        if seen >= limit:
            return dict(sorted(counts.items())), True
    return dict(sorted(counts.items())), False


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def postgres_stats(client: Optional[Client] = None) -> Dict[str, Any]:
    """PostgreSQL pool use and breaker state (no query is run)."""
    from .client import resolve

    c = resolve(client)
    if not c.settings.database_url:
        return {"configured": False}
    try:
        pg = c.postgres()
    except Exception as exc:
        return {"configured": True, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "configured": True,
        "url": pg.url,
        "breaker": pg.policy.breaker.state.value,
        "pool": pg.pool_stats(),
    }


def summary(metrics: Metrics = METRICS) -> Dict[str, Any]:
    """The handful of numbers an operator looks at first, for this process.

    Cache hits per tier, fallbacks per feature, retries per backend, lock
    waits and timeouts, rate-limit rejections. (Breaker states are in the
    ``redis``/``postgres`` sections of `stats`.)
    """
    totals: Dict[str, float] = {}
    by_label: Dict[str, Dict[str, float]] = {}
    lock_timeouts = 0.0
    for name, labels, value in metrics.counters():
        totals[name] = totals.get(name, 0.0) + value
        if name == "lock_acquire_total" and labels.get("outcome") == "timeout":
            lock_timeouts += value
        if name in ("backend_retries_total", "backend_failures_total", "breaker_rejections_total"):
            per = by_label.setdefault(name, {})
            backend = labels.get("backend", "")
            per[backend] = per.get(backend, 0.0) + value
    waits = [h for h in metrics.histograms() if h[0] == "lock_wait_seconds"]
    wait_count = sum(h[4] for h in waits)
    wait_total = sum(h[3] for h in waits)
    cache: Dict[str, Any] = {}
    for info in cache_functions().values():
        for key in ("l1_hits", "l2_hits", "misses", "loader_calls", "errors", "stale_served"):
            cache[key] = cache.get(key, 0) + info.get(key, 0)
    lookups = cache.get("l1_hits", 0) + cache.get("l2_hits", 0) + cache.get("misses", 0)
    if lookups:
        cache["hit_ratio_l1"] = round(cache["l1_hits"] / lookups, 4)
        cache["hit_ratio_l2"] = round(cache["l2_hits"] / lookups, 4)
    return {
        "metadata_cache": cache,
        "fallbacks": {
            "locks": totals.get("lock_fallback_total", 0.0),
            "rate_limits": totals.get("ratelimit_fallback_total", 0.0),
            "sessions": totals.get("session_fallback_total", 0.0),
            "metadata_cache_stale_served": totals.get("cache_stale_served_total", 0.0),
        },
        "retries": by_label.get("backend_retries_total", {}),
        "backend_failures": by_label.get("backend_failures_total", {}),
        "breaker_rejections": by_label.get("breaker_rejections_total", {}),
        "lock_waits": {"count": wait_count, "mean_s": wait_total / wait_count if wait_count else 0.0},
        "lock_timeouts": lock_timeouts,
        "locks_lost": totals.get("lock_lost_total", 0.0),
        "ratelimit_rejections": totals.get("ratelimit_rejections_total", 0.0),
    }


def stats(*, backends: bool = True, scan_limit: int = DEFAULT_SCAN_LIMIT,
          metrics: Optional[Metrics] = None, client: Optional[Client] = None) -> Dict[str, Any]:
    """A JSON-ready report: this process's metrics, plus backend facts.

    Call it inside a server to expose that server's own counters (for
    example from an admin endpoint); ``backends=False`` skips the Redis and
    PostgreSQL round trips.
    """
    from .client import resolve
    from .health import deployment_warnings

    s = resolve(client).settings
    report: Dict[str, Any] = {
        "mode": "local" if s.local_mode else "redis",
        "shared": not s.local_mode,
        "warnings": deployment_warnings(s),
        "key_prefix": s.key_prefix,
        "summary": summary(metrics or METRICS),
        "process": process_stats(metrics or METRICS),
    }
    if backends:
        report["redis"] = redis_stats(scan_limit, client)
        report["postgres"] = postgres_stats(client)
    return report
