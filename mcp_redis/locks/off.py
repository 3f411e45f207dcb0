"""The ``locks=off`` backend: every acquire enters at once; nothing is excluded."""

from __future__ import annotations

import logging
from typing import Optional

from ..metrics import METRICS
from .base import Backend, Hold, LockKeys

__all__ = ["OffBackend"]

log = logging.getLogger("mcp_redis.locks")


class OffBackend(Backend):
    """A no-op lock (logged once per client as unsafe, counted on every acquire)."""

    name = "off"
    _warned = False

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        if not self._warned:
            self._warned = True
            log.warning("locks backend is 'off': locks are no-ops and exclude nothing")
        METRICS.inc("lock_unsafe_total", backend="off")
        return Hold(self, keys, token, 0, lease, float("inf"))

    def release(self, hold: Hold) -> bool:
        return True

    def locked(self, keys: LockKeys) -> bool:
        return False
