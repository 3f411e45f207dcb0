"""The one lock backend protocol, and what passes between the front and a backend.

`Backend` names the verbs every implementation offers (redis.py, postgres.py,
file.py, off.py), with the same signatures; `LockKeys` is a lock's names in
the store, `Hold` one acquisition. A backend object belongs to one
`mcp_redis.Client` (built by its `LockRuntime`, see runtime.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Hashable, List, Optional, Sequence, Tuple

from ..keys import KeySpace

if TYPE_CHECKING:
    from ..client import Client
    from .runtime import LockRuntime

__all__ = ["Backend", "Hold", "LockKeys", "keys_for", "ms"]

log = logging.getLogger("mcp_redis.locks")


@dataclass(frozen=True)
class LockKeys:
    """The names of one lock: its key, fencing counter, waiter queue and signal lists."""

    lock: str
    fence: str
    queue: str
    signal_base: str  # space.key(namespace, *ids, tag=True, suffix="w")
    prefix: str

    def signal(self, ticket: str) -> str:
        """A waiter's signal list: ``space.key(ns, *ids, tag=True, suffix="w" + ticket)``."""
        return self.signal_base + ticket


_KEYS_CACHE: Dict[Tuple[str, str, Tuple[str, ...]], LockKeys] = {}
_KEYS_CACHE_MAX = 1024


def keys_for(prefix: str, namespace: str, ids: Tuple[str, ...]) -> LockKeys:
    """The keys of one lock (memoised: `agent_lock` builds a new object per call)."""
    cache_key = (prefix, namespace, ids)
    keys = _KEYS_CACHE.get(cache_key)
    if keys is None:
        space = KeySpace(prefix)
        keys = LockKeys(
            space.key(namespace, *ids, tag=True),
            space.key(namespace, *ids, tag=True, suffix="fence"),
            space.key(namespace, *ids, tag=True, suffix="queue"),
            space.key(namespace, *ids, tag=True, suffix="w"),
            prefix,
        )
        if len(_KEYS_CACHE) >= _KEYS_CACHE_MAX:
            _KEYS_CACHE.clear()
        _KEYS_CACHE[cache_key] = keys
    return keys


def ms(seconds: float) -> int:
    """`seconds` in whole milliseconds, at least 1 (PX and script arguments)."""
    return max(1, int(seconds * 1000))


@dataclass(eq=False)
class Hold:
    """One acquisition: who holds it, how, and whether its lease was lost.

    `runtime` is the `LockRuntime` of the client that took it (set by the
    front): a hold is this process's only while ``runtime.pid`` is the
    current process's, and is re-entered only through that same runtime (a
    reconfigured default client starts a new one).
    """

    backend: Backend
    keys: LockKeys
    token: str
    fence: Optional[int]  # None until drawn (Redis draws it on first read: `Backend.fence`)
    lease: float
    expires_at: float  # monotonic; meaningful for the redis backend
    handle: Any = None  # backend-specific: RedisConnection, pg connection, (fd, path)
    runtime: Optional[LockRuntime] = None
    count: int = 1
    is_lost: bool = False
    released: bool = False
    next_renewal: float = 0.0
    misconfiguration_logged: bool = False  # a refused renewal is logged once per hold
    granted_at: float = 0.0  # monotonic, before the grant was sent (the redis backend's liveness checks)
    release_sent: bool = False  # a release was sent (its reply may have been lost): the next one is a retry
    owner: Optional[threading.Thread] = None  # a thread-local hold's thread: only it can release the hold
    checking: bool = False  # a session check or renewal of this hold is under way in a thread of its own

    # Made on demand (most holds never need one) and stored with dict.setdefault,
    # atomic in CPython: with `mark_lost` writing is_lost before reading the event
    # and `lost_event` storing the event before reading is_lost, one of the two
    # always sees the other, so the event is set exactly when the hold is lost,
    # with no lock (none to be left held across a fork).
    _event: ClassVar[Optional[threading.Event]] = None

    def mark_lost(self) -> None:
        self.is_lost = True
        event = self._event
        if event is not None:
            event.set()

    def lost_event(self) -> threading.Event:
        event: threading.Event = self.__dict__.setdefault("_event", threading.Event())
        if self.is_lost:
            event.set()
        return event

    def fence_lock(self) -> threading.Lock:
        """Serialises drawing the fencing token (made on demand, like the event)."""
        lock: threading.Lock = self.__dict__.setdefault("_fence_lock", threading.Lock())
        return lock


class Backend:
    """How one kind of store takes, keeps and gives back a lock (the protocol).

    Every implementation offers these verbs with these signatures; one object
    per client (`LockRuntime`), so `client` is the one whose connections and
    settings it uses. `name` is the label in metrics and `DistributedLock.backend`
    (``redis``/``postgres``/``local``/``off``); `leased`: the hold expires
    unless renewed (the watchdog renews only those).
    """

    name: ClassVar[str] = "?"
    leased: ClassVar[bool] = False
    #: Seconds between two `heartbeat` calls while this process holds a lock
    #: of this backend (None: the backend has no per-process liveness).
    heartbeat_every: Optional[float] = None
    #: A backend whose holds live as long as a session that can die under them
    #: (PostgreSQL's advisory locks): the watchdog checks each hold this often
    #: (`extend` answers whether it is still held) and marks a dead one lost.
    session_check_every: Optional[float] = None
    #: A backend whose calls may wait on PostgreSQL, which no client-side deadline bounds
    #: (a server process that stopped answering): the watchdog makes them in threads of their own.
    unbounded_calls: ClassVar[bool] = False
    #: The watchdog renews this backend's holds of one connection together (`extend_all`).
    renews_in_batches: ClassVar[bool] = False

    def __init__(self, client: Client) -> None:
        self.client = client

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        """A hold, or None when not acquired before `deadline` (monotonic; None = forever).

        `token` is this acquire call's value, unique per call (it ends with a
        fresh nonce): the holder's identity, never shared by two holders.
        `fencing`: the caller will read the fencing token, so draw it with the
        grant. A backend may leave `Hold.fence` None otherwise (Redis: drawn
        by `fence` on first read); the PostgreSQL and file backends always
        draw it with the grant, where it costs no extra round trip.
        """
        raise NotImplementedError

    def fence(self, hold: Hold) -> Optional[int]:
        """Draw `hold`'s fencing token now (`Hold.fence` was left None); None when no longer held."""
        return hold.fence

    def release(self, hold: Hold) -> bool:
        """Give the lock back; False when it was no longer held by `hold`."""
        raise NotImplementedError

    def extend(self, hold: Hold, seconds: float, replace: bool) -> bool:
        """Lengthen (or with `replace`, set) the lease; False when not owned."""
        return not hold.is_lost

    def extend_all(self, holds: Sequence[Hold]) -> List[Optional[bool]]:
        """Set each of `holds`' lease to its `lease` (``extend(hold, hold.lease, True)``; the
        redis backend: one round trip for holds of one connection): per hold, True renewed,
        False not owned, None an error of that hold's alone (to renew on its own)."""
        return [self.extend(hold, hold.lease, True) for hold in holds]

    def batch_of(self, hold: Hold) -> Hashable:
        """Which of `extend_all`'s batches `hold` goes in (one connection's holds)."""
        return id(hold.handle)

    def batch_apart(self, hold: Hold) -> bool:
        """Whether `hold`'s batch is renewed in a thread of its own (a cluster's: one master
        that stops answering must not stop the renewals and liveness beats of the others)."""
        return False

    def beats_apart(self) -> bool:
        """Whether `heartbeat` runs in a thread of its own (a cluster's: the master holding the
        liveness key may stop answering while the others, holding the locks, answer)."""
        return False

    def owned(self, hold: Hold) -> bool:
        """True while `hold` is still the lock's holder."""
        return not hold.is_lost

    def owned_all(self, holds: Sequence[Hold]) -> List[bool]:
        """`owned` of each of `holds` (the redis backend: one round trip)."""
        return [self.owned(hold) for hold in holds]

    def locked(self, keys: LockKeys) -> bool:
        """True when anyone holds the lock of `keys`."""
        raise NotImplementedError

    def heartbeat(self) -> None:
        """Tell the store this process is alive (backends with `heartbeat_every`)."""

    def liveness_gap(self) -> float:
        """When (monotonic) the store last may have thought this process dead; -inf: never.

        Holds taken before then may have been taken over: the watchdog checks them.
        """
        return float("-inf")
