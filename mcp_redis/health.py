"""`health()`: does Redis answer, does PostgreSQL answer, how busy are the pools."""

from __future__ import annotations

import time
from typing import Any, Dict

from .config import settings
from .metrics import METRICS

__all__ = ["health"]


def health() -> Dict[str, Any]:
    """A JSON-ready report; ``ok`` is False when a configured backend is down.

    Probes bypass the retry policy (one attempt) so a down backend is
    reported within about one connect timeout.
    """
    s = settings()
    report: Dict[str, Any] = {
        "ok": True,
        "mode": "local" if s.local_mode else "redis",
        "features": {f: s.mode(f).value for f in ("sessions", "locks", "rate_limits", "metadata_cache")},
        "redis": {"configured": bool(s.redis_url)},
        "postgres": {"configured": bool(s.database_url)},
    }
    if s.redis_url:
        report["redis"].update(_redis_health())
        report["ok"] = report["ok"] and report["redis"]["ok"]
    if s.database_url:
        report["postgres"].update(_postgres_health())
        report["ok"] = report["ok"] and report["postgres"]["ok"]
    return report


def _redis_health() -> Dict[str, Any]:
    from .connections import get_redis

    out: Dict[str, Any] = {}
    try:
        conn = get_redis()
    except Exception as exc:  # configuration or eager cluster connect
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["url"] = conn.url
    out["kind"] = conn.kind
    start = time.perf_counter()
    try:
        conn.client.ping()
        out["ok"] = True
        out["ping_ms"] = round((time.perf_counter() - start) * 1000, 3)
        conn.policy.breaker.record_success()
    except Exception as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["breaker"] = conn.policy.breaker.state.value
    out["pool"] = conn.pool_stats()
    METRICS.inc("health_checks_total", backend="redis", ok=str(out["ok"]).lower())
    return out


def _postgres_health() -> Dict[str, Any]:
    from .postgres import get_postgres

    out: Dict[str, Any] = {}
    try:
        pg = get_postgres()
        out["url"] = pg.url
        out["ping_ms"] = round(pg.ping() * 1000, 3)
        out["ok"] = True
    except Exception as exc:
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["breaker"] = pg.policy.breaker.state.value
    out["pool"] = pg.pool_stats()
    return out
