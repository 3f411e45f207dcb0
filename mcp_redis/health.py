"""`health()`: does Redis answer, does PostgreSQL answer, how busy are the pools."""

from __future__ import annotations

import time
from typing import Any, Dict, List

from .config import _FEATURE_ENV, Mode, Settings, settings
from .metrics import METRICS

__all__ = ["health", "deployment_warnings"]

_FEATURES = ("sessions", "locks", "rate_limits", "metadata_cache")


def deployment_warnings(s: Settings) -> List[str]:
    """What this configuration does not share or does not do, in plain words.

    A green check must not hide that nothing is shared: with ``REDIS_URL``
    unset every process has its own locks, limits and caches. These lines
    are reported by `health()`, `stats()` and the CLI; none makes ``ok`` False.
    """
    out: List[str] = []
    if not s.redis_url:
        out.append("REDIS_URL is not set: local mode, nothing is shared between processes or hosts "
                   "(host-local file locks, per-process rate limits, caches and sessions)")
    for feature in _FEATURES:
        mode = s.mode(feature)
        var = _FEATURE_ENV[feature]
        if mode is Mode.OFF:
            out.append(f"{feature} is off ({var}=off): calls to it raise FeatureDisabled")
        elif mode is Mode.LOCAL and s.redis_url:
            out.append(f"{feature} is local ({var}=local): not shared between processes or hosts")
    if not s.database_url:
        out.append("DATABASE_URL is not set: no PostgreSQL (no durable session store, "
                   "no 'postgres' backend or fallback, nothing for `sessions cleanup` or `migrate`)")
    return out


def health() -> Dict[str, Any]:
    """A JSON-ready report; ``ok`` is False when a configured backend is down.

    ``shared`` is False in local mode (no ``REDIS_URL``: nothing is shared
    between processes), and ``warnings`` says so, as it says which features
    are off, local or without PostgreSQL.

    Probes bypass the retry policy (one attempt) so a down backend is
    reported within about one connect timeout.
    """
    s = settings()
    report: Dict[str, Any] = {
        "ok": True,
        "mode": "local" if s.local_mode else "redis",
        "shared": not s.local_mode,
        "warnings": deployment_warnings(s),
        "features": {f: s.mode(f).value for f in _FEATURES},
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
        shown = conn.misconfiguration(exc) or exc  # a refusal says what to fix
        out["error"] = f"{type(shown).__name__}: {shown}"
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
