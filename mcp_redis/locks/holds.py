"""This thread's holds: each lock object's per-thread state and the reentrant registry.

A `DistributedLock` keeps its hold in `_Local` (per thread, the default) or
`_Shared` (``thread_local=False``, as in redis-py). Reentrant locks
(`agent_lock`) also register their hold in `_THREAD_HOLDS`, by (the client's
`LockRuntime`, lock key), so a nested acquire through any object of the same
client enters at once.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .base import Hold

if TYPE_CHECKING:
    from .runtime import LockRuntime

__all__ = ["held_locks"]


class _ThreadHolds(threading.local):
    """This thread's reentrant holds, by (the client's `LockRuntime`, lock key).

    Keyed by runtime too: the same name through another client may be another
    deployment's lock, so a hold is re-entered only through its own client.
    """

    def __init__(self) -> None:
        self.holds: Dict[Tuple[LockRuntime, str], Hold] = {}


_THREAD_HOLDS = _ThreadHolds()


class _Local(threading.local):
    hold: Optional[Hold] = None
    last: Optional[Hold] = None
    entered: int = 0  # `with` blocks of the lock this thread is in


class _Shared:
    hold: Optional[Hold] = None
    last: Optional[Hold] = None
    entered: int = 0


def held_locks() -> List[str]:
    """Keys of the reentrant locks this thread holds (diagnostics)."""
    pid = os.getpid()
    return [key for (_, key), h in _THREAD_HOLDS.holds.items()
            if h.runtime is not None and h.runtime.pid == pid and not h.released]
