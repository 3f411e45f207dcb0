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
import weakref
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple

__all__ = ["Flight", "xfetch_fires", "XFETCH_HORIZON", "leading", "awaited_from", "mark_loader_task",
           "awaited_by_its_loader"]

# Recursion of an ``async def`` loader. Its coroutine runs as a task on the caller's loop, and a
# cached call it awaits goes to another thread, so `Flight.wait`'s thread check cannot see that call
# waiting for itself. So each load run by an async loader records its loader's task
# (`Flight.loader_task`), and each loader task the task that awaited the cached call which started
# it (`_PARENTS`): a cached call whose await chain leads back to the loader of the load it would
# wait for is recursion (f awaits f; f awaits g awaits f). A task the loader starts and does not
# await is not on that chain: it waits for the load like any other caller.
_JUST_LED: contextvars.ContextVar[Tuple[Flight, ...]] = contextvars.ContextVar("mcp_redis_cache_just_led",
                                                                                 default=())
_CALLER_TASK: contextvars.ContextVar[Optional[asyncio.Task[Any]]] = contextvars.ContextVar(
    "mcp_redis_cache_caller_task", default=None)
_PARENTS: weakref.WeakKeyDictionary[asyncio.Task[Any], asyncio.Task[Any]] = weakref.WeakKeyDictionary()
_CALLBACKS_LOCK = threading.Lock()


@contextlib.contextmanager
def leading(flights: Iterable[Flight]) -> Iterator[None]:
    """Around a loader's call: the loads it leads (an async loader's task claims them)."""
    token = _JUST_LED.set(tuple(flights))
    try:
        yield
    finally:
        _JUST_LED.reset(token)


@contextlib.contextmanager
def awaited_from(task: Optional[asyncio.Task[Any]]) -> Iterator[None]:
    """Around an async caller's cached call, sent to another thread: the task awaiting it."""
    token = _CALLER_TASK.set(task)
    try:
        yield
    finally:
        _CALLER_TASK.reset(token)


def mark_loader_task() -> None:
    """Called first in the task that runs an async loader's coroutine."""
    task = asyncio.current_task()
    if task is None:
        return
    for flight in _JUST_LED.get():
        flight.loader_task = task
    parent = _CALLER_TASK.get()
    if parent is not None:
        _PARENTS[task] = parent


def awaited_by_its_loader(flight: Optional[Flight]) -> bool:
    """True when waiting for `flight` from the current task would wait for itself: the task is the
    flight's loader task, or awaits it through a chain of cached calls (see above)."""
    if flight is None or flight.finished or flight.loader_task is None:
        return False
    task: Optional[asyncio.Task[Any]] = asyncio.current_task()
    for _ in range(10_000):  # a chain is as deep as the nesting of loads; bounded all the same
        if task is None:
            return False
        if task is flight.loader_task:
            return True
        task = _PARENTS.get(task)
    return False


XFETCH_HORIZON = 30.0  # XFetch draws only within 30 * delta * beta of expiry (p < e^-30 beyond)


def xfetch_fires(now: float, bd: float, expiry: float) -> bool:
    """True when this caller should refresh early (`bd` = delta * beta, 0 = never)."""
    return bool(bd) and now - bd * math.log(1.0 - random.random()) >= expiry


class Flight:
    """One in-process load of one key; followers wait for the leader's result."""

    __slots__ = ("_running", "_leader", "finished", "value", "error", "stale", "loader_task", "_callbacks")

    def __init__(self) -> None:
        self._running = threading.Lock()  # held until the leader finishes (cheaper than an Event)
        self._running.acquire()
        self._leader = threading.get_ident()  # made by the thread that runs the load
        self.finished = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.stale = False  # an invalidation arrived: do not fill L1
        self.loader_task: Optional[asyncio.Task[Any]] = None  # an async loader's task (see above)
        self._callbacks: Optional[List[Callable[[], None]]] = None

    def finish(self) -> None:
        with _CALLBACKS_LOCK:
            self.finished = True
            callbacks, self._callbacks = self._callbacks, None
        self.loader_task = None  # the task's context holds this flight: no cycle left behind
        self._running.release()
        for callback in callbacks or ():
            callback()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the leader's thread) once the load is over; at once if it is.
        For the coroutine front: a follower waits on its loop, holding no thread."""
        with _CALLBACKS_LOCK:
            if not self.finished:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback()

    def outcome(self) -> Any:
        """The finished load's value, or its exception raised (what `wait` gives a follower)."""
        if self.error is not None:
            raise self.error
        return self.value

    def wait(self) -> Any:
        if not self.finished and self._leader == threading.get_ident():
            # The loader called its own cached function with the same
            # arguments: waiting for itself would hang for ever.
            raise RecursionError("a cached function's loader called it again with the same arguments")
        with self._running:
            pass
        return self.outcome()
