"""The in-process sessions backend (``local`` mode): the single-host legacy behaviour.

Bindings live in a `mcp_redis.local.TTLStore` of this client: not shared
between processes, lost on restart, no Redis keys written.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

from ..local import TTLStore
from .base import Timing

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """In-process bindings; every verb is one locked step of the `TTLStore`."""

    mode = "local"

    def __init__(self, default_ttl: float) -> None:
        self.default_ttl = default_ttl
        self.store: TTLStore[str] = TTLStore()

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing) -> None:
        self.store.set(session_key, agent_id, ttl_ms / 1000.0)

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        return self.store.get(session_key)

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        def extend(old: Optional[str]) -> Tuple[str, float]:
            if old is None:
                return "", 0.0  # stays absent: an entry that is already expired
            return old, ttl_ms / 1000.0

        agent = self.store.update(session_key, extend)  # atomic: no unbind slips in between
        return agent or None

    def unbind(self, session_key: str) -> bool:
        return self.store.pop(session_key) is not None

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        return sorted(k for k, v in self.store.items() if v == agent_id)[:limit]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        return sorted({v for _, v in self.store.items() if v.startswith(prefix)})[:limit]

    def session_keys(self) -> Iterator[str]:
        return iter(self.store.keys())

    def replay_pending(self) -> int:
        return 0

    def cleanup_expired(self, batch: int) -> int:
        return 0  # expired entries are dropped on access and by the store's sweep

    def close(self) -> None:
        pass  # the bindings go with the backend object
