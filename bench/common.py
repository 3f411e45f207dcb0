"""Helpers shared by the bench scripts: timing samples and percentiles."""

from __future__ import annotations

import time
from typing import Any, Callable, List


def sample(fn: Callable[[], object], n: int) -> List[float]:
    """Seconds taken by each of `n` calls of `fn`."""
    out = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def percentile(values: List[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def server_cpu_us(client: Any, fn: Callable[[], object], n: int) -> float:
    """Redis's own CPU time (user + system, µs) per call of `fn`, over `n` calls.

    From ``INFO cpu``, so it covers everything the server does for a call:
    parsing, the command or script, and its socket reads and writes. The
    counters have microsecond resolution; `n` in the thousands keeps the
    error under 0.1 µs a call.
    """

    def used() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    before = used()
    for _ in range(n):
        fn()
    return (used() - before) * 1e6 / n


class Missing(Exception):
    """A peer library is not installed."""


def limits_strategy(kind: str, url: str) -> Any:
    """`limits`' strategy `kind` ("moving", "fixed" or "swc") on the Redis at `url`."""
    try:
        from limits.storage import storage_from_string
        from limits.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError as exc:
        raise Missing("limits") from exc
    cls = {"moving": MovingWindowRateLimiter, "fixed": FixedWindowRateLimiter,
           "swc": SlidingWindowCounterRateLimiter}[kind]
    return cls(storage_from_string(url))
