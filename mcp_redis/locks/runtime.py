"""A client's locks: its backends, chosen from the mode table, and its watchdog.

The table is data: ``locks`` mode → backend class, and under ``redis`` the
``lock_fallback`` setting → the Redis variant and the fallback backend. A
client's settings never change, so the choice is made once, when its
`LockRuntime` is built (``client.singleton``): the front reads
``runtime.primary`` and ``runtime.fallback`` with no branching per call.
`configure()`/`reset()` close the default client, and with it its runtime;
a forked child's client builds a new one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Optional, Type

from ..config import LockFallback, Mode
from .base import Backend
from .file import FileBackend
from .off import OffBackend
from .postgres import PostgresBackend
from .redis import FencedRedisBackend, GatedRedisBackend, RedisBackend
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["LockRuntime", "runtime", "BY_MODE", "REDIS_BY_FALLBACK", "FALLBACK"]

#: ``locks`` mode → the backend serving it.
BY_MODE: Dict[Mode, Type[Backend]] = {
    Mode.REDIS: RedisBackend,
    Mode.POSTGRES: PostgresBackend,
    Mode.LOCAL: FileBackend,
    Mode.OFF: OffBackend,
}
#: Under ``locks=redis``: ``lock_fallback`` → the Redis backend (gated when PostgreSQL may stand in;
#: with any fallback, every grant draws its fencing token).
REDIS_BY_FALLBACK: Dict[LockFallback, Type[Backend]] = {
    LockFallback.NONE: RedisBackend,
    LockFallback.POSTGRES: GatedRedisBackend,
    LockFallback.LOCAL: FencedRedisBackend,
}
#: ``lock_fallback`` → the backend used while Redis is unreachable (None: fail closed).
FALLBACK: Dict[LockFallback, Optional[Type[Backend]]] = {
    LockFallback.NONE: None,
    LockFallback.POSTGRES: PostgresBackend,
    LockFallback.LOCAL: FileBackend,
}

_KEY = ("mcp_redis.locks", "runtime")


class LockRuntime:
    """One client's lock backends and watchdog (built once per client and process)."""

    def __init__(self, client: Client) -> None:
        s = client.settings
        mode = s.mode("locks")
        primary_type = REDIS_BY_FALLBACK[s.lock_fallback] if mode is Mode.REDIS else BY_MODE[mode]
        fallback_type = FALLBACK[s.lock_fallback] if mode is Mode.REDIS else None
        self.client = client
        self.pid = os.getpid()
        self.primary: Backend = primary_type(client)
        self.fallback: Optional[Backend] = fallback_type(client) if fallback_type is not None else None
        self.watchdog = Watchdog()

    def close(self) -> None:
        """Stop renewing this client's holds (they stay releasable)."""
        self.watchdog.close()


def runtime(client: Client) -> LockRuntime:
    """The `LockRuntime` of `client` (built on first use)."""
    rt: Optional[LockRuntime] = client.peek(_KEY)
    if rt is None:  # no closure built on the hot path
        rt = client.singleton(_KEY, lambda: LockRuntime(client))
    return rt
