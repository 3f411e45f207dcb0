"""`CachedFunction.get_many`: many ids with one L1 pass, one MGET, one write-back pipeline."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple

from ..config import Mode
from ..errors import InvalidArgumentType
from ..metrics import METRICS
from .base import Backend, Fill
from .flight import Flight, leading

if TYPE_CHECKING:
    from .function import CachedFunction, _State

__all__ = ["get_many"]

log = logging.getLogger("mcp_redis.cache")
BatchLoader = Optional[Callable[[List[Any]], Mapping[Any, Any]]]


def get_many(fn: CachedFunction[Any], ids: Iterable[Any], loader: BatchLoader) -> Dict[Any, Any]:
    """``{id: fn(id)}``: L1 first, then one L2 read and one load for the rest."""
    st = fn._state()
    items = list(ids)
    for item in items:  # they key the returned dict: refused before anything is loaded
        try:
            hash(item)
        except TypeError:
            raise InvalidArgumentType("ids", f"must be hashable (they key the returned dict), not "
                                      f"{type(item).__name__}") from None
    if st.mode is Mode.OFF:
        return _load_batch(fn, items, loader)
    order: List[Tuple[Any, Hashable, str]] = []
    seen = set()
    for item in items:
        key, l2id = fn._key((item,), {})
        if key not in seen:
            seen.add(key)
            order.append((item, key, l2id))
    results: Dict[Hashable, Any] = {}
    led: List[Tuple[Any, Hashable, str, Flight]] = []
    followed: List[Tuple[Hashable, Flight]] = []
    with fn._lock:
        for item, key, l2id in order:
            entry = fn._l1.get(key)
            if entry is not None:
                value, _, _, deadline = entry  # see base.L1Stored
                if deadline > time.monotonic():
                    results[key] = value
                    fn._l1_hits += 1
                    continue
            flight = fn._flights.get(key)
            if flight is not None:
                followed.append((key, flight))
            else:
                flight = fn._flights[key] = Flight()
                led.append((item, key, l2id, flight))
    try:
        if led:
            _lead_batch(fn, st, led, loader, results)
    except BaseException as exc:
        for _, key, _, flight in led:
            if key not in results and flight.error is None:  # ids already served keep their values
                flight.error = exc
        raise
    finally:
        with fn._lock:
            for _, key, _, flight in led:
                flight.finish()
                if fn._flights.get(key) is flight:
                    del fn._flights[key]
    for key, flight in followed:
        results[key] = flight.wait()
    return {item: results[key] for item, key, _ in order}


def _lead_batch(fn: CachedFunction[Any], st: _State, led: List[Tuple[Any, Hashable, str, Flight]],
                loader: BatchLoader, results: Dict[Hashable, Any]) -> None:
    backend = fn._backend(st)
    keys: Dict[Hashable, Tuple[str, str]] = {}
    epochs: Dict[Hashable, str] = {}
    missing = led
    if backend is not None:
        fn._prepare_l2(st, backend)
        try:
            gen = fn._generation(backend, st)
            flat: List[str] = []
            for _, key, l2id, _ in led:
                keys[key] = fn._keys(st, gen, l2id)
                flat.extend(keys[key])
            replies = backend.get_all(flat)
            missing = []
            now = time.time()
            for i, (item, key, l2id, flight) in enumerate(led):
                raw, epoch = replies[2 * i], replies[2 * i + 1]
                found = fn._decode(raw) if raw is not None else None
                if found is not None and now < found.expiry:
                    results[key] = flight.value = found.value
                    fn._fill_l1(st, key, flight, found.value, found.expiry, found.delta * fn._beta, l2_hit=True)
                else:
                    if epoch is not None:
                        epochs[key] = str(epoch)
                    missing.append((item, key, l2id, flight))
            # Entries with no epoch: their load's marker (cache_begin.lua), one more round trip.
            unmarked = [m[1] for m in missing if m[1] not in epochs]
            if unmarked:
                marks = backend.begin_many([keys[k] for k in unmarked], int(st.guard_ttl * 1000))
                epochs.update(zip(unmarked, marks))
        except backend.errors as exc:
            fn._count_error()
            log.debug("cache %s: batch L2 read failed (%s)", fn.namespace, type(exc).__name__)
            epochs.clear()
            missing = [m for m in led if m[1] not in results]
    if not missing:
        return
    marked = [(keys[key][1], epochs[key]) for _, key, _, _ in missing if epochs.get(key, "")[:1] == "m"]
    filled = False
    try:
        filled = _load_and_fill(fn, st, backend, missing, keys, epochs, loader, results)
    finally:
        if marked and not filled and backend is not None:
            try:  # nothing written back: take the loads' markers away (best effort: they expire anyway)
                backend.abandon(marked)
            except backend.errors:
                pass


def _load_and_fill(fn: CachedFunction[Any], st: _State, backend: Optional[Backend],
                   missing: List[Tuple[Any, Hashable, str, Flight]], keys: Dict[Hashable, Tuple[str, str]],
                   epochs: Dict[Hashable, str], loader: BatchLoader, results: Dict[Hashable, Any]) -> bool:
    """Load the missing entries and write them back; True when the write-back pipeline ran."""
    started = time.perf_counter()
    errors: Dict[Any, BaseException] = {}
    with leading([m[3] for m in missing]):
        loaded = _load_batch(fn, [m[0] for m in missing], loader, errors)
    delta = (time.perf_counter() - started) / len(missing)
    fills: List[Fill] = []
    now = time.time()
    for item, key, _, flight in missing:
        if item in errors:  # its own loader raised: its waiters get its own exception
            flight.error = errors[item]
            continue
        value = loaded[item]
        if value is None and fn._negative_ttl is None:
            results[key] = flight.value = None
            continue
        ttl = fn._negative_ttl if value is None and fn._negative_ttl is not None else st.ttl
        encoded = fn._encode(value, delta, ttl)
        if encoded is None:
            results[key] = flight.value = value
            continue
        text, value, expiry = encoded
        results[key] = flight.value = value
        if key in epochs:
            px = max(int((expiry - now + fn._max_stale) * 1000), 1)
            fills.append(Fill(keys[key][0], keys[key][1], epochs[key], text, px))
        fn._fill_l1(st, key, flight, value, expiry, delta * fn._beta)
    filled = False
    if backend is not None and fills and delta < st.guard_ttl / 2:
        try:
            backend.fill_many(fills)
            # True only if every entry was written back; else the caller takes the markers away
            # (those of entries written back are gone already: cache_abandon.lua leaves them be).
            filled = len(fills) == len(missing)
        except backend.errors as exc:
            fn._count_error()
            log.debug("cache %s: batch write-back failed (%s)", fn.namespace, type(exc).__name__)
    if errors:
        raise next(iter(errors.values()))  # the first id that failed, as a plain call of it would
    return filled


def _load_batch(fn: CachedFunction[Any], items: List[Any], loader: BatchLoader,
                errors: Optional[Dict[Any, BaseException]] = None) -> Dict[Any, Any]:
    """The values of `items` (the batch `loader`, else the function per id).

    Per id, with `errors`: an id whose call raises is recorded there, and the
    others are still loaded (their waiters get their values).
    """
    with fn._lock:
        fn._loader_calls += 1 if loader is not None else len(items)
        fn._misses += len(items)
    METRICS.inc("cache_misses_total", len(items), namespace=fn.namespace)
    if loader is not None:
        found = loader(list(items))
        return {item: found.get(item) for item in items}
    if errors is None:
        return {item: fn._fn(item) for item in items}
    out: Dict[Any, Any] = {}
    for item in items:
        try:
            out[item] = fn._fn(item)
        except Exception as exc:
            errors[item] = exc
    return out
