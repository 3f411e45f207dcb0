"""In-process metrics: counters and latency histograms behind one small interface.

Every feature records into the process-wide `METRICS`. `snapshot()` is what
`mcp-redis stats` prints; `mcp_redis.prometheus` exposes the same data to
prometheus_client when that extra is installed.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

__all__ = ["Metrics", "METRICS", "LATENCY_BUCKETS"]

LabelKey = Tuple[Tuple[str, str], ...]
# Seconds; tuned for loopback-to-LAN Redis round trips.
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value
        self.count += 1

    def quantile(self, q: float) -> Optional[float]:
        """Upper bound of the bucket holding the q-quantile (0 when empty); None when that is
        beyond the top bucket (`LATENCY_BUCKETS[-1]`): the report stays strict JSON."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else None
        return None


_instances: weakref.WeakSet[Metrics] = weakref.WeakSet()


class Metrics:
    """Thread-safe counters and histograms keyed by name and labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _instances.add(self)
        self._counters: Dict[Tuple[str, LabelKey], float] = {}
        self._histograms: Dict[Tuple[str, LabelKey], _Histogram] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add `value` to the counter `name{labels}`."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Record one latency observation of `name{labels}`."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            hist = self._histograms.get(key)
            if hist is None:
                hist = self._histograms[key] = _Histogram()
            hist.observe(seconds)

    @contextmanager
    def timed(self, name: str, **labels: str) -> Iterator[None]:
        """Observe the duration of the block under `name{labels}`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start, **labels)

    def counter(self, name: str, **labels: str) -> float:
        """The current value of one counter (0 if never incremented)."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def counters(self) -> List[Tuple[str, Mapping[str, str], float]]:
        """Every counter as (name, labels, value)."""
        with self._lock:
            return [(n, dict(lb), v) for (n, lb), v in sorted(self._counters.items())]

    def histograms(self) -> List[Tuple[str, Mapping[str, str], List[int], float, int]]:
        """Every histogram as (name, labels, bucket counts, sum, count)."""
        with self._lock:
            return [
                (n, dict(lb), list(h.counts), h.total, h.count)
                for (n, lb), h in sorted(self._histograms.items())
            ]

    def snapshot(self) -> Dict[str, object]:
        """A JSON-ready view: counters, and p50/p99/count per histogram."""
        with self._lock:
            counters = {
                _flat(n, lb): v for (n, lb), v in sorted(self._counters.items())
            }
            latencies = {
                _flat(n, lb): {
                    "count": h.count,
                    "p50_s": h.quantile(0.5),
                    "p99_s": h.quantile(0.99),
                    "mean_s": h.total / h.count if h.count else 0.0,
                }
                for (n, lb), h in sorted(self._histograms.items())
            }
        return {"counters": counters, "latencies": latencies}

    def clear(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._counters.clear()
            self._histograms.clear()


def _flat(name: str, labels: LabelKey) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"


METRICS = Metrics()


def _after_fork_in_child() -> None:
    # A parent thread may have held a lock while forking: the child's first
    # count would wait on it forever. The counts themselves are inherited.
    for metrics in list(_instances):
        metrics._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
