"""Distributed locks: `agent_lock` and `lock`, one story from acquire to release.

A lock is a lease owned by a value unique to one acquire call: a fresh
random nonce (after the caller's `token`, when one is given: a token is a
dedupe id, not an identity, so two holders passing the same token are still
two holders), held by one (process, thread). In Redis every operation is one
round trip: an uncontended grant a plain ``SET … NX PX … GET``, everything
else a Lua script; a retry of one call after a lost reply is recognised by
that value (acquire), by the hold's lease not yet having run out (release),
or by a short-lived per-call record (an additive extend), so it never
grants, releases or extends twice. The fencing token is drawn from a
per-name counter (it expires: ``FENCE_TTL``) when first read while held, or
with the grant under ``fencing=True``; a failed try joins a FIFO of waiters
in one script, so no release can slip by unseen. Release
hands the lock to the longest waiter (reserving it for a moment so a
releaser that loops cannot barge in) and wakes it through its own signal
list (BLPOP): no polling. Every wait is capped at the lock's remaining
lease, so a holder that crashed is noticed when its lease ends.

Backends (one module each, all offering the verbs of `base.Backend`), chosen
per client from ``client.mode("locks")`` and ``lock_fallback`` through the
table in `runtime` (the lock's client, else the default one):

* ``redis`` (redis.py): the above. When Redis is unreachable, ``settings.lock_fallback``
  decides: ``none`` fails closed (`BackendUnavailable`), ``postgres`` takes a
  PostgreSQL advisory lock, ``local`` a host-local file lock (unsafe across
  hosts; logged and counted). Under ``postgres`` the two tiers exclude each
  other: Redis grants pass a per-name gate that PostgreSQL vouches for, and a
  fallback grant waits out the Redis leases that may still run
  (`redis.GatedRedisBackend`, `postgres.PostgresBackend.acquire_fallback`).
* ``postgres`` (postgres.py): ``pg_advisory_lock`` on a connection kept for the hold; waits
  are contention, never a backend failure.
* ``local`` (file.py): ``fcntl.flock`` on a file in ``settings.lock_dir``; the kernel
  frees a crashed holder's lock, so a lock file left behind never blocks, and
  a forked child closes its copies so it never keeps its parent's lock.
* ``off`` (off.py): a no-op lock that always enters (logged once as unsafe).

Every backend's fencing tokens are ``max(previous + 1, clock in µs)``, so the
tokens of one name keep rising across backends and fallback episodes.

`agent_lock` renews its lease from its client's one watchdog thread
(watchdog.py; closing the client ends it) and is reentrant per thread and
client (holds.py; a hold already lost is never re-entered). After
``os.fork()`` the child holds nothing: its client builds new backends and a
new watchdog, so it can neither release nor renew its parent's locks. Ownership is per thread, so every acquire from a thread that
is running an asyncio event loop is refused (`BlockingCallInEventLoop`):
coroutines sharing the thread would all "own" the lock.

This front is a little over the 500-line guideline (and `DistributedLock`
over 300) on purpose: it is redis-py's whole `Lock` method set plus
reentrancy, fencing and the fallback choice, read top to bottom as one
story; the backends, holds, watchdog and mode table live beside it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from asyncio.events import _get_running_loop
from types import TracebackType
from typing import Optional, Tuple, Type, Union

from ..client import Client, resolve
from ..errors import (
    BackendUnavailable,
    BlockingCallInEventLoop,
    InvalidArgument,
    InvalidArgumentType,
    LockNotOwned,
    LockNotReplicated,
    LockTimeout,
)
from ..keys import validate_id
from ..metrics import METRICS
from ..validation import optional_seconds
from ..validation import seconds as check_seconds
from .base import Backend, Hold, LockKeys, keys_for
from .holds import _THREAD_HOLDS, _Local, _Shared, held_locks
from .postgres import PostgresBackend, advisory_key
from .redis import HANDOFF_GRACE, RedisBackend
from .runtime import LockRuntime, runtime

__all__ = [
    "DistributedLock",
    "AgentLock",
    "agent_lock",
    "lock",
    "AGENT_LOCK_BLOCKING_TIMEOUT",
    "HANDOFF_GRACE",
    "advisory_key",
    "held_locks",
    "Backend",
]

log = logging.getLogger("mcp_redis.locks")

#: Default longest wait of `agent_lock` (seconds): the legacy manager's 5 s.
AGENT_LOCK_BLOCKING_TIMEOUT = 5.0
#: Hex digits of the per-call nonce that ends every Redis holder's value (the
#: release script reads them back to name its record: keep the two in step).
_NONCE_HEX = 32


# -- the lock objects ---------------------------------------------------------------
def _check_seconds(value: object, argument: str, *, allow_none: bool, allow_zero: bool) -> Optional[float]:
    if value is None and not allow_none:
        raise InvalidArgumentType(argument, "must be a number, not None")
    return optional_seconds(value, argument, allow_zero=allow_zero)


def _not_owned(message: str) -> LockNotOwned:
    return LockNotOwned(message)  # type: ignore[no-untyped-call,unused-ignore]


def _timed_out(message: str) -> LockTimeout:
    return LockTimeout(message)  # type: ignore[no-untyped-call,unused-ignore]


def _in_event_loop(name: str) -> BlockingCallInEventLoop:
    return BlockingCallInEventLoop(
        f"lock {_shown(name)}: blocking lock call from a thread running an asyncio event loop "
        "(coroutines share the thread, so the lock could not tell them apart, and a wait would "
        "freeze the loop); use the async alternative `mcp_redis.compat.StateLockManager.acquire_agent_lock_async` "
        "(`async with`), or run the blocking call in a worker thread with `asyncio.to_thread`"
    )


def _shown(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


class DistributedLock:
    """A lock shared by every process and host using the same backend.

    Mirrors redis-py's ``redis.lock.Lock`` (same methods, same meaning), with
    a lease always (`timeout`, default ``REDIS_LOCK_TIMEOUT``), a fencing
    token, signalled waits and optional background renewal (`auto_renew`).
    One object may be shared by threads: each thread holds it separately.
    """

    _namespace = "lock"

    def __init__(
        self,
        name: str,
        timeout: Optional[float] = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: Optional[float] = None,
        thread_local: bool = True,
        raise_on_release_error: bool = True,
        *,
        auto_renew: bool = False,
        reentrant: bool = False,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        fencing: bool = False,
        client: Optional[Client] = None,
        _argument: str = "name",
    ) -> None:
        self.name = validate_id(name, _argument)
        if client is not None and not isinstance(client, Client):
            raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
        # None: the default client, resolved at each call (follows configure()).
        self.client = client
        if isinstance(min_replicas, bool) or not isinstance(min_replicas, int):
            raise InvalidArgumentType("min_replicas", f"must be an int, not {type(min_replicas).__name__}")
        if not 0 <= min_replicas <= 64:
            raise InvalidArgument("min_replicas", f"must be between 0 and 64, got {min_replicas!r}")
        self.min_replicas = min_replicas
        self.replica_timeout = check_seconds(replica_timeout, "replica_timeout", maximum=60.0)
        self.timeout = _check_seconds(timeout, "timeout", allow_none=True, allow_zero=False)
        self.sleep = check_seconds(sleep, "sleep", allow_zero=True)  # redis-py compatibility; waits are signalled
        self.blocking = bool(blocking)
        self.blocking_timeout = _check_seconds(blocking_timeout, "blocking_timeout", allow_none=True, allow_zero=True)
        self.thread_local = bool(thread_local)
        self.raise_on_release_error = raise_on_release_error
        self.auto_renew = bool(auto_renew)
        self.reentrant = bool(reentrant)
        self.fencing = bool(fencing)
        self._state: Union[_Local, _Shared] = _Local() if thread_local else _Shared()
        self._keys: Optional[LockKeys] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_shown(self.name)}, timeout={self.timeout}, blocking_timeout={self.blocking_timeout})"

    # -- keys and holds ----------------------------------------------------------
    def _ids(self) -> Tuple[str, ...]:
        return (self.name,)

    def _resolve_keys(self, client: Optional[Client] = None) -> LockKeys:
        prefix = (client or resolve(self.client)).settings.key_prefix
        keys = self._keys
        if keys is None or keys.prefix != prefix:
            keys = self._keys = keys_for(prefix, self._namespace, self._ids())
        return keys

    @property
    def key(self) -> str:
        """The lock's key under the current prefix (also names its file / advisory lock)."""
        return self._resolve_keys().lock

    def _hold(self) -> Optional[Hold]:
        """This thread's live hold (reentrant locks: whichever object of the client took it).

        A hold taken before a fork belongs to the parent: the child's client
        has a new runtime, of the child's pid. A hold this object took before
        `configure()` replaced the default client stays this process's (it
        can still be released).
        """
        client = resolve(self.client)
        rt = runtime(client)
        hold = self._state.hold
        if self.reentrant:
            hold = _THREAD_HOLDS.holds.get((rt, self._resolve_keys(client).lock)) or hold
        if hold is None or hold.released or hold.runtime is None or hold.runtime.pid != rt.pid:
            return None
        return hold

    # -- redis-py's Lock interface ---------------------------------------------------
    def acquire(
        self,
        blocking: Optional[bool] = None,
        blocking_timeout: Optional[float] = None,
        token: Optional[Union[str, bytes]] = None,
    ) -> bool:
        """Take the lock; False when not acquired in time (``blocking=False``: one try).

        `blocking_timeout` (seconds, float) defaults to the object's; None waits
        forever. A thread already holding a reentrant lock enters at once,
        unless that hold was lost (`LockNotOwned`). `token` is a dedupe id
        stored with the hold, not an identity: a second acquire passing a
        token another holder holds waits or fails like any other. Refused in
        a thread running an asyncio event loop (`BlockingCallInEventLoop`).
        """
        if _get_running_loop() is not None:
            raise _in_event_loop(self.name)
        # Arguments first: a bad one raises and changes nothing, re-entry included.
        if blocking is None:
            blocking = self.blocking
        wait = _check_seconds(blocking_timeout, "blocking_timeout", allow_none=True, allow_zero=True)
        if wait is None:
            wait = self.blocking_timeout
        if not blocking:
            wait = 0.0
        if token is not None:
            if isinstance(token, bytes):
                try:
                    token = token.decode("utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    raise InvalidArgument("token", "bytes must be UTF-8 text (the token is stored as text)") from None
            elif not isinstance(token, str):
                raise InvalidArgumentType("token", f"must be str or bytes, not {type(token).__name__}")
        client = resolve(self.client)
        rt = runtime(client)
        keys = self._resolve_keys(client)
        if self.reentrant:
            held = _THREAD_HOLDS.holds.get((rt, keys.lock))
            # Re-entered only through the runtime that took it: not after a
            # fork, nor after configure()/reset() replaced the default client.
            if held is not None and held.runtime is rt and not held.released:
                if held.is_lost:
                    raise _not_owned(
                        f"cannot enter lock {_shown(self.name)}: this thread's hold was lost "
                        "(its lease expired or was taken over)"
                    )
                held.count += 1
                self._state.last = held
                METRICS.inc("lock_acquire_total", backend=held.backend.name, outcome="reentered")
                return True
        # The holder's value: a fresh nonce per call, after the caller's token if given.
        value = os.urandom(_NONCE_HEX // 2).hex()
        if token is not None:
            value = f"{token}:{value}"
        lease = self.timeout if self.timeout is not None else client.settings.lock_timeout
        started = time.monotonic()
        deadline = None if wait is None else started + wait
        hold = self._acquire_with_fallback(rt, keys, value, lease, deadline, self.fencing)
        if hold is None:
            METRICS.inc("lock_acquire_total", backend=rt.primary.name, outcome="timeout")
            return False
        hold.runtime = rt
        if self.min_replicas and isinstance(hold.backend, RedisBackend):
            self._require_replicas(hold)
        METRICS.inc("lock_acquire_total", backend=hold.backend.name, outcome="acquired")
        waited = time.monotonic() - started
        if waited > 0.001:  # contended: worth a histogram entry
            METRICS.observe("lock_wait_seconds", waited, backend=hold.backend.name)
        self._state.last = hold
        self._state.hold = hold
        if self.thread_local:
            hold.owner = threading.current_thread()
        if self.reentrant:
            _THREAD_HOLDS.holds[(rt, keys.lock)] = hold
        if hold.backend.leased and (self.auto_renew or hold.backend.heartbeat_every is not None):
            rt.watchdog.add(hold, renew=self.auto_renew)  # not renewed: only its process's liveness is beaten
        elif hold.backend.session_check_every is not None:
            rt.watchdog.add(hold)  # its session may die under it: checked, and marked lost then
        return True

    def _require_replicas(self, hold: Hold) -> None:
        """Opt-in durability: the grant must reach `min_replicas` replicas, or it is undone."""
        try:
            assert isinstance(hold.backend, RedisBackend)
            acked = hold.backend.replicate(hold, self.min_replicas, self.replica_timeout)
        except BaseException:
            self._undo(hold)
            raise
        if acked >= self.min_replicas:
            return
        self._undo(hold)
        METRICS.inc("lock_unreplicated_total")
        raise LockNotReplicated(_shown(self.name), max(acked, 0), self.min_replicas)

    @staticmethod
    def _undo(hold: Hold) -> None:
        try:
            hold.backend.release(hold)
        except Exception:  # its lease runs out anyway
            log.debug("lock: could not release an unreplicated grant", exc_info=True)

    def _acquire_with_fallback(self, rt: LockRuntime, keys: LockKeys, token: str, lease: float,
                               deadline: Optional[float], fencing: bool) -> Optional[Hold]:
        backend = rt.primary
        try:
            return backend.acquire(keys, token, lease, deadline, fencing)
        except BackendUnavailable:
            fallback = rt.fallback
            if isinstance(fallback, PostgresBackend) and not rt.client.settings.database_url:
                log.error("lock: lock_fallback is 'postgres' but DATABASE_URL is not set; failing closed")
                fallback = None
            if fallback is None:
                METRICS.inc("lock_backend_unavailable_total", backend=backend.name)
                raise
        METRICS.inc("lock_fallback_total", to=fallback.name)
        if isinstance(fallback, PostgresBackend):
            log.warning("lock: redis unavailable, using a postgres advisory lock")
            return fallback.acquire_fallback(keys, token, lease, deadline)
        METRICS.inc("lock_unsafe_total", backend="local")
        log.warning("lock: redis unavailable, using a host-local file lock (NOT exclusive across hosts)")
        return fallback.acquire(keys, token, lease, deadline)

    def release(self) -> None:
        """Give the lock back (the outermost release of a reentrant hold).

        Raises `LockNotOwned` when this thread does not hold it, or when its
        lease was lost meanwhile; a new holder's lock is never touched.
        """
        hold = self._hold()
        if hold is None:
            raise _not_owned(f"cannot release lock {_shown(self.name)}: not held by this thread")
        if hold.count > 1:
            hold.count -= 1
            return
        hold.released = True
        self._state.hold = None
        rt = hold.runtime
        if rt is not None:
            rt.watchdog.discard(hold)
            if self.reentrant and _THREAD_HOLDS.holds.get((rt, hold.keys.lock)) is hold:
                del _THREAD_HOLDS.holds[(rt, hold.keys.lock)]
        try:
            owned = hold.backend.release(hold)
        except BackendUnavailable as exc:
            if hold.is_lost:  # known lost already: what the caller must hear, whatever the outage
                METRICS.inc("lock_release_total", backend=hold.backend.name, outcome="not_owned")
                raise _not_owned(f"lock {_shown(self.name)} was no longer owned at release: its lease "
                                 "expired or was taken over") from exc
            if rt is not None and rt.pid == os.getpid():
                rt.watchdog.release_later(hold)  # freed as soon as the backend answers again
            raise
        if not owned or hold.is_lost:
            hold.mark_lost()
            METRICS.inc("lock_release_total", backend=hold.backend.name, outcome="not_owned")
            raise _not_owned(
                f"lock {_shown(self.name)} was no longer owned at release: its lease expired or was taken over"
            )

    def extend(self, additional_time: float, replace_ttl: bool = False) -> bool:
        """Add `additional_time` seconds to the lease (``replace_ttl``: set it to that)."""
        seconds = _check_seconds(additional_time, "additional_time", allow_none=False, allow_zero=False)
        assert seconds is not None
        hold = self._hold()
        if hold is None:
            raise _not_owned(f"cannot extend lock {_shown(self.name)}: not held by this thread")
        if not hold.backend.extend(hold, seconds, replace_ttl):
            hold.mark_lost()
            raise _not_owned(f"cannot extend lock {_shown(self.name)}: no longer owned")
        return True

    def reacquire(self) -> bool:
        """Reset the lease to the lock's `timeout`."""
        lease = self.timeout if self.timeout is not None else resolve(self.client).settings.lock_timeout
        return self.extend(lease, replace_ttl=True)

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        client = resolve(self.client)
        primary = runtime(client).primary
        hold = self._hold()
        if hold is not None and hold.backend.name != primary.name:  # held through the fallback
            return hold.backend.owned(hold)
        return primary.locked(self._resolve_keys(client))

    def owned(self) -> bool:
        """True when this thread holds the lock and its lease is still its own."""
        hold = self._hold()
        return hold is not None and hold.backend.owned(hold)

    # -- beyond redis-py -------------------------------------------------------------
    @property
    def fencing_token(self) -> Optional[int]:
        """This thread's fencing token: strictly increasing per lock name (None before any acquire).

        The token of this thread's current (or last) hold. Redis draws it on
        first read, one round trip, unless the lock was made with
        ``fencing=True`` (drawn with the grant, in the same round trip); the
        PostgreSQL and file backends always draw it with the grant. Read it
        while holding the lock: a hold that ended (released, lost, or taken
        before a fork) before its token was drawn raises `LockNotOwned`.
        """
        last = self._state.last
        if last is None:
            return None
        if last.fence is None:
            if _get_running_loop() is not None:  # the draw is a round trip: never on a loop's thread
                raise BlockingCallInEventLoop(
                    f"lock {_shown(self.name)}: reading fencing_token would draw it from Redis (a blocking "
                    "round trip) on a thread running an asyncio event loop; read it in the thread that "
                    "holds the lock, or make the lock with fencing=True (drawn with the grant)")
            _draw_fence(last, self.name)
        return last.fence

    @property
    def lost(self) -> bool:
        """True when this thread's (current or last) hold lost its lease."""
        last = self._state.last
        return last is not None and last.is_lost

    @property
    def lost_event(self) -> threading.Event:
        """An Event set when this thread's current hold loses its lease (wait on it)."""
        last = self._state.last
        return last.lost_event() if last is not None else threading.Event()

    @property
    def backend(self) -> Optional[str]:
        """Which backend holds this thread's current hold: redis/postgres/local/off."""
        hold = self._hold()
        return hold.backend.name if hold is not None else None

    def __enter__(self) -> DistributedLock:
        if self.acquire():
            self._state.entered += 1
            return self
        raise _timed_out(f"lock {_shown(self.name)}: not acquired within {self.blocking_timeout}s")

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        if self.thread_local and not self._state.entered:
            # Entered by another thread (a generator closed in this one): the hold is that
            # thread's, and stays held (and renewed) until it releases it or ends.
            if self.raise_on_release_error and exc_type is None:
                raise _not_owned(f"lock {_shown(self.name)}: its block ended in a thread that did not enter it")
            log.warning("lock %s: its block ended in a thread that did not enter it (a generator closed in "
                        "another thread?); the thread that entered it keeps its hold until it releases it "
                        "or ends", _shown(self.name))
            return
        self._state.entered -= 1
        try:
            self.release()
        except LockNotOwned:
            if self.raise_on_release_error and exc_type is None:
                raise
            log.warning("lock %s was no longer owned when leaving its block", _shown(self.name))


def _draw_fence(hold: Hold, name: str) -> None:
    """Draw `hold`'s fencing token (once, whichever threads read it at the same time)."""
    with hold.fence_lock():
        if hold.fence is not None:
            return
        if hold.released or hold.is_lost or hold.runtime is None or hold.runtime.pid != os.getpid():
            raise _not_owned(f"lock {_shown(name)}: its hold ended before its fencing token was read")
        fence = hold.backend.fence(hold)
        if fence is None:
            hold.mark_lost()
            raise _not_owned(f"lock {_shown(name)}: lost before its fencing token was read "
                             "(its lease expired or was taken over)")
        hold.fence = fence


class AgentLock(DistributedLock):
    """The lock of one agent's state: auto-renewing and reentrant per thread."""

    _namespace = "agent-lock"

    def __init__(
        self,
        agent_id: str,
        timeout: Optional[float] = None,
        blocking_timeout: Optional[float] = AGENT_LOCK_BLOCKING_TIMEOUT,
        *,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        fencing: bool = False,
        client: Optional[Client] = None,
    ) -> None:
        super().__init__(
            agent_id,
            timeout=timeout,
            blocking_timeout=blocking_timeout,
            auto_renew=True,
            reentrant=True,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            fencing=fencing,
            client=client,
            _argument="agent_id",
        )

    @property
    def agent_id(self) -> str:
        return self.name


def agent_lock(
    agent_id: str,
    timeout: Optional[float] = None,
    blocking_timeout: Optional[float] = AGENT_LOCK_BLOCKING_TIMEOUT,
    *,
    min_replicas: int = 0,
    replica_timeout: float = 0.1,
    fencing: bool = False,
    client: Optional[Client] = None,
) -> AgentLock:
    """The lock of `agent_id`'s state, as a context manager.

    `timeout`: lease in seconds (default ``REDIS_LOCK_TIMEOUT``), renewed in
    the background while held; `blocking_timeout`: longest wait (default 5 s,
    ``0`` tries once, None waits forever), then `LockTimeout`. `min_replicas`
    and `fencing`: see `lock`. `client`: a `mcp_redis.Client` (default: the
    default client, resolved at each call).
    """
    return AgentLock(agent_id, timeout=timeout, blocking_timeout=blocking_timeout, min_replicas=min_replicas,
                     replica_timeout=replica_timeout, fencing=fencing, client=client)


def lock(
    name: str,
    timeout: Optional[float] = None,
    blocking_timeout: Optional[float] = None,
    *,
    blocking: bool = True,
    thread_local: bool = True,
    auto_renew: bool = False,
    raise_on_release_error: bool = True,
    sleep: float = 0.1,
    min_replicas: int = 0,
    replica_timeout: float = 0.1,
    fencing: bool = False,
    client: Optional[Client] = None,
) -> DistributedLock:
    """A lock named `name` with redis-py's Lock methods (not renewed unless `auto_renew`).

    `sleep` is accepted for redis-py compatibility and ignored: waiters are woken.
    `min_replicas` > 0: each grant must be confirmed by that many replicas
    within `replica_timeout` seconds (``WAIT``), else it is released and
    `LockNotReplicated` raised — narrows, not closes, the failover window.
    `fencing=True`: draw the fencing token with each grant, in the same round
    trip (for code that always reads `fencing_token`); otherwise an
    uncontended Redis grant is one plain ``SET`` and the token is drawn on
    first read (one round trip more).
    """
    return DistributedLock(
        name,
        timeout=timeout,
        sleep=sleep,
        blocking=blocking,
        blocking_timeout=blocking_timeout,
        thread_local=thread_local,
        raise_on_release_error=raise_on_release_error,
        auto_renew=auto_renew,
        min_replicas=min_replicas,
        replica_timeout=replica_timeout,
        fencing=fencing,
        client=client,
    )
