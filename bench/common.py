"""Helpers shared by the bench scripts: timing samples and percentiles."""

from __future__ import annotations

import time
from typing import Callable, List


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
