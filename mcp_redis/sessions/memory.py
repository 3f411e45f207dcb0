"""The in-process sessions backend (``local`` mode): the single-host legacy behaviour.

Bindings live in a `mcp_redis.local.TTLStore` of this client: not shared
between processes, lost on restart, no Redis keys written. Each entry is the
agent id with its record (`RecordData`).
"""

from __future__ import annotations

import time
from typing import Dict, Iterator, List, Optional, Tuple

from ..local import TTLStore
from .base import Timing
from .records import RecordData, fields_json, pack_fields

__all__ = ["MemoryBackend"]

Entry = Tuple[str, RecordData, float]  # agent, record, monotonic deadline (for update's KEEPTTL)


class MemoryBackend:
    """In-process bindings; every verb is one locked step of the `TTLStore`."""

    mode = "local"

    def __init__(self, default_ttl: float) -> None:
        self.default_ttl = default_ttl
        self.store: TTLStore[Entry] = TTLStore()

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None:
        def write(old: Optional[Entry]) -> Tuple[Entry, float]:
            now = int(time.time())
            count = old[1].bind_count + 1 if old is not None else 1
            return (agent_id, RecordData(now, count, now, fields), time.monotonic() + ttl_ms / 1000.0), ttl_ms / 1000.0

        self.store.update(session_key, write)

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        entry = self.store.get(session_key)
        return None if entry is None else entry[0]

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]:
        entry = self.store.get(session_key)
        return None if entry is None else (entry[0], entry[1])

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]:
        def merge(old: Optional[Entry]) -> Tuple[Entry, float]:
            if old is None:
                return ("", RecordData(0, 0, 0, ""), 0.0), 0.0  # stays absent
            merged = fields_json(old[1].fields)
            merged.update(fields)
            packed = pack_fields(merged)  # raises InvalidArgument: nothing changes
            data = old[1]._replace(last_active=int(time.time()), fields=packed)
            return (old[0], data, old[2]), max(0.0, old[2] - time.monotonic())

        entry = self.store.update(session_key, merge)
        return (entry[0], entry[1]) if entry[0] else None

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        def extend(old: Optional[Entry]) -> Tuple[Entry, float]:
            if old is None:
                return ("", RecordData(0, 0, 0, ""), 0.0), 0.0  # stays absent: an entry that is already expired
            deadline = time.monotonic() + ttl_ms / 1000.0
            return (old[0], old[1]._replace(last_active=int(time.time())), deadline), ttl_ms / 1000.0

        agent = self.store.update(session_key, extend)[0]  # atomic: no unbind slips in between
        return agent or None

    def unbind(self, session_key: str) -> bool:
        return self.store.pop(session_key) is not None

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        return sorted(k for k, v in self.store.items() if v[0] == agent_id)[:limit]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        return sorted({v[0] for _, v in self.store.items() if v[0].startswith(prefix)})[:limit]

    def session_keys(self) -> Iterator[str]:
        return iter(self.store.keys())

    def replay_pending(self) -> int:
        return 0

    def cleanup_expired(self, batch: int) -> int:
        return 0  # expired entries are dropped on access and by the store's sweep

    def close(self) -> None:
        pass  # the bindings go with the backend object



