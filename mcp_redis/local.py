"""Local mode building blocks: thread-safe in-process stores with expiry.

Used when no `REDIS_URL` is set (the single-host behaviour of today) and as
the per-process fallback of features whose documented policy allows one.
File locks live with the other lock implementations in `mcp_redis.locks`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

__all__ = ["TTLStore"]

V = TypeVar("V")


class TTLStore(Generic[V]):
    """A thread-safe dict whose entries expire; bounded by `maxsize` (oldest out).

    Expired entries are dropped lazily on access and by a sweep every
    `maxsize // 4` writes, so memory stays bounded without a thread.
    """

    def __init__(self, maxsize: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._lock = threading.Lock()
        self._data: Dict[str, Tuple[V, float]] = {}
        self._writes = 0

    def get(self, key: str) -> Optional[V]:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[1] <= self._clock():
                del self._data[key]
                return None
            return item[0]

    def ttl(self, key: str) -> Optional[float]:
        """Seconds left, or None when absent/expired."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            left = item[1] - self._clock()
            return left if left > 0 else None

    def set(self, key: str, value: V, ttl: float) -> None:
        with self._lock:
            self._data.pop(key, None)
            self._data[key] = (value, self._clock() + ttl)
            self._writes += 1
            if self._writes >= max(1, self.maxsize // 4):
                self._writes = 0
                self._sweep()
            while len(self._data) > self.maxsize:
                self._data.pop(next(iter(self._data)))

    def pop(self, key: str) -> Optional[V]:
        with self._lock:
            item = self._data.pop(key, None)
            if item is None or item[1] <= self._clock():
                return None
            return item[0]

    def update(self, key: str, fn: Callable[[Optional[V]], Tuple[V, float]]) -> V:
        """Atomically replace the value with ``fn(old)`` -> (new, ttl)."""
        with self._lock:
            item = self._data.get(key)
            old = item[0] if item is not None and item[1] > self._clock() else None
            new, ttl = fn(old)
            self._data.pop(key, None)
            self._data[key] = (new, self._clock() + ttl)
            return new

    def keys(self) -> List[str]:
        with self._lock:
            self._sweep()
            return list(self._data)

    def items(self) -> Iterator[Tuple[str, V]]:
        with self._lock:
            self._sweep()
            snapshot = [(k, v) for k, (v, _) in self._data.items()]
        return iter(snapshot)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            self._sweep()
            return len(self._data)

    def _sweep(self) -> None:
        now = self._clock()
        dead = [k for k, (_, exp) in self._data.items() if exp <= now]
        for k in dead:
            del self._data[k]
