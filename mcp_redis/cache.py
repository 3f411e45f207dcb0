"""The metadata cache: ``@cached_metadata``, two tiers in front of a loader.

L1 is a bounded cachetools ``LRUCache`` per decorated function and process,
whose entries carry their own deadline (a per-entry TTL: never past the L2
entry's expiry; cheaper per hit than ``TTLCache``/``TLRUCache``);
L2 is Redis (JSON envelopes ``{"v": value, "d": load seconds, "x": expiry
ms}``), shared by every process; the loader is the decorated function.

Correctness rests on three mechanisms:

* **Epochs** guard write-back. Every entry has an epoch key beside its value
  (same hash slot). A miss reads the epoch *before* calling the loader and
  writes back with a script that refuses when the epoch moved; `invalidate`
  and `set` bump the epoch in the same script that deletes/writes the value
  and publishes the invalidation. So a slow load that started before an
  invalidation can never write its stale value back.
* **One listener per process** (`mcp_redis.pubsub.Subscriber`) applies
  invalidations to L1; after every (re)subscription it flushes L1 (messages
  may have been missed) and marks in-flight loads stale, so they fill
  neither tier's L1 copy.
* **Generations** for `invalidate_all`: one counter per namespace baked into
  every data key; bumping it makes the old entries unreachable at once.

Per-key single flight keeps concurrent misses in one process to one loader
call; XFetch (Vattani et al., VLDB 2015) refreshes hot keys early, one
caller at a time; a short ``SET NX PX`` lock keeps that to one process.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import math
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from json.encoder import encode_basestring as _encode_str
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Generic,
    Hashable,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    overload,
)

import redis.exceptions as rex
from cachetools import LRUCache

from .client import default_client
from .config import Mode, Settings, on_reset, settings
from .connections import RedisConnection, on_fork
from .errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from .keys import KeySpace, validate_id
from .metrics import METRICS
from .pubsub import Subscriber
from .scripts import lua
from .validation import optional_seconds, seconds

__all__ = ["cached_metadata", "CachedFunction", "CacheInfo", "wait_for_listener"]

log = logging.getLogger("mcp_redis.cache")
R = TypeVar("R")

_NS = "cache"  # KeySpace namespace of every key this module writes
_CHANNEL = "cache:invalidate"
_MAX_PENDING = 10_000  # invalidations remembered while Redis is unreachable
_MISSING: Any = object()
_XFETCH_HORIZON = 30.0  # XFetch draws only within 30 * delta * beta of expiry

# L1 entry: (value, logical expiry as unix seconds, delta * beta, L1 deadline
# on the monotonic clock). A tuple, because the L1 hit path is ~1 µs.
_Entry = Tuple[Any, float, float, float]


class CacheInfo(NamedTuple):
    """Counters of one cached function in this process (`cache_info()`)."""

    l1_hits: int
    l2_hits: int
    misses: int  # calls that found the value in neither tier
    loader_calls: int  # every run of the loader (misses, early refreshes, refresh())
    errors: int  # Redis errors, loader errors absorbed, values that are not JSON
    invalidations: int  # invalidate()/invalidate_all()/set() calls made here
    stale_served: int
    early_refreshes: int
    l1_size: int
    l1_maxsize: int

    @property
    def hits(self) -> int:
        return self.l1_hits + self.l2_hits


# -- process-wide state: origin id, registry, listener -----------------------------
_ORIGIN = uuid.uuid4().hex[:16]
_registry_lock = threading.Lock()
_registry: Dict[str, weakref.WeakSet[CachedFunction[Any]]] = {}


def _same_namespace(namespace: str) -> List[CachedFunction[Any]]:
    with _registry_lock:
        return list(_registry.get(namespace, ()))


def _all_caches() -> List[CachedFunction[Any]]:
    with _registry_lock:
        return [c for group in _registry.values() for c in group]


class _Listener:
    """The one invalidation listener of this process (started lazily)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subscriber: Optional[Subscriber] = None
        self.channel: Optional[str] = None

    def ensure(self, channel: str) -> None:
        if self.channel == channel and self.subscriber is not None:
            return
        with self.lock:
            if self.channel == channel and self.subscriber is not None:
                return
            old, self.subscriber = self.subscriber, None
            if old is not None:
                old.close()
            sub = Subscriber(
                _on_message,
                channels=[channel],
                on_subscribed=_on_subscribed,
                name="mcp_redis-cache-invalidation",
                connection=lambda: default_client().redis("metadata_cache"),
            )
            sub.start(wait=False)
            self.subscriber, self.channel = sub, channel

    def close(self) -> None:
        with self.lock:
            sub, self.subscriber, self.channel = self.subscriber, None, None
        if sub is not None:
            sub.close()


_LISTENER = _Listener()

_REPLAY_FIRST_PAUSE = 0.05  # seconds before the first retry of a missed invalidation
_REPLAY_MAX_PAUSE = 2.0  # the pause doubles up to this between attempts


class _Replayer:
    """The daemon thread that retries invalidations Redis missed, on its own.

    A process that only writes (no L2 reads, hence no listener) would
    otherwise keep them until its next L2 read, and readers elsewhere would
    serve the old L2 value for its whole ``ttl``. Started on demand when an
    invalidation cannot reach Redis; retries after `_REPLAY_FIRST_PAUSE`,
    doubling up to `_REPLAY_MAX_PAUSE` (attempts made while the breaker is
    open cost nothing); exits as soon as nothing is pending. `reset()` stops
    it (what is pending stays, replayed by the next invalidation or L2 read,
    which restart it); a forked child starts with none.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self.stop_event = threading.Event()

    def ensure(self) -> None:
        """Start the thread unless it runs (it re-checks for work before exiting)."""
        with self.lock:
            if self.thread is not None:
                return
            self.stop_event = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(self.stop_event,),
                                           name="mcp_redis-cache-replay", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self.lock:
            thread, self.thread = self.thread, None
            self.stop_event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)  # at most one attempt in progress; the thread is a daemon anyway

    def _run(self, stop: threading.Event) -> None:
        pause = _REPLAY_FIRST_PAUSE
        while not stop.wait(pause):
            done = True
            for cache in _all_caches():
                if cache._has_pending():
                    try:
                        done = cache._replay_pending() and done
                    except Exception:  # never let the thread die with work left  # pragma: no cover
                        log.exception("cache %s: replaying invalidations failed", cache.namespace)
                        done = False
            if done:
                with self.lock:  # exit only if no invalidation was remembered meanwhile
                    if not any(cache._has_pending() for cache in _all_caches()):
                        if self.thread is threading.current_thread():
                            self.thread = None
                        return
            pause = _REPLAY_FIRST_PAUSE if done else min(pause * 2, _REPLAY_MAX_PAUSE)
        with self.lock:
            if self.thread is threading.current_thread():
                self.thread = None


_REPLAYER = _Replayer()


def wait_for_listener(timeout: float = 5.0) -> bool:
    """Block until this process's invalidation listener is subscribed.

    It starts on the first Redis-mode cache miss; a process that must not
    miss an invalidation published right after start-up can wait here.
    """
    deadline = time.monotonic() + timeout
    while True:
        sub = _LISTENER.subscriber
        if sub is not None:
            return sub.wait_active(max(0.0, deadline - time.monotonic()))
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _on_message(channel: str, data: str) -> None:
    msg = json.loads(data)
    if msg.get("o") == _ORIGIN:
        return  # applied locally before publishing
    for cache in _same_namespace(str(msg.get("n"))):
        cache._apply_remote(msg)


def _on_subscribed(initial: bool) -> None:
    # Messages published while we were (re)connecting are lost: forget L1.
    for cache in _all_caches():
        cache._flush_local()
    if not initial:
        log.info("cache listener resubscribed: L1 caches flushed")
    for cache in _all_caches():
        cache._replay_pending()


@on_reset
def _on_reset() -> None:
    _REPLAYER.stop()
    _LISTENER.close()
    for cache in _all_caches():
        cache._flush_local()


@on_fork
def _on_fork() -> None:
    global _ORIGIN, _LISTENER, _REPLAYER, _registry_lock
    _ORIGIN = uuid.uuid4().hex[:16]
    _LISTENER = _Listener()  # the parent's threads do not exist here
    _REPLAYER = _Replayer()  # the child's pending invalidations restart it on demand
    _registry_lock = threading.Lock()
    for group in _registry.values():
        for cache in group:
            cache._after_fork()


# -- arguments -> keys -----------------------------------------------------------
def _check_json_arg(value: Any, name: str, depth: int = 0) -> None:
    """Arguments become keys through JSON: only types JSON keeps apart."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(name, "must be a finite number")
        return
    if depth > 16:
        raise InvalidArgument(name, "is nested too deeply to be a cache key")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json_arg(item, name, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgumentType(name, f"dict keys must be str to form a cache key, not {type(k).__name__}")
            _check_json_arg(v, name, depth + 1)
        return
    raise InvalidArgumentType(
        name, f"must be JSON-serialisable (str, int, float, bool, None, list, dict) to form a cache key, "
        f"not {type(value).__name__}"
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


@functools.lru_cache(maxsize=8192)
def _data_key(prefix: str, namespace: str, gen: str, l2id: str, suffix: Optional[str]) -> str:
    """An entry's key (memoised: encoding the ids costs more than the GET's parsing)."""
    return KeySpace(prefix).key(_NS, namespace, gen, l2id, tag=True, suffix=suffix)


def _l1_key_of(l2id: str) -> Hashable:
    """The L1 key of an argument id: the bare str for one str argument."""
    values = json.loads(l2id)
    if len(values) == 1 and isinstance(values[0], str):
        return str(values[0])
    return ("j", l2id)


def _is_id_param(name: str) -> bool:
    return name == "id" or name.endswith("_id")


def _check_number(name: str, value: Any, *, allow_none: bool = False, minimum: float = 0.0,
                  strict: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(name, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise InvalidArgument(name, f"must be {'>' if strict else '>='} {minimum}, got {value!r}")


class _Flight:
    """One in-process load of one key; followers wait for the leader's result."""

    __slots__ = ("_running", "finished", "value", "error", "stale")

    def __init__(self) -> None:
        self._running = threading.Lock()  # held until the leader finishes (cheaper than an Event)
        self._running.acquire()
        self.finished = False
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.stale = False  # an invalidation arrived: do not fill L1

    def finish(self) -> None:
        self.finished = True
        self._running.release()

    def wait(self) -> Any:
        with self._running:
            pass
        if self.error is not None:
            raise self.error
        return self.value


class _State(NamedTuple):
    """What a cached function derives from the `Settings` in force."""

    settings: Settings
    mode: Mode
    keys: KeySpace
    ttl: float  # L2 logical lifetime (before jitter)
    l1_ttl: float
    guard_ttl: float  # epoch and generation keys: longer than any entry lives
    channel: str


# -- the cached function ---------------------------------------------------------
class CachedFunction(Generic[R]):
    """A function with a two-tier cache in front of it (`@cached_metadata`).

    Call it like the function. Values are returned as JSON round-trips them
    (tuples become lists): treat them as read-only, they are shared.
    """

    def __init__(
        self,
        fn: Callable[..., R],
        *,
        ttl: Optional[float] = None,
        namespace: Optional[str] = None,
        maxsize: int = 4096,
        l1_ttl: float = 30.0,
        beta: float = 1.0,
        jitter: float = 0.1,
        max_stale: Optional[float] = None,
        negative_ttl: Optional[float] = None,
        id_params: Optional[Iterable[str]] = None,
        lock_ttl: Optional[float] = None,
    ) -> None:
        if not callable(fn):
            raise InvalidArgumentType("fn", f"must be callable, not {type(fn).__name__}")
        optional_seconds(ttl, "ttl")
        seconds(l1_ttl, "l1_ttl")
        _check_number("beta", beta, strict=False)
        optional_seconds(max_stale, "max_stale", allow_zero=True)
        optional_seconds(negative_ttl, "negative_ttl")
        _check_number("jitter", jitter, strict=False)
        optional_seconds(lock_ttl, "lock_ttl")
        if jitter > 0.5:
            raise InvalidArgument("jitter", f"must be <= 0.5, got {jitter!r}")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise InvalidArgumentType("maxsize", f"must be an int, not {type(maxsize).__name__}")
        if maxsize < 1:
            raise InvalidArgument("maxsize", f"must be >= 1, got {maxsize!r}")
        if namespace is None:
            namespace = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        self.namespace = validate_id(namespace, "namespace")
        self._fn = fn
        self._ttl = ttl
        self._l1_ttl = float(l1_ttl)
        self._beta = float(beta)
        self._jitter = float(jitter)
        self._max_stale = float(max_stale) if max_stale else 0.0
        self._negative_ttl = negative_ttl
        self._lock_ttl = lock_ttl
        self._maxsize = maxsize

        self._sig: Optional[inspect.Signature]
        try:
            self._sig = inspect.signature(fn)
        except (TypeError, ValueError):
            self._sig = None
        params = list(self._sig.parameters.values()) if self._sig is not None else []
        if id_params is None:
            self._id_params = frozenset(p.name for p in params if _is_id_param(p.name))
        else:
            self._id_params = frozenset(id_params)
        # One positional parameter: f("a") needs no binding; its L1 key is "a".
        self._fast = len(params) == 1 and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._fast_name = params[0].name if self._fast else ""

        self._lock = threading.Lock()
        self._l1: LRUCache[Hashable, _Entry] = LRUCache(maxsize)
        self._flights: Dict[Hashable, _Flight] = {}
        self._gen: Optional[Tuple[str, float, Settings]] = None  # (generation, refresh deadline, settings)
        self._gen_seq = 0  # bumped whenever the cached generation is dropped or replaced
        self._drops = 0  # bumped by every local eviction (invalidation, flush)
        self._st: Optional[_State] = None
        self._pending: OrderedDict[str, None] = OrderedDict()  # invalidations Redis has not seen
        self._pending_all = False
        self._warned_unserialisable = False
        self._l1_hits = self._l2_hits = self._misses = self._loader_calls = 0
        self._errors = self._invalidations = self._stale_served = self._early_refreshes = 0

        functools.update_wrapper(self, fn)
        with _registry_lock:
            _registry.setdefault(self.namespace, weakref.WeakSet()).add(self)

    def __repr__(self) -> str:
        return f"CachedFunction(namespace={self.namespace!r}, l1={self._l1.currsize}/{self._maxsize})"

    # -- settings --------------------------------------------------------------
    def _state(self) -> _State:
        s = settings()
        st = self._st
        if st is not None and st.settings is s:
            return st
        mode = s.mode("metadata_cache")
        ttl = float(self._ttl if self._ttl is not None else s.metadata_ttl)
        longest = max(ttl, self._negative_ttl or 0.0) * (1 + self._jitter) + self._max_stale
        ks = KeySpace(s.key_prefix)
        st = _State(s, mode, ks, ttl, min(self._l1_ttl, ttl), max(2 * longest, 600.0), ks.channel(_CHANNEL))
        self._st = st
        return st

    def _connection(self, st: _State) -> Optional[RedisConnection]:
        """The Redis connection when L2 is in use right now, else None."""
        if st.mode is not Mode.REDIS:
            return None
        try:
            conn = default_client().redis("metadata_cache")
        except BackendUnavailable:
            self._count_error()
            return None
        if not conn.policy.available:
            return None  # breaker open: skip L2 entirely
        return conn

    # -- keys -------------------------------------------------------------------
    def _key(self, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tuple[Hashable, str]:
        """(L1 key, argument id) of a call; validates before anything happens."""
        if self._sig is None:
            values: List[Any] = list(args)
            if kwargs:
                values.append(dict(kwargs))
            names = [f"args[{i}]" for i in range(len(args))] + ["kwargs"] * bool(kwargs)
        else:
            try:
                bound = self._sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArgumentType("args", f"do not match {self.namespace}: {exc}") from None
            bound.apply_defaults()
            values = list(bound.arguments.values())
            names = list(bound.arguments)
        for name, value in zip(names, values):
            if name in self._id_params:
                validate_id(value, name)
            else:
                _check_json_arg(value, name)
        l2id = _dumps(values)
        if len(values) == 1 and isinstance(values[0], str):
            return values[0], l2id
        return ("j", l2id), l2id

    def _l2id(self, key: Hashable, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        if isinstance(key, str):  # the fast path skipped validation
            if self._fast_name in self._id_params:
                validate_id(key, self._fast_name)
            return "[" + _encode_str(key) + "]"  # == _dumps([key]), 10x faster
        return str(key[1])  # type: ignore[index]

    def _keys(self, st: _State, gen: str, l2id: str) -> Tuple[str, str]:
        """(value key, epoch key): one hash slot, so one script can use both."""
        prefix = st.keys.prefix
        return (_data_key(prefix, self.namespace, gen, l2id, None),
                _data_key(prefix, self.namespace, gen, l2id, "epoch"))

    def _generation(self, conn: RedisConnection, st: _State, *, fresh: bool = False) -> str:
        """The namespace's generation (cached for the L1 TTL; pushed by messages)."""
        cached = self._gen
        now = time.monotonic()
        if not fresh and cached is not None and cached[2] is st.settings and cached[1] > now:
            return cached[0]
        seq = self._gen_seq
        key = st.keys.key(_NS, self.namespace, suffix="gen")
        # GETEX keeps a generation in use alive; a missing one reads as "0".
        gen = str(conn.call(conn.client.getex, key, px=int(st.guard_ttl * 1000)) or "0")
        with self._lock:
            if self._gen_seq == seq:
                self._gen = (gen, now + st.l1_ttl, st.settings)
        return gen

    # -- calls ---------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> R:
        # The L1 hit path: keep it to one settings check, one lock, one lookup.
        st = self._st
        if st is None or st.settings is not settings() or st.mode is Mode.OFF:
            st = self._state()
            if st.mode is Mode.OFF:
                return self._call_off(args, kwargs)
        key: Hashable
        if not kwargs and len(args) == 1 and type(args[0]) is str and self._fast:
            key = args[0]
            l2id = None
        else:
            key, l2id = self._key(args, kwargs)
        with self._lock:
            entry = self._l1.get(key)  # not [key]: a miss would raise twice inside cachetools
            if entry is not None:
                if entry[3] > time.monotonic():
                    self._l1_hits += 1
                else:
                    entry = None  # expired; the refill overwrites it
        if entry is not None:
            bd = entry[2]
            # XFetch: recompute early iff now - delta*beta*ln(rand) >= expiry
            # (bd is 0 unless this L1 copy outlives the start of that window).
            if not bd or time.time() - bd * math.log(1.0 - random.random()) < entry[1]:
                return entry[0]  # type: ignore[no-any-return]
        return self._miss(st, key, l2id, args, kwargs, entry)

    def _call_off(self, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> R:
        with self._lock:
            self._loader_calls += 1
            self._misses += 1
        return self._fn(*args, **kwargs)

    def _l1_peek(self, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """The L1 hit path without the miss path: the value, or `_MISSING`.

        For the coroutine front, which answers L1 hits on the event loop and
        sends everything else (Redis, the loader) to a worker thread. Bad
        arguments raise here, before anything happens.
        """
        st = self._st
        if st is None or st.settings is not settings():
            st = self._state()
        if st.mode is Mode.OFF:
            return _MISSING
        key: Hashable
        if not kwargs and len(args) == 1 and type(args[0]) is str and self._fast:
            key = args[0]
        else:
            key, _ = self._key(args, kwargs)
        with self._lock:
            entry = self._l1.get(key)
            if entry is None or entry[3] <= time.monotonic():
                return _MISSING
            bd = entry[2]
            if bd and time.time() - bd * math.log(1.0 - random.random()) >= entry[1]:
                return _MISSING  # XFetch: let the miss path refresh it
            self._l1_hits += 1
        return entry[0]

    def _miss(self, st: _State, key: Hashable, l2id: Optional[str], args: Tuple[Any, ...],
              kwargs: Mapping[str, Any], early: Optional[_Entry]) -> R:
        if l2id is None:
            l2id = self._l2id(key, args, kwargs)
        conn = self._connection(st)
        if conn is not None:
            listener = _LISTENER
            if listener.channel != st.channel or listener.subscriber is None:
                listener.ensure(st.channel)
            if (self._pending or self._pending_all) and not self._replay_pending():
                _REPLAYER.ensure()
            if early is None:
                # Optimistic L2 read, before any single-flight bookkeeping: an
                # L2 hit costs one GET. `drops` tells whether an invalidation
                # reached this process meanwhile (then L1 is not filled).
                drops = self._drops
                try:
                    gen = self._generation(conn, st)
                    raw = conn.call(conn.client.get, _data_key(st.keys.prefix, self.namespace, gen, l2id, None))
                except (BackendUnavailable, rex.RedisError) as exc:
                    self._count_error()
                    log.debug("cache %s: L2 read failed (%s); using the loader", self.namespace,
                              type(exc).__name__)
                    conn = None
                else:
                    found = self._decode(raw) if raw is not None else None
                    now = time.time()
                    if found is not None and now < found[2]:
                        value, delta, expiry = found
                        bd = delta * self._beta
                        entry = (value, expiry, bd, 0.0)
                        # XFetch: recompute early iff now - delta*beta*ln(rand) >= expiry.
                        if not bd or now - bd * math.log(1.0 - random.random()) < expiry:
                            self._fill_l1(st, key, None, entry, l2_hit=True, drops=drops)
                            return value  # type: ignore[no-any-return]
                        early = entry
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if early is not None:
                return early[0]  # type: ignore[no-any-return]  # someone is refreshing it
            return flight.wait()  # type: ignore[no-any-return]
        try:
            value = self._load_through(st, conn, key, l2id, args, kwargs, flight, early)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            return value
        finally:
            flight.finish()
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]

    def _load_through(self, st: _State, conn: Optional[RedisConnection], key: Hashable, l2id: str,
                      args: Tuple[Any, ...], kwargs: Mapping[str, Any], flight: _Flight,
                      early: Optional[_Entry]) -> R:
        """The leader's path: epoch (and a second look at L2), the loader, write-back."""
        epoch: Optional[str] = None  # observed before loading; None = do not fill L2
        fill_lock: Optional[str] = None  # the cross-process single-flight lock we hold
        current: Any = _MISSING  # a still-valid value (early refresh)
        stale: Any = _MISSING  # an expired value we may serve if the loader fails
        keys: Optional[Tuple[str, str]] = None
        if early is not None:
            current = early[0]
        if conn is not None:
            try:
                gen = self._generation(conn, st)
                keys = self._keys(st, gen, l2id)
                if early is None:
                    # One round trip: the epoch to guard the write-back, and the
                    # value again (a leader that just finished may have filled it).
                    raw, seen = conn.call(conn.client.mget, list(keys))
                    epoch = str(seen or "")
                    found = self._decode(raw) if raw is not None else None
                    if found is not None:
                        value, delta, expiry = found
                        now = time.time()
                        if now < expiry:
                            self._fill_l1(st, key, flight, (value, expiry, delta * self._beta, 0.0), l2_hit=True)
                            return value  # type: ignore[no-any-return]
                        if now < expiry + self._max_stale:
                            stale = value
                    if self._lock_ttl:  # optional cross-process single flight
                        lock_key = _data_key(st.keys.prefix, self.namespace, gen, l2id, "fill")
                        px = int(self._lock_ttl * 1000)
                        if conn.call(conn.client.set, lock_key, _ORIGIN, nx=True, px=px):
                            fill_lock = lock_key
                        else:
                            waited = self._wait_for_fill(conn, st, key, flight, keys[0], gen, l2id)
                            if waited is not _MISSING:
                                return waited  # type: ignore[no-any-return]
                else:
                    if not self._claim_refresh(conn, st, gen, l2id, early):
                        # Another process refreshes it; keep serving ours without
                        # drawing again until that refresh has landed in L2.
                        self._fill_l1(st, key, flight, early, no_early=True)
                        return current  # type: ignore[no-any-return]
                    epoch = str(conn.call(conn.client.get, keys[1]) or "")
            except (BackendUnavailable, rex.RedisError) as exc:
                self._count_error()
                log.debug("cache %s: L2 read failed (%s); using the loader", self.namespace, type(exc).__name__)
                epoch = None

        try:
            if early is not None:
                self._count("early_refreshes")
            else:
                self._count("misses")
            self._count("loader_calls")
            started = time.perf_counter()
            try:
                loaded = self._fn(*args, **kwargs)
            except Exception as exc:
                if current is not _MISSING:
                    self._count_error()
                    log.warning("cache %s: early refresh failed (%s); the cached value is still valid",
                                self.namespace, type(exc).__name__)
                    return current  # type: ignore[no-any-return]
                if stale is not _MISSING:
                    self._count("stale_served")
                    self._count_error()
                    METRICS.inc("cache_stale_served_total", namespace=self.namespace)
                    log.warning("cache %s: loader failed (%s); serving a stale value (max_stale=%ss)",
                                self.namespace, type(exc).__name__, self._max_stale)
                    return stale  # type: ignore[no-any-return]
                raise
            delta = time.perf_counter() - started
            METRICS.observe("cache_load_seconds", delta, namespace=self.namespace)

            if loaded is None and self._negative_ttl is None:
                return loaded  # None is not cached unless negative_ttl says so
            ttl = self._negative_ttl if loaded is None and self._negative_ttl is not None else st.ttl
            encoded = self._encode(loaded, delta, ttl)
            if encoded is None:
                return loaded
            text, value, expiry = encoded
            if conn is not None and keys is not None and epoch is not None and delta < st.guard_ttl / 2:
                px = int((expiry - time.time() + self._max_stale) * 1000)
                try:
                    conn.call(conn.script("cache_fill"), keys=list(keys), args=[epoch, text, max(px, 1)])
                except (BackendUnavailable, rex.RedisError) as exc:
                    self._count_error()
                    log.debug("cache %s: L2 write-back failed (%s)", self.namespace, type(exc).__name__)
            self._fill_l1(st, key, flight, (value, expiry, delta * self._beta, 0.0))
            return value  # type: ignore[no-any-return]
        finally:
            if fill_lock is not None and conn is not None:
                try:  # let waiting processes go on at once (best effort: it expires anyway)
                    conn.call(conn.client.delete, fill_lock)
                except (BackendUnavailable, rex.RedisError):
                    pass

    def _wait_for_fill(self, conn: RedisConnection, st: _State, key: Hashable, flight: _Flight,
                       value_key: str, gen: str, l2id: str) -> Any:
        """Another process holds the fill lock: poll L2 for its value until the
        lock goes (loaded, failed or expired); `_MISSING` means load ourselves."""
        fill_lock = _data_key(st.keys.prefix, self.namespace, gen, l2id, "fill")
        deadline = time.monotonic() + float(self._lock_ttl or 0.0)
        pause = 0.002
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            raw, holder = conn.call(conn.client.mget, [value_key, fill_lock])
            found = self._decode(raw) if raw is not None else None
            if found is not None and time.time() < found[2]:
                value, delta, expiry = found
                self._fill_l1(st, key, flight, (value, expiry, delta * self._beta, 0.0), l2_hit=True)
                return value
            if holder is None:
                break
        return _MISSING

    def _claim_refresh(self, conn: RedisConnection, st: _State, gen: str, l2id: str, early: _Entry) -> bool:
        """Cross-process guard for early refresh: one ``SET NX PX`` winner."""
        lock_key = st.keys.key(_NS, self.namespace, gen, l2id, tag=True, suffix="refresh")
        px = int(min(max(4 * early[2], 0.25), 10.0) * 1000)
        return bool(conn.call(conn.client.set, lock_key, _ORIGIN, nx=True, px=px))

    def _fill_l1(self, st: _State, key: Hashable, flight: Optional[_Flight], entry: _Entry,
                 *, no_early: bool = False, l2_hit: bool = False, drops: Optional[int] = None) -> None:
        """Put `entry` in L1 unless an invalidation arrived since it was read
        (its flight was marked stale, or the drop counter moved)."""
        value, expiry, bd, _ = entry
        now = time.time()
        remaining = min(st.l1_ttl, expiry - now)
        if no_early:
            bd = 0.0
            remaining = min(remaining, 0.25)
        elif expiry - (now + remaining) > _XFETCH_HORIZON * bd:
            # XFetch cannot fire before this L1 copy expires (p < e^-30):
            # spare the L1 hit path the draw.
            bd = 0.0
        stored = (value, expiry, bd, time.monotonic() + remaining)
        with self._lock:
            if l2_hit:
                self._l2_hits += 1
            if remaining > 0 and (flight is None or not flight.stale) and (drops is None or drops == self._drops):
                self._l1[key] = stored

    def _encode(self, value: Any, delta: float, ttl: float) -> Optional[Tuple[str, Any, float]]:
        """(L2 envelope, the value as JSON round-trips it, logical expiry)."""
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            self._count_error()
            if not self._warned_unserialisable:
                self._warned_unserialisable = True
                log.error("cache %s: the loader returned a value JSON cannot hold (%s); it is not cached",
                          self.namespace, type(exc).__name__)
            return None
        lifetime = ttl * (1.0 + random.uniform(-self._jitter, self._jitter))
        expiry = time.time() + lifetime
        envelope = f'{{"v":{text},"d":{delta:.6f},"x":{int(expiry * 1000)}}}'
        return envelope, json.loads(text), expiry

    def _decode(self, raw: str) -> Optional[Tuple[Any, float, float]]:
        try:
            env = json.loads(raw)
            return env["v"], float(env["d"]), float(env["x"]) / 1000.0
        except (ValueError, KeyError, TypeError):
            self._count_error()
            log.warning("cache %s: unreadable L2 entry ignored", self.namespace)
            return None

    # -- batch ---------------------------------------------------------------------
    def get_many(self, ids: Iterable[Any], *,
                 loader: Optional[Callable[[List[Any]], Mapping[Any, Any]]] = None) -> Dict[Any, R]:
        """``{id: f(id)}`` for many ids: one L1 pass, one MGET, one write-back pipeline.

        Misses are loaded by `loader(missing_ids) -> {id: value}` when given
        (one query for all of them; absent ids count as None), else by one
        call of the function per miss. No early refresh or stale serving here.
        """
        st = self._state()
        items = list(ids)
        if st.mode is Mode.OFF:
            return self._load_batch(items, loader)
        order: List[Tuple[Any, Hashable, str]] = []
        seen = set()
        for item in items:
            key, l2id = self._key((item,), {})
            if key not in seen:
                seen.add(key)
                order.append((item, key, l2id))
        results: Dict[Hashable, Any] = {}
        led: List[Tuple[Any, Hashable, str, _Flight]] = []
        followed: List[Tuple[Hashable, _Flight]] = []
        with self._lock:
            for item, key, l2id in order:
                entry = self._l1.get(key)
                if entry is not None and entry[3] > time.monotonic():
                    results[key] = entry[0]
                    self._l1_hits += 1
                    continue
                flight = self._flights.get(key)
                if flight is not None:
                    followed.append((key, flight))
                else:
                    flight = self._flights[key] = _Flight()
                    led.append((item, key, l2id, flight))
        try:
            if led:
                self._lead_batch(st, led, loader, results)
        except BaseException as exc:
            for _, _, _, flight in led:
                if not flight.finished:
                    flight.error = exc
            raise
        finally:
            with self._lock:
                for _, key, _, flight in led:
                    flight.finish()
                    if self._flights.get(key) is flight:
                        del self._flights[key]
        for key, flight in followed:
            results[key] = flight.wait()
        return {item: results[key] for item, key, _ in order}

    def _lead_batch(self, st: _State, led: List[Tuple[Any, Hashable, str, _Flight]],
                    loader: Optional[Callable[[List[Any]], Mapping[Any, Any]]],
                    results: Dict[Hashable, Any]) -> None:
        conn = self._connection(st)
        keys: Dict[Hashable, Tuple[str, str]] = {}
        epochs: Dict[Hashable, str] = {}
        missing = led
        if conn is not None:
            _LISTENER.ensure(st.channel)
            if (self._pending or self._pending_all) and not self._replay_pending():
                _REPLAYER.ensure()
            try:
                gen = self._generation(conn, st)
                flat: List[str] = []
                for _, key, l2id, _ in led:
                    keys[key] = self._keys(st, gen, l2id)
                    flat.extend(keys[key])
                mget = conn.client.mget_nonatomic if conn.is_cluster else conn.client.mget
                replies = conn.call(mget, flat)
                missing = []
                now = time.time()
                for i, (item, key, l2id, flight) in enumerate(led):
                    raw, epoch = replies[2 * i], replies[2 * i + 1]
                    found = self._decode(raw) if raw is not None else None
                    if found is not None and now < found[2]:
                        value, delta, expiry = found
                        results[key] = flight.value = value
                        self._fill_l1(st, key, flight, (value, expiry, delta * self._beta, 0.0), l2_hit=True)
                    else:
                        epochs[key] = str(epoch or "")
                        missing.append((item, key, l2id, flight))
            except (BackendUnavailable, rex.RedisError) as exc:
                self._count_error()
                log.debug("cache %s: batch L2 read failed (%s)", self.namespace, type(exc).__name__)
                epochs.clear()
                missing = [m for m in led if m[1] not in results]
        if not missing:
            return
        started = time.perf_counter()
        loaded = self._load_batch([m[0] for m in missing], loader)
        delta = (time.perf_counter() - started) / len(missing)
        writes: List[Tuple[Tuple[str, str], str, str, float]] = []
        for item, key, _, flight in missing:
            value = loaded[item]
            if value is None and self._negative_ttl is None:
                results[key] = flight.value = None
                continue
            ttl = self._negative_ttl if value is None and self._negative_ttl is not None else st.ttl
            encoded = self._encode(value, delta, ttl)
            if encoded is None:
                results[key] = flight.value = value
                continue
            text, value, expiry = encoded
            results[key] = flight.value = value
            if key in epochs:
                writes.append((keys[key], epochs[key], text, expiry))
            self._fill_l1(st, key, flight, (value, expiry, delta * self._beta, 0.0))
        if conn is not None and writes and delta < st.guard_ttl / 2:
            try:
                conn.call(self._fill_pipeline, conn, writes)
            except (BackendUnavailable, rex.RedisError) as exc:
                self._count_error()
                log.debug("cache %s: batch write-back failed (%s)", self.namespace, type(exc).__name__)

    def _fill_pipeline(self, conn: RedisConnection, writes: Sequence[Tuple[Tuple[str, str], str, str, float]]) -> Any:
        # EVAL, not EVALSHA: a cluster pipeline does not load scripts per node
        # (and its .eval() is no command), so the command is sent as is.
        pipe = conn.client.pipeline(transaction=False)
        now = time.time()
        for (value_key, epoch_key), epoch, text, expiry in writes:
            px = max(int((expiry - now + self._max_stale) * 1000), 1)
            pipe.execute_command("EVAL", lua("cache_fill"), 2, value_key, epoch_key, epoch, text, px)
        return pipe.execute()

    def _load_batch(self, items: List[Any], loader: Optional[Callable[[List[Any]], Mapping[Any, Any]]]) -> Dict[Any, Any]:
        with self._lock:
            self._loader_calls += 1 if loader is not None else len(items)
            self._misses += len(items)
        METRICS.inc("cache_misses_total", len(items), namespace=self.namespace)
        if loader is not None:
            found = loader(list(items))
            return {item: found.get(item) for item in items}
        return {item: self._fn(item) for item in items}

    # -- invalidation and write-through -------------------------------------------
    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Evict ``f(*args, **kwargs)`` from L2 and from every process's L1.

        Loads already in flight cannot write the old value back. If Redis is
        unreachable the L2 eviction is remembered and replayed when it returns.
        """
        key, l2id = self._key(args, kwargs)
        self._write(self._state(), key, l2id, _MISSING)

    def set(self, value: Any, *args: Any, **kwargs: Any) -> None:
        """Write-through: make `value` the cached result of ``f(*args, **kwargs)``.

        For after an update (the caller knows the new value): L2 gets it,
        every other process drops its L1 copy, loads in flight are refused.
        """
        key, l2id = self._key(args, kwargs)
        self._write(self._state(), key, l2id, value)

    def refresh(self, *args: Any, **kwargs: Any) -> R:
        """Invalidate, then load and cache ``f(*args, **kwargs)`` now; returns it."""
        self.invalidate(*args, **kwargs)
        return self(*args, **kwargs)

    def _write(self, st: _State, key: Hashable, l2id: str, value: Any) -> None:
        self._count("invalidations")
        encoded = None
        if value is None and self._negative_ttl is None:
            value = _MISSING  # None is only cached with negative_ttl: set(None) invalidates
        if value is not _MISSING:
            ttl = self._negative_ttl if value is None and self._negative_ttl is not None else st.ttl
            encoded = self._encode(value, 0.0, ttl)
        for cache in _same_namespace(self.namespace):
            cache._drop_local(key)
        if encoded is not None and st.mode is not Mode.OFF:
            self._fill_l1(st, key, None, (encoded[1], encoded[2], 0.0, 0.0))
        if st.mode is not Mode.REDIS:
            return
        conn = self._connection(st)
        if conn is None:
            self._remember(l2id)
            return
        try:
            gen = self._generation(conn, st, fresh=True)
            self._publish_write(conn, st, gen, l2id, encoded)
        except (BackendUnavailable, rex.RedisError) as exc:
            self._count_error()
            self._remember(l2id)
            log.warning("cache %s: invalidation could not reach Redis (%s); will replay it",
                        self.namespace, type(exc).__name__)
        else:
            if self._has_pending():  # Redis answers: older missed ones can go now (e.g. after a reset)
                _REPLAYER.ensure()

    def _publish_write(self, conn: RedisConnection, st: _State, gen: str, l2id: str,
                       encoded: Optional[Tuple[str, Any, float]]) -> None:
        keys = self._keys(st, gen, l2id)
        message = _dumps({"o": _ORIGIN, "n": self.namespace, "op": "k", "k": l2id})
        envelope, px = "", 0
        if encoded is not None:
            envelope = encoded[0]
            px = max(int((encoded[2] - time.time() + self._max_stale) * 1000), 1)
        conn.call(conn.script("cache_invalidate"), keys=list(keys),
               args=[int(st.guard_ttl * 1000), st.channel, envelope, px, message])

    def invalidate_all(self) -> None:
        """Evict every entry of this function everywhere: one generation bump."""
        st = self._state()
        self._count("invalidations")
        for cache in _same_namespace(self.namespace):
            cache._flush_local()
        if st.mode is not Mode.REDIS:
            return
        conn = self._connection(st)
        if conn is None:
            self._remember_all()
            return
        try:
            self._bump_generation(conn, st)
        except (BackendUnavailable, rex.RedisError) as exc:
            self._count_error()
            self._remember_all()
            log.warning("cache %s: invalidate_all could not reach Redis (%s); will replay it",
                        self.namespace, type(exc).__name__)

    def _bump_generation(self, conn: RedisConnection, st: _State) -> None:
        key = st.keys.key(_NS, self.namespace, suffix="gen")
        prefix = _dumps({"o": _ORIGIN, "n": self.namespace, "op": "a"})[:-1] + ',"g":"'
        gen = str(conn.call(conn.script("cache_generation"), keys=[key],
                         args=[int(st.guard_ttl * 1000), st.channel, prefix]))
        for cache in _same_namespace(self.namespace):
            cache._set_generation(gen, st)

    def _remember(self, l2id: str) -> None:
        """Keep an invalidation Redis missed (bounded) and make sure the replayer runs."""
        with self._lock:
            self._pending[l2id] = None
            self._pending.move_to_end(l2id)
            if len(self._pending) > _MAX_PENDING:
                self._pending.clear()
                self._pending_all = True
        _REPLAYER.ensure()

    def _remember_all(self) -> None:
        with self._lock:
            self._pending_all = True
        _REPLAYER.ensure()

    def _has_pending(self) -> bool:
        return bool(self._pending) or self._pending_all

    def _replay_pending(self) -> bool:
        """Send the invalidations Redis missed while it was unreachable.

        True when nothing is left pending; False when Redis is still out of
        reach (they stay pending, in order, for the next attempt).
        """
        if not self._has_pending():
            return True
        st = self._state()
        conn = self._connection(st)
        if conn is None:
            return False
        with self._lock:
            pending, self._pending = list(self._pending), OrderedDict()
            everything, self._pending_all = self._pending_all, False
        if not pending and not everything:
            return True
        try:
            if everything:
                self._bump_generation(conn, st)
            if pending:
                gen = self._generation(conn, st, fresh=True)
                for l2id in pending:
                    self._publish_write(conn, st, gen, l2id, None)
            if pending or everything:
                log.info("cache %s: replayed %d invalidation(s)%s", self.namespace, len(pending),
                         " and invalidate_all" if everything else "")
        except (BackendUnavailable, rex.RedisError):
            self._count_error()
            with self._lock:
                for l2id in pending:
                    self._pending.setdefault(l2id, None)
                self._pending_all = self._pending_all or everything
            return False
        return True

    # -- local state -------------------------------------------------------------------
    def _drop_local(self, key: Hashable) -> None:
        with self._lock:
            self._drops += 1
            self._l1.pop(key, None)
            flight = self._flights.pop(key, None)
            if flight is not None:
                flight.stale = True

    def _flush_local(self) -> None:
        with self._lock:
            self._drops += 1
            self._l1.clear()
            for flight in self._flights.values():
                flight.stale = True
            self._flights.clear()
            self._gen = None
            self._gen_seq += 1

    def _set_generation(self, gen: str, st: _State) -> None:
        with self._lock:
            cached = self._gen
            if cached is None or int(gen) > int(cached[0]):
                self._gen = (gen, time.monotonic() + st.l1_ttl, st.settings)
            self._gen_seq += 1

    def _apply_remote(self, msg: Mapping[str, Any]) -> None:
        op = msg.get("op")
        if op == "k":
            self._drop_local(_l1_key_of(str(msg["k"])))
        elif op == "a":
            self._flush_local()
            self._set_generation(str(msg["g"]), self._state())

    def _after_fork(self) -> None:
        # A parent thread may have held the lock mid-update; and the child's
        # L1 would miss invalidations until its own listener starts.
        self._lock = threading.Lock()
        self._l1 = LRUCache(self._maxsize)
        self._flights = {}
        self._gen = None
        self._gen_seq += 1

    # -- stats ---------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, "_" + name, getattr(self, "_" + name) + 1)
        if name != "stale_served":
            METRICS.inc(f"cache_{name}_total", namespace=self.namespace)

    def _count_error(self) -> None:
        self._count("errors")

    def cache_info(self) -> CacheInfo:
        """This process's counters for this function (L1 hits are counted here only)."""
        with self._lock:
            return CacheInfo(self._l1_hits, self._l2_hits, self._misses, self._loader_calls, self._errors,
                             self._invalidations, self._stale_served, self._early_refreshes,
                             int(self._l1.currsize), self._maxsize)

    def cache_clear(self) -> None:
        """Empty this process's L1 (L2 and the counters are kept)."""
        self._flush_local()


# -- the decorator ---------------------------------------------------------------
@overload
def cached_metadata(fn: Callable[..., R], /) -> CachedFunction[R]: ...


@overload
def cached_metadata(
    fn: Union[float, None] = None,
    /,
    *,
    ttl: Optional[float] = None,
    namespace: Optional[str] = None,
    maxsize: int = 4096,
    l1_ttl: float = 30.0,
    beta: float = 1.0,
    jitter: float = 0.1,
    max_stale: Optional[float] = None,
    negative_ttl: Optional[float] = None,
    id_params: Optional[Iterable[str]] = None,
    lock_ttl: Optional[float] = None,
) -> Callable[[Callable[..., R]], CachedFunction[R]]: ...


def cached_metadata(
    fn: Union[Callable[..., Any], float, None] = None,
    /,
    *,
    ttl: Optional[float] = None,
    namespace: Optional[str] = None,
    maxsize: int = 4096,
    l1_ttl: float = 30.0,
    beta: float = 1.0,
    jitter: float = 0.1,
    max_stale: Optional[float] = None,
    negative_ttl: Optional[float] = None,
    id_params: Optional[Iterable[str]] = None,
    lock_ttl: Optional[float] = None,
) -> Any:
    """Cache a loader in two tiers: per-process L1, Redis L2 shared by all.

    ``@cached_metadata`` or ``@cached_metadata(ttl=300, ...)``; ``ttl=None``
    reads ``REDIS_METADATA_TTL`` when called. See docs/cache.md for options.
    """
    options: Dict[str, Any] = dict(
        namespace=namespace, maxsize=maxsize, l1_ttl=l1_ttl, beta=beta, jitter=jitter,
        max_stale=max_stale, negative_ttl=negative_ttl, id_params=id_params, lock_ttl=lock_ttl,
    )
    if fn is not None and not callable(fn):
        if ttl is not None:
            raise InvalidArgument("ttl", "given twice")
        ttl = fn  # @cached_metadata(300)
        fn = None
    optional_seconds(ttl, "ttl")
    if fn is not None:
        return _cached(fn, ttl, options)

    def decorate(func: Callable[..., R]) -> CachedFunction[R]:
        return _cached(func, ttl, options)  # type: ignore[no-any-return]

    return decorate


def _cached(fn: Callable[..., Any], ttl: Optional[float], options: Dict[str, Any]) -> Any:
    """A `CachedFunction`, or for an ``async def`` the coroutine front over one."""
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise InvalidArgumentType(
            "fn", f"{getattr(fn, '__qualname__', fn)!r} is a generator function: its values cannot be cached")
    if inspect.iscoroutinefunction(fn):
        return _async_cached(fn, ttl, options)
    return CachedFunction(fn, ttl=ttl, **options)


# -- coroutine functions ----------------------------------------------------------
# The event loop of the coroutine whose miss a worker thread is serving
# (``asyncio.to_thread`` copies the context, so the worker sees it).
_CALLER_LOOP: contextvars.ContextVar[Optional[asyncio.AbstractEventLoop]] = contextvars.ContextVar(
    "mcp_redis_cache_caller_loop", default=None)


def _run_on_caller_loop(coro_fn: Callable[..., Awaitable[Any]], args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """From a worker thread: run ``coro_fn(*args, **kwargs)`` on the awaiting caller's loop, wait, return."""
    loop = _CALLER_LOOP.get()
    if loop is None:
        raise InvalidArgumentType(
            "fn", f"{getattr(coro_fn, '__qualname__', coro_fn)!r} is a coroutine function: await the cached "
            "function instead of calling its synchronous core")
    coro = coro_fn(*args, **kwargs)
    return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]


def _async_cached(fn: Callable[..., Awaitable[Any]], ttl: Optional[float], options: Dict[str, Any]) -> Any:
    """``@cached_metadata`` on an ``async def``: an ``async def`` with the same methods.

    Awaiting it answers an L1 hit on the loop (no I/O); anything else runs the
    synchronous `CachedFunction` in a worker thread (``asyncio.to_thread``),
    whose loader call runs the coroutine on the caller's loop and waits for
    it. So what is cached is the awaited value, Redis is never waited for on
    the loop, and single flight, epochs and invalidation work as for a
    plain function. `invalidate`, `set`, `invalidate_all`, `cache_info` and
    `cache_clear` stay synchronous (they never call the loader); `refresh`
    and `get_many` are coroutines.
    """

    @functools.wraps(fn)
    def load(*args: Any, **kwargs: Any) -> Any:
        return _run_on_caller_loop(fn, args, kwargs)

    core: CachedFunction[Any] = CachedFunction(load, ttl=ttl, **options)

    async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        token = _CALLER_LOOP.set(asyncio.get_running_loop())
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        finally:
            _CALLER_LOOP.reset(token)

    @functools.wraps(fn)
    async def cached(*args: Any, **kwargs: Any) -> Any:
        value = core._l1_peek(args, kwargs)
        if value is not _MISSING:
            return value
        return await in_thread(core, *args, **kwargs)

    async def refresh(*args: Any, **kwargs: Any) -> Any:
        """Invalidate, then load and cache ``f(*args, **kwargs)`` now; returns it."""
        return await in_thread(core.refresh, *args, **kwargs)

    async def get_many(ids: Iterable[Any], *, loader: Optional[Callable[[List[Any]], Any]] = None) -> Dict[Any, Any]:
        """``{id: f(id)}`` for many ids (see `CachedFunction.get_many`); `loader` may be async."""
        batch = loader
        if loader is not None and inspect.iscoroutinefunction(loader):
            async_loader = loader

            def batch(missing: List[Any]) -> Mapping[Any, Any]:
                return _run_on_caller_loop(async_loader, (missing,), {})  # type: ignore[no-any-return]

        return await in_thread(core.get_many, list(ids), loader=batch)  # type: ignore[no-any-return]

    attributes: Dict[str, Any] = dict(
        invalidate=core.invalidate, invalidate_all=core.invalidate_all, set=core.set,
        cache_info=core.cache_info, cache_clear=core.cache_clear, refresh=refresh, get_many=get_many,
        namespace=core.namespace, cached_function=core,
    )
    for name, value in attributes.items():
        setattr(cached, name, value)
    return cached
