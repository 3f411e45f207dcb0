"""`RedisBackend`: the primitives without decorators, over one `Client` (default: the default client).

The synchronous version of the facade the original proposal sketched. Each
method fronts a feature and follows that feature's switch and fallback
policy: sessions (`SessionStore`), locks (`agent_lock`), rate limits
(`RateLimiter`, sliding window) and a small JSON key/value cache that obeys
the metadata-cache switch (Redis → a miss when Redis is down; local → this
process; off → always a miss).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Optional, Tuple, Union

from .client import Client, resolve
from .config import Mode, Settings, configure, settings
from .errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from .keys import KeySpace, validate_id
from .local import TTLStore
from .locks import AgentLock, agent_lock
from .metrics import METRICS
from .ratelimit import RateLimiter
from .sessions import SessionStore
from .validation import check_json_depth, loads_bounded, seconds, too_deep

__all__ = ["RedisBackend"]

_LOCAL_KV = ("backend", "local-kv")


def _local_kv(client: Client) -> TTLStore[str]:
    """The local-mode key/value cache of `client` (one per client, like every backend's state)."""
    return client.singleton(_LOCAL_KV, lambda: TTLStore(maxsize=10_000))


class RedisBackend:
    """One thread-safe object over the configured clients.

    ``RedisBackend()`` uses the configuration in force; ``RedisBackend(settings)``
    first applies `settings` process-wide (like `configure`) and uses the
    default client; ``RedisBackend(client)`` uses that `mcp_redis.Client`
    and changes nothing process-wide.
    """

    def __init__(self, settings_: Optional[Union[Settings, Client]] = None) -> None:
        self.client: Optional[Client] = None
        if isinstance(settings_, Client):
            self.client = settings_
        elif settings_ is not None:
            if not isinstance(settings_, Settings):
                raise InvalidArgumentType("settings", f"must be a Settings or a Client, not {type(settings_).__name__}")
            if settings_ != settings():
                configure(**{f: getattr(settings_, f) for f in settings_.__dataclass_fields__})
        self._sessions = SessionStore(client=self.client)
        self._limiters: Dict[Tuple[type, int, type, float], RateLimiter] = {}
        self._limiters_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisBackend({resolve(self.client).settings!r})"

    # -- sessions ------------------------------------------------------------------
    def get_session(self, session_key: str) -> Optional[str]:
        """The agent bound to `session_key`, or None."""
        validate_id(session_key, "session_key")
        return self._sessions.get(session_key)

    def set_session(self, session_key: str, agent_id: str, ttl: Optional[float] = 3600) -> None:
        """Bind `session_key` to `agent_id` for `ttl` seconds (None: REDIS_SESSION_TTL)."""
        self._sessions.bind(session_key, agent_id, ttl)

    # -- locks ----------------------------------------------------------------------
    def acquire_lock(self, key: str, timeout: float = 30, blocking_timeout: Optional[float] = 5.0) -> AgentLock:
        """The lock named `key` (lease `timeout`, renewed while held) as a context manager."""
        validate_id(key, "key")
        return agent_lock(key, timeout=timeout, blocking_timeout=blocking_timeout, client=self.client)

    # -- rate limits ------------------------------------------------------------------
    def check_rate_limit(self, key: str, limit: int, window: float) -> bool:
        """Consume one call of `limit` per `window` seconds for `key`; True = allowed."""
        validate_id(key, "key")
        limiter = self._limiter(limit, window)
        return limiter.hit(key).allowed

    def _limiter(self, limit: int, window: float) -> RateLimiter:
        # By type too: True == 1 and 1.0 == 1 would find the limiter of a valid `limit` unchecked.
        spec = (type(limit), limit, type(window), window)
        try:
            limiter = self._limiters.get(spec)
        except TypeError:  # unhashable argument: let RateLimiter name it
            limiter = None
        if limiter is None:
            limiter = RateLimiter("backend", limit, window, client=self.client)  # validates limit and window
            with self._limiters_lock:
                limiter = self._limiters.setdefault(spec, limiter)
        return limiter

    # -- cache -------------------------------------------------------------------------
    def cache_get(self, key: str) -> Any:
        """The JSON value cached under `key`, or None (miss, expired, or Redis down)."""
        validate_id(key, "key")
        client = resolve(self.client)
        s = client.settings
        mode = s.mode("metadata_cache")
        if mode is Mode.OFF:
            return None
        if mode is Mode.LOCAL:
            raw = _local_kv(client).get(_kv_key(s, key))
        else:
            conn = client.redis("metadata_cache")
            if not conn.policy.available:
                METRICS.inc("backend_cache_fallback_total", op="get")
                return None
            try:
                raw = conn.call(conn.client.get, _kv_key(s, key))
            except BackendUnavailable:
                METRICS.inc("backend_cache_fallback_total", op="get")
                return None
        if raw is None:
            return None
        try:
            return loads_bounded(raw)
        except ValueError:  # not written by cache_set (a foreign writer): a miss
            return None

    def cache_set(self, key: str, value: Any, ttl: float = 300) -> None:
        """Cache JSON-serialisable `value` under `key` for `ttl` seconds (best effort)."""
        validate_id(key, "key")
        ttl = seconds(ttl, "ttl")  # at most ten years, like every TTL
        try:
            raw = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("value", f"must be JSON-serialisable: {exc}") from None
        except RecursionError:
            raise too_deep("value") from None
        check_json_depth(value, raw, "value")
        client = resolve(self.client)
        s = client.settings
        mode = s.mode("metadata_cache")
        if mode is Mode.OFF:
            return
        if mode is Mode.LOCAL:
            _local_kv(client).set(_kv_key(s, key), raw, ttl)
            return
        conn = client.redis("metadata_cache")
        try:
            conn.call(conn.client.set, _kv_key(s, key), raw, px=max(1, int(ttl * 1000)))
        except BackendUnavailable:
            METRICS.inc("backend_cache_fallback_total", op="set")


def _kv_key(s: Settings, key: str) -> str:
    return KeySpace(s.key_prefix).key("kv", key)
