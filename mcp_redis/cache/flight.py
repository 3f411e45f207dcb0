"""Single flight and XFetch: one load per key and process, early refresh by draw.

`Flight` is one in-process load of one key: the first caller (the leader)
runs the loader, the others wait for its result (or, during an early
refresh, keep serving the still-valid value). `xfetch_fires` is the draw of
XFetch (Vattani et al., VLDB 2015): recompute early iff
``now - delta * beta * ln(rand) >= expiry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import random
import threading
from typing import Any, Iterable, Iterator, Optional, Tuple

__all__ = ["Flight", "xfetch_fires", "XFETCH_HORIZON", "leading", "mark_loader_task", "in_a_loader_task",
           "awaited_by_its_loader"]

# Recursion of an ``async def`` loader. Its coroutine runs as a task on the caller's loop, and a
# cached call it awaits goes to another worker thread, so `Flight.wait`'s thread check cannot see
# that call waiting for itself. `_LEADING`: the flights whose loaders the current call chain runs
# (set around a loader call; asyncio.to_thread and the loader's task carry it on). `_LOADER_TASK`:
# the task running an async loader. A task the loader starts inherits both, but is not the loader's
# task: it may wait for the load like any other caller (the loader does not wait for it).
_LEADING: contextvars.ContextVar[Tuple[Flight, ...]] = contextvars.ContextVar("mcp_redis_cache_leading",
                                                                                default=())
_LOADER_TASK: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("mcp_redis_cache_loader_task",
                                                                                default=None)


@contextlib.contextmanager
def leading(flights: Iterable[Flight]) -> Iterator[None]:
    """Around a loader's call: the loads it leads (see `awaited_by_its_loader`)."""
    token = _LEADING.set((*_LEADING.get(), *flights))
    try:
        yield
    finally:
        _LEADING.reset(token)


def mark_loader_task() -> None:
    """Called first in the task that runs an async loader's coroutine."""
    _LOADER_TASK.set(asyncio.current_task())


def in_a_loader_task() -> bool:
    """True in the task that runs an async loader (cheap: the hot path asks first)."""
    task = _LOADER_TASK.get()
    return task is not None and task is asyncio.current_task()


def awaited_by_its_loader(flight: Optional[Flight]) -> bool:
    """True when the current task is the async loader of `flight` (or of a load that led here
    through other cached functions) awaiting it: waiting would hang for ever."""
    return flight is not None and not flight.finished and flight in _LEADING.get() and in_a_loader_task()


XFETCH_HORIZON = 30.0  # XFetch draws only within 30 * delta * beta of expiry (p < e^-30 beyond)


def xfetch_fires(now: float, bd: float, expiry: float) -> bool:
    """True when this caller should refresh early (`bd` = delta * beta, 0 = never)."""
    return bool(bd) and now - bd * math.log(1.0 - random.random()) >= expiry


class Flight:
    """One in-process load of one key; followers wait for the leader's result."""

    __slots__ = ("_running", "_leader", "finished", "value", "error", "stale")

    def __init__(self) -> None:
        self._running = threading.Lock()  # held until the leader finishes (cheaper than an Event)
        self._running.acquire()
        self._leader = threading.get_ident()  # made by the thread that runs the load
        self.finished = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.stale = False  # an invalidation arrived: do not fill L1

    def finish(self) -> None:
        self.finished = True
        self._running.release()

    def wait(self) -> Any:
        if not self.finished and self._leader == threading.get_ident():
            # The loader called its own cached function with the same
            # arguments: waiting for itself would hang for ever.
            raise RecursionError("a cached function's loader called it again with the same arguments")
        with self._running:
            pass
        if self.error is not None:
            raise self.error
        return self.value
