"""`Client`: one configuration with its connections, scripts and threads.

A `Client` owns one `Settings`, one `RedisConnection` per distinct Redis URL
(built lazily, each with its own breaker and retry policy), its `Postgres`,
one `ScriptSet`, and every per-client object a feature keeps (watchdogs,
listeners, in-process limiter storages) through `singleton`. Features take
``client=``; without one they use `default_client()`, built from the
environment and `configure()` and resolved when they are *called*.

Fork handling lives here, once: one ``os.register_at_fork`` hook makes every
live client in the child forget its connections and singletons without
closing the parent's sockets or touching its threads.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, TypeVar

from .config import Mode, Settings, on_reset, redact_url
from .config import settings as current_settings
from .connections import RedisConnection, connect
from .errors import ConfigurationError
from .scripts import ScriptSet

if TYPE_CHECKING:
    from .postgres import Postgres

__all__ = ["Client", "default_client"]

log = logging.getLogger("mcp_redis.client")
T = TypeVar("T")


class Client:
    """Settings plus the connections and background objects built from them.

    Thread-safe. ``Client()`` reads the environment; ``Client(settings)`` or
    ``Client(**overrides)`` configure it explicitly. Close it (or use it as a
    context manager) to stop its threads and close its sockets.
    """

    def __init__(self, settings: Optional[Settings] = None, **overrides: Any) -> None:
        if settings is None:
            settings = Settings.from_env(**overrides)
        elif overrides:
            settings = settings.replace(**overrides)
        if not isinstance(settings, Settings):
            raise ConfigurationError(f"settings: must be a Settings, not {type(settings).__name__}")
        self._settings = settings
        self._lock = threading.RLock()
        self._by_url: Dict[str, RedisConnection] = {}
        self._by_feature: Dict[Optional[str], RedisConnection] = {}
        self._postgres: Optional[Postgres] = None
        self._singletons: Dict[Hashable, Any] = {}
        self._closed = False
        self.scripts = ScriptSet()
        _live.add(self)

    # -- configuration -----------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return self._settings

    def mode(self, feature: str) -> Mode:
        """The backend in force for `feature` (``settings.mode(feature)``)."""
        return self._settings.mode(feature)

    # -- connections -------------------------------------------------------------
    def redis(self, feature: Optional[str] = None) -> RedisConnection:
        """The `RedisConnection` of `feature`'s deployment (REDIS_URL's for None).

        Built on first use and shared by every feature on the same URL.
        Raises `ConfigurationError` when the feature has no Redis URL.
        """
        conn = self._by_feature.get(feature)
        if conn is not None:
            return conn
        return self._build_redis(feature)

    def _build_redis(self, feature: Optional[str]) -> RedisConnection:
        url = self._settings.redis_url if feature is None else self._settings.url(feature)
        if not url:
            what = "REDIS_URL (redis_url)" if feature is None else f"{feature}: no Redis URL (REDIS_URL)"
            raise ConfigurationError(f"{what}: not set (local mode has no Redis client)")
        with self._lock:
            self._check_open()
            conn = self._by_url.get(url)
            if conn is None:
                conn = connect(self._settings, url, self.scripts)
                self._by_url[url] = conn
            self._by_feature[feature] = conn
            return conn

    def redis_connections(self) -> List[RedisConnection]:
        """The connections built so far (one per distinct URL)."""
        with self._lock:
            return list(self._by_url.values())

    def postgres(self) -> Postgres:
        """The `Postgres` of this client (raises `ConfigurationError` without DATABASE_URL)."""
        pg = self._postgres
        if pg is not None:
            return pg
        from .postgres import Postgres

        with self._lock:
            self._check_open()
            if self._postgres is None:
                self._postgres = Postgres(self._settings)
            return self._postgres

    # -- per-client objects ------------------------------------------------------
    def singleton(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The object stored under `key`, built by `factory` on first use.

        One per client and process: `close()` closes every singleton that has a
        ``close()`` method; a forked child forgets them (without closing: their
        threads and sockets belong to the parent).
        """
        try:
            return self._singletons[key]  # type: ignore[no-any-return]
        except KeyError:
            pass
        with self._lock:
            self._check_open()
            obj = self._singletons.get(key)
            if obj is None:
                obj = factory()
                self._singletons[key] = obj
            return obj

    def peek(self, key: Hashable) -> Any:
        """The singleton under `key` if it was built, else None (never builds)."""
        return self._singletons.get(key)

    # -- life cycle --------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("client: closed")

    def close(self) -> None:
        """Stop this client's threads and close its sockets (idempotent)."""
        with self._lock:
            self._closed = True
            singletons = list(self._singletons.values())
            self._singletons.clear()
            conns = list(self._by_url.values())
            self._by_url.clear()
            self._by_feature.clear()
            pg, self._postgres = self._postgres, None
        for obj in reversed(singletons):  # newest first: users before what they use
            closer = getattr(obj, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # pragma: no cover - best effort
                    log.debug("closing %r failed", type(obj).__name__, exc_info=True)
        self.scripts.clear()
        for conn in conns:
            conn.close()
        if pg is not None:
            pg.close()
        _live.discard(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop everything without closing the parent's objects."""
        self._lock = threading.RLock()
        self._singletons.clear()
        self._by_url.clear()
        self._by_feature.clear()
        self._postgres = None
        self.scripts.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        urls = [redact_url(u) for u in self._settings.redis_urls()]
        state = "closed" if self._closed else "open"
        return f"Client(redis={urls!r}, {state})"


_live: weakref.WeakSet[Client] = weakref.WeakSet()

# -- the default client ------------------------------------------------------------
_default_lock = threading.Lock()
_default: Optional[Client] = None


def default_client() -> Client:
    """The client of the module-level API: the environment plus `configure()`.

    `configure()` and `reset()` close it; the next call builds a new one. A
    module global read on the hot path, a lock only when it is built.
    """
    client = _default
    if client is not None:
        return client
    return _build_default()


def _build_default() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client(current_settings())
        return _default


def resolve(client: Optional[Client]) -> Client:
    """`client`, or the default client when None."""
    if client is not None:
        return client
    c = _default
    return c if c is not None else _build_default()


@on_reset
def _drop_default() -> None:
    global _default
    with _default_lock:
        client, _default = _default, None
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    global _default_lock
    _default_lock = threading.Lock()  # a parent thread may have held it while forking
    for client in list(_live):
        try:
            client._forget_after_fork()
        except Exception:  # pragma: no cover - defensive
            log.exception("client fork reset failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
