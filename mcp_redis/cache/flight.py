"""Single flight and XFetch: one load per key and process, early refresh by draw.

`Flight` is one in-process load of one key: the first caller (the leader)
runs the loader, the others wait for its result (or, during an early
refresh, keep serving the still-valid value). `xfetch_fires` is the draw of
XFetch (Vattani et al., VLDB 2015): recompute early iff
``now - delta * beta * ln(rand) >= expiry``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import threading
from typing import Any, Iterator, Optional, Tuple

__all__ = ["Flight", "xfetch_fires", "XFETCH_HORIZON"]

# The flights whose loader the current call chain is running. A context variable, not only a
# thread id: an ``async def`` loader's coroutine runs on the caller's loop and a cached call it
# awaits runs in another worker thread (``asyncio.to_thread`` and the loop's task both carry
# the context), so the thread id alone does not see that call waiting for itself.
_LEADING: contextvars.ContextVar[Tuple[Flight, ...]] = contextvars.ContextVar("mcp_redis_cache_leading",
                                                                                default=())

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

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Around the loader's call: a call of the same key from within it is recursion."""
        token = _LEADING.set((*_LEADING.get(), self))
        try:
            yield
        finally:
            _LEADING.reset(token)

    def wait(self) -> Any:
        if not self.finished and (self._leader == threading.get_ident() or self in _LEADING.get()):
            # The loader called its own cached function with the same
            # arguments: waiting for itself would hang for ever.
            raise RecursionError("a cached function's loader called it again with the same arguments")
        with self._running:
            pass
        if self.error is not None:
            raise self.error
        return self.value
