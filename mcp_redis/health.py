"""`health()`: does Redis answer, does PostgreSQL answer, how busy are the pools."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import redis.exceptions as rex

from .config import _FEATURE_ENV, _FEATURES, Mode, Settings, redact_url, scrub
from .metrics import METRICS

if TYPE_CHECKING:
    from .client import Client
    from .connections import RedisConnection

__all__ = ["health", "deployment_warnings", "maxmemory_policy", "redis_deployments"]

# Features whose keys must never be evicted: a lost lock key lets a second
# holder in, a lost session or rate-limit counter forgets state.
_STATEFUL = ("locks", "sessions", "rate_limits")


def deployment_warnings(s: Settings) -> List[str]:
    """What this configuration does not share or does not do, in plain words.

    A green check must not hide that nothing is shared: with ``REDIS_URL``
    unset every process has its own locks, limits and caches. These lines
    are reported by `health()`, `stats()` and the CLI; none makes ``ok`` False.
    """
    out: List[str] = []
    if not s.redis_urls():
        out.append("REDIS_URL is not set: local mode, nothing is shared between processes or hosts "
                   "(host-local file locks, per-process rate limits, caches and sessions)")
    for feature in _FEATURES:
        mode = s.mode(feature)
        var = _FEATURE_ENV[feature]
        if mode is Mode.OFF:
            out.append(f"{feature} is off ({var}=off): calls to it raise FeatureDisabled")
        elif mode is Mode.LOCAL and s.url(feature):
            out.append(f"{feature} is local ({var}=local): not shared between processes or hosts")
    if not s.database_url:
        out.append("DATABASE_URL is not set: no PostgreSQL (no durable session store, "
                   "no 'postgres' backend or fallback, nothing for `sessions cleanup` or `migrate`)")
    return out


def health(client: Optional[Client] = None) -> Dict[str, Any]:
    """A JSON-ready report; ``ok`` is False when a configured backend is down.

    ``shared`` is False in local mode (no ``REDIS_URL``: nothing is shared
    between processes), and ``warnings`` says so, as it says which features
    are off, local or without PostgreSQL.

    Probes bypass the retry policy (one attempt) so a down backend is
    reported within about one connect timeout.
    """
    from .client import resolve

    client = resolve(client)
    s = client.settings
    deployments = _deployments(s)
    report: Dict[str, Any] = {
        "ok": True,
        "mode": "local" if s.local_mode else "redis",
        "shared": not s.local_mode,
        "warnings": deployment_warnings(s),
        "features": {f: s.mode(f).value for f in _FEATURES},
        # A Redis that some feature (or REDIS_URL) uses, as `stats` counts it: a feature URL
        # whose feature is local or off configures nothing.
        "redis": {"configured": bool(deployments)},
        "postgres": {"configured": bool(s.database_url)},
    }
    if deployments:
        report["deployments"] = []
        for url, features in deployments.items():
            entry = {"features": features, **_redis_health(client, features[0] if features else None, url)}
            report["deployments"].append(entry)
            report["ok"] = report["ok"] and entry["ok"]
            risky = [f for f in features if f in _STATEFUL]
            policy = entry.get("maxmemory_policy")
            if risky and policy is not None and policy != "noeviction":
                report["warnings"].append(
                    f"{', '.join(risky)} on {entry.get('url', redact_url(url))}, whose maxmemory-policy is "
                    f"{policy!r}: Redis may evict their keys (a lost lock admits a second holder); "
                    "give them an instance with maxmemory-policy noeviction (MCP_REDIS_LOCKS_URL, ...)"
                )
        first = report["deployments"][0]
        report["redis"].update({k: v for k, v in first.items() if k != "features"})
    if s.database_url:
        report["postgres"].update(_postgres_health(client))
        report["ok"] = report["ok"] and report["postgres"]["ok"]
    return report


def _deployments(s: Settings) -> Dict[str, List[str]]:
    """Each distinct Redis URL (REDIS_URL first) with the Redis-mode features on it."""
    out: Dict[str, List[str]] = {url: [] for url in s.redis_urls()}
    for feature in _FEATURES:
        url = s.url(feature)
        if url and s.mode(feature) is Mode.REDIS:
            out[url].append(feature)
    if s.redis_url and not out[s.redis_url]:
        pass  # REDIS_URL itself is still probed (the CLI and the old report read it)
    return {url: features for url, features in out.items() if features or url == s.redis_url}


def redis_deployments(s: Settings) -> List[Tuple[str, str, Optional[str]]]:
    """Each distinct Redis deployment as ``(name, url, feature)``, REDIS_URL's first.

    `name` labels it in reports and metrics: ``redis`` for ``REDIS_URL``'s, else
    ``redis:<its features>`` (a ``MCP_REDIS_<FEATURE>_URL`` of its own); `feature`
    is one feature on it, for ``client.redis(feature)`` (None: ``REDIS_URL``'s)."""
    out: List[Tuple[str, str, Optional[str]]] = []
    for url, features in _deployments(s).items():
        if url == s.redis_url:
            out.append(("redis", url, None))
        else:
            out.append((f"redis:{','.join(features)}", url, features[0]))
    return out


def maxmemory_policy(conn: RedisConnection) -> Optional[str]:
    """The server's ``maxmemory-policy``: ``INFO memory``, else ``CONFIG GET``.

    INFO first: the minimal ACL of docs/security.md grants ``+info`` but not
    ``CONFIG`` (refused on most managed services too), so the probe leaves no
    denial in ``ACL LOG``. None when neither answers; a cluster reports the
    first node's policy.
    """
    client = conn.client
    try:
        info = client.info("memory")
        if isinstance(info, dict):
            value = info.get("maxmemory_policy")
            if value is None:  # a cluster: per node
                for node_info in info.values():
                    if isinstance(node_info, dict) and "maxmemory_policy" in node_info:
                        value = node_info["maxmemory_policy"]
                        break
            if value is not None:
                return str(value)
    except Exception:  # noqa: S110 - INFO renamed or refused: try CONFIG
        pass
    try:
        reply = client.config_get("maxmemory-policy")
        if isinstance(reply, dict):
            for value in reply.values():
                if isinstance(value, dict):  # a cluster: per node
                    value = value.get("maxmemory-policy")
                if isinstance(value, str):
                    return value
    except Exception:  # noqa: S110 - reported as unknown
        pass
    return None


def _out_of_memory(conn: RedisConnection) -> Optional[str]:
    """Why the server refuses writes for lack of memory (``noeviction`` at ``maxmemory``), or None."""
    try:
        info = conn.client.info("memory")
    except Exception:  # INFO refused: the calls themselves will tell
        return None
    nodes = [info] if "used_memory" in info else [v for v in info.values() if isinstance(v, dict)]
    for node in nodes:
        # Redis's own test: replica output and AOF buffers do not count
        # (`mem_not_counted_for_evict`), and only memory above the limit refuses.
        used = int(node.get("used_memory", 0)) - int(node.get("mem_not_counted_for_evict", 0))
        limit = int(node.get("maxmemory", 0))
        if limit and used > limit and node.get("maxmemory_policy") == "noeviction":
            return (f"OutOfMemory: used memory {used} (buffers not counted) > maxmemory {limit} with "
                    "maxmemory-policy noeviction: the server refuses writes (features use their fallbacks)")
    return None


def _read_only(conn: RedisConnection) -> Optional[str]:
    """Why a plain URL's server refuses writes as a replica (``INFO replication``), or None.

    Only a plain URL: Sentinel and Cluster clients find their master themselves."""
    if conn.kind != "single":
        return None
    try:
        info = conn.client.info("replication")
    except Exception:  # INFO refused: the calls themselves will tell
        return None
    if not isinstance(info, dict) or info.get("role") not in ("slave", "replica"):
        return None
    return str(conn.misconfiguration(rex.ReadOnlyError("You can't write against a read only replica.")))


def _refuses_writes(conn: RedisConnection) -> Optional[str]:
    """Why an answering deployment still refuses the library's writes, or None."""
    read_only = _read_only(conn)
    if read_only is not None:
        return f"ReadOnlyServer: {read_only}"
    return _out_of_memory(conn)


def _redis_health(client: Client, feature: Optional[str], url: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        conn = client.redis(feature) if feature is not None else client.redis()
    except Exception as exc:  # a configuration error (a cluster is built lazily)
        return {"ok": False, "url": redact_url(url), "error": scrub(f"{type(exc).__name__}: {exc}", url)}
    out["url"] = conn.url
    out["kind"] = conn.kind
    start = time.perf_counter()
    try:
        if conn.is_cluster:
            # Every primary: one answering node says nothing of the slots of a hung one.
            conn.client.ping(target_nodes=conn.client.PRIMARIES)
        else:
            conn.client.ping()
        out["ping_ms"] = round((time.perf_counter() - start) * 1000, 3)
        refusal = _refuses_writes(conn)
        out["ok"] = refusal is None
        if refusal is None:
            # Only a deployment that takes writes: an answering replica or a full server
            # must not close a breaker the calls themselves opened.
            conn.policy.breaker.record_success()
        else:
            out["error"] = scrub(refusal, url)
        out["maxmemory_policy"] = maxmemory_policy(conn)
    except Exception as exc:
        out["ok"] = False
        shown = conn.misconfiguration(exc) or exc  # a refusal says what to fix
        out["error"] = scrub(f"{type(shown).__name__}: {shown}", url)
    out["breaker"] = conn.policy.breaker.state.value
    out["pool"] = conn.pool_stats()
    METRICS.inc("health_checks_total", backend="redis", ok=str(out["ok"]).lower())
    return out


def _postgres_health(client: Client) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        pg = client.postgres()
        out["url"] = pg.url
        out["ping_ms"] = round(pg.ping() * 1000, 3)
        out["ok"] = True
    except Exception as exc:
        out["ok"] = False
        out["error"] = scrub(f"{type(exc).__name__}: {exc}", client.settings.database_url)
        return out
    out["breaker"] = pg.policy.breaker.state.value
    out["pool"] = pg.pool_stats()
    return out
