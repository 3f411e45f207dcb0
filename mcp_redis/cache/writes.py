"""Invalidation and write-through from this process: epochs, generations, the pending queue.

`write` is ``invalidate``/``set``: drop the L1 copies of the namespace here,
then one backend script bumps the entry's epoch, deletes or stores the
value and publishes the invalidation, then drop them here again (this
process ignores its own message, and a thread may have refilled L1 from
the old L2 value in between). `invalidate_all` bumps the
namespace's generation. What the backend misses while unreachable is
remembered on the function (bounded: past `invalidation.MAX_PENDING` keys
it becomes one ``invalidate_all``) and replayed by `replay_pending` — from
the client's replayer thread, the listener's resubscription, or the next
L2 read.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Hashable, Optional, Tuple

from ..config import Mode
from . import invalidation
from .arguments import NS, dumps
from .base import Backend

if TYPE_CHECKING:
    from .function import CachedFunction, _State

__all__ = ["write", "invalidate_all", "replay_pending"]

log = logging.getLogger("mcp_redis.cache")


def write(fn: CachedFunction[Any], st: _State, key: Hashable, l2id: str, value: Any, missing: Any) -> None:
    """Invalidate (`value` is `missing`) or write `value` through, everywhere."""
    fn._count("invalidations")
    encoded = None
    if value is None and fn._negative_ttl is None:
        value = missing  # None is only cached with negative_ttl: set(None) invalidates
    if value is not missing:
        ttl = fn._negative_ttl if value is None and fn._negative_ttl is not None else st.ttl
        encoded = fn._encode(value, 0.0, ttl)
    for cache in invalidation.same_namespace(fn.namespace):
        cache._drop_local(key)
    if encoded is not None and st.mode is not Mode.OFF:
        fn._fill_l1(st, key, None, encoded[1], encoded[2], 0.0)
    drops = fn._drops  # any drop but our own second one below: someone wrote after us
    if st.l2 is None:
        return
    backend = fn._backend(st)
    if backend is None:
        _remember(fn, l2id)
        return
    try:
        gen = fn._generation(backend, st, fresh=True)
        _publish(fn, backend, st, gen, l2id, encoded)
    except backend.errors as exc:
        fn._count_error()
        _remember(fn, l2id)
        log.warning("cache %s: invalidation could not reach Redis (%s); will replay it",
                    fn.namespace, type(exc).__name__)
    else:
        # Again, now that Redis has it: a thread of this process that missed
        # L1 in between may have read the old L2 value (or epoch) and put it
        # back; this process ignores its own invalidation message.
        for cache in invalidation.same_namespace(fn.namespace):
            cache._drop_local(key)
        if encoded is not None and st.mode is not Mode.OFF:
            # Unless another write (this process's or another's, through the
            # listener) dropped it meanwhile: that one may be newer than ours.
            fn._fill_l1(st, key, None, encoded[1], encoded[2], 0.0, drops=drops + 1)
        if fn._has_pending():  # Redis answers: older missed ones can go now (e.g. after a reset)
            invalidation.of(st.client).replay_soon()


def _publish(fn: CachedFunction[Any], backend: Backend, st: _State, gen: str, l2id: str,
             encoded: Optional[Tuple[str, Any, float]]) -> None:
    value_key, epoch_key = fn._keys(st, gen, l2id)
    message = dumps({"o": invalidation.origin(), "n": fn.namespace, "op": "k", "k": l2id})
    envelope, px = "", 0
    if encoded is not None:
        envelope = encoded[0]
        px = max(int((encoded[2] - time.time() + fn._max_stale) * 1000), 1)
    backend.write(value_key, epoch_key, int(st.guard_ttl * 1000), st.channel, envelope, px, message)


def invalidate_all(fn: CachedFunction[Any]) -> None:
    """Evict every entry of `fn`'s namespace everywhere: one generation bump."""
    st = fn._state()
    fn._count("invalidations")
    for cache in invalidation.same_namespace(fn.namespace):
        cache._flush_local()
    if st.l2 is None:
        return
    backend = fn._backend(st)
    if backend is None:
        _remember_all(fn)
        return
    try:
        _bump_generation(fn, backend, st)
    except backend.errors as exc:
        fn._count_error()
        _remember_all(fn)
        log.warning("cache %s: invalidate_all could not reach Redis (%s); will replay it",
                    fn.namespace, type(exc).__name__)


def _bump_generation(fn: CachedFunction[Any], backend: Backend, st: _State) -> None:
    key = st.keys.key(NS, fn.namespace, suffix="gen")
    prefix = dumps({"o": invalidation.origin(), "n": fn.namespace, "op": "a"})[:-1] + ',"g":"'
    gen = backend.bump_generation(key, int(st.guard_ttl * 1000), st.channel, prefix)
    for cache in invalidation.same_namespace(fn.namespace):
        # Only if newer (a later invalidate_all may have come first), and L1
        # again: what a thread read under the old generation meanwhile goes too.
        cache._set_generation(gen, st, flush=True)


def _remember(fn: CachedFunction[Any], l2id: str) -> None:
    """Keep an invalidation Redis missed (bounded) and make sure the replayer runs."""
    with fn._lock:
        fn._pending[l2id] = None
        fn._pending.move_to_end(l2id)
        if len(fn._pending) > invalidation.MAX_PENDING:
            fn._pending.clear()
            fn._pending_all = True
    invalidation.of(fn._state().client).replay_soon()


def _remember_all(fn: CachedFunction[Any]) -> None:
    with fn._lock:
        fn._pending_all = True
    invalidation.of(fn._state().client).replay_soon()


def replay_pending(fn: CachedFunction[Any]) -> bool:
    """Send the invalidations Redis missed while it was unreachable.

    True when nothing is left pending; False when Redis is still out of
    reach (they stay pending, in order, for the next attempt).
    """
    if not fn._has_pending():
        return True
    # One replay at a time per function, and a reader that finds one under way
    # waits here for it: the queue is empty while its entries are in flight,
    # so without the wait a read could reach L2 before they are published.
    with fn._replay_lock:
        return _replay_locked(fn)


def _replay_locked(fn: CachedFunction[Any]) -> bool:
    st = fn._state()
    backend = fn._backend(st)
    if backend is None:
        return not fn._has_pending()
    with fn._lock:
        pending, fn._pending = list(fn._pending), OrderedDict()
        everything, fn._pending_all = fn._pending_all, False
        fn._replaying = bool(pending) or everything
    if not pending and not everything:
        return True
    try:
        if everything:
            _bump_generation(fn, backend, st)
        if pending:
            gen = fn._generation(backend, st, fresh=True)
            for l2id in pending:
                _publish(fn, backend, st, gen, l2id, None)
        log.info("cache %s: replayed %d invalidation(s)%s", fn.namespace, len(pending),
                 " and invalidate_all" if everything else "")
    except backend.errors:
        fn._count_error()
        with fn._lock:
            for l2id in pending:
                fn._pending.setdefault(l2id, None)
            fn._pending_all = fn._pending_all or everything
        return False
    finally:
        fn._replaying = False
    return True
