"""The metadata cache: ``@cached_metadata``, two tiers in front of a loader.

L1 is a bounded cachetools ``LRUCache`` per decorated function and process,
whose entries (`L1Entry`) carry their own deadline (a per-entry TTL: never
past the L2 entry's expiry; cheaper per hit than ``TTLCache``/``TLRUCache``);
L2 is the cache deployment's Redis (``MCP_REDIS_CACHE_URL``, else
``REDIS_URL``; JSON envelopes ``{"v": value, "d": load seconds, "x": expiry
ms}``, `Envelope`), shared by every process; the loader is the decorated
function. ``client=`` picks the `mcp_redis.Client` (default: the default
client when called).

Correctness rests on three mechanisms:

* **Epochs** guard write-back. Every entry has an epoch key beside its value
  (same hash slot). A miss reads the epoch *before* calling the loader and
  writes back with a script that refuses when the epoch moved; `invalidate`
  and `set` bump the epoch in the same script that deletes/writes the value
  and publishes the invalidation. So a slow load that started before an
  invalidation can never write its stale value back.
* **One listener per client and process** (`invalidation.Invalidation`)
  applies invalidations to L1; after every (re)subscription it flushes L1
  (messages may have been missed) and marks in-flight loads stale, so they
  fill neither tier's L1 copy.
* **Generations** for `invalidate_all`: one counter per namespace baked into
  every data key; bumping it makes the old entries unreachable at once.

Per-key single flight keeps concurrent misses in one process to one loader
call; XFetch (Vattani et al., VLDB 2015) refreshes hot keys early, one
caller at a time; a short ``SET NX PX`` lock keeps that to one process.

The package: this front (the decorator and the coroutine front);
`function` (`CachedFunction`, the engine); `base` (the L2 `Backend`
protocol, `Envelope`, `L1Entry`); `redis` (the Redis L2); `flight` (single
flight, XFetch); `arguments` (arguments -> keys); `batch` (`get_many`);
`invalidation` (registry, listener, replayer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar, Union, overload

from ..client import Client
from ..errors import InvalidArgument, InvalidArgumentType
from ..validation import is_async_callable, is_generator_callable, optional_seconds
from .base import Backend, Envelope, L1Entry
from .flight import Flight, awaited_from, mark_loader_task
from .function import MISSING, CachedFunction, CacheInfo, default_namespace
from .invalidation import all_caches as _all_caches  # noqa: F401  (stats, prometheus)
from .invalidation import wait_for_listener
from .redis import RedisBackend

__all__ = ["cached_metadata", "CachedFunction", "CacheInfo", "wait_for_listener",
           "Backend", "RedisBackend", "Envelope", "L1Entry"]

R = TypeVar("R")
_MISSING = MISSING


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
    client: Optional[Client] = None,
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
    client: Optional[Client] = None,
) -> Any:
    """Cache a loader in two tiers: per-process L1, Redis L2 shared by all.

    ``@cached_metadata`` or ``@cached_metadata(ttl=300, ...)``; ``ttl=None``
    reads ``REDIS_METADATA_TTL`` when called; ``client=`` picks the
    `mcp_redis.Client` (default: the default client when called). See
    docs/cache.md for options.
    """
    options: Dict[str, Any] = dict(
        namespace=namespace, maxsize=maxsize, l1_ttl=l1_ttl, beta=beta, jitter=jitter,
        max_stale=max_stale, negative_ttl=negative_ttl, id_params=id_params, lock_ttl=lock_ttl,
        client=client,
    )
    if isinstance(fn, (staticmethod, classmethod)):  # above @staticmethod/@classmethod, no arguments
        return _cached(fn, ttl, options)
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
    if isinstance(fn, staticmethod):  # wrap its function, keep it static (callable since Python 3.10)
        return staticmethod(_cached(fn.__func__, ttl, options))
    if isinstance(fn, classmethod):
        raise InvalidArgumentType("fn", "is a classmethod object: put @cached_metadata below @classmethod")
    if is_generator_callable(fn):
        raise InvalidArgumentType(
            "fn", f"{getattr(fn, '__qualname__', fn)!r} is a generator function: its values cannot be cached")
    if is_async_callable(fn):
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

    async def as_loader() -> Any:
        mark_loader_task()  # this task awaiting its own load is recursion (see cache.flight)
        return await coro

    future = asyncio.run_coroutine_threadsafe(as_loader(), loop)
    while True:
        try:
            return future.result(timeout=0.5)
        except concurrent.futures.CancelledError:  # its loop shut down (asyncio.run cancels what is left)
            raise RuntimeError("the event loop of the caller whose load this was cancelled the loader") from None
        except concurrent.futures.TimeoutError:  # not the builtin before Python 3.11
            if loop.is_closed():  # closed with the task pending (close() cancels nothing): it never ends
                # (Not future.cancel(): its callback would run on the closed loop, and log an error.)
                raise RuntimeError("the event loop of the caller whose load this was closed before the "
                                   "loader finished") from None


async def _in_own_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread`` in a thread of its own, not the loop's default pool: a miss holds its
    thread while its loader runs, and a loader that needs the pool itself (``to_thread``, another
    cached function, ``@rate_limited``) would wait for ever once misses had taken every thread."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: Optional[BaseException]) -> None:
        if done.cancelled():
            return
        if isinstance(error, StopIteration):  # a future cannot hold one (TypeError: never woken)
            wrapped = RuntimeError(f"the loader raised {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def run() -> None:
        value: Any = None
        error: Optional[BaseException] = None
        try:
            value = context.run(call, *args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine, as to_thread does
            error = exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass

    threading.Thread(target=run, name="mcp_redis-cache-load", daemon=True).start()
    return await done


async def _outcome_of(flight: Flight) -> Any:
    """A follower's wait for another caller's load, on the loop: no thread is held meanwhile."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def woken() -> None:
        if not finished.done():
            finished.set_result(None)

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(woken)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting
            pass

    flight.add_done_callback(wake)
    await finished
    return flight.outcome()


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

    if options.get("namespace") is None:
        options = {**options, "namespace": default_namespace(fn)}  # fn's, not `load`'s below

    @functools.wraps(fn)
    def load(*args: Any, **kwargs: Any) -> Any:
        return _run_on_caller_loop(fn, args, kwargs)

    core: CachedFunction[Any] = CachedFunction(load, ttl=ttl, **options)

    async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        token = _CALLER_LOOP.set(asyncio.get_running_loop())
        try:
            with awaited_from(asyncio.current_task()):
                return await _in_own_thread(call, *args, **kwargs)
        finally:
            _CALLER_LOOP.reset(token)

    @functools.wraps(fn)
    async def cached(*args: Any, **kwargs: Any) -> Any:
        value = core._l1_peek(args, kwargs)
        if value is not _MISSING:
            return value
        flight = core._flight_for(args, kwargs)
        if flight is not None:  # a load of these arguments is under way: wait for it on the loop,
            value = core._l1_peek(args, kwargs, draw=False)  # unless it refreshes a still-valid copy
            if value is not _MISSING:
                return value
            return await _outcome_of(flight)
        return await in_thread(core, *args, **kwargs)

    async def refresh(*args: Any, **kwargs: Any) -> Any:
        """Invalidate, then load and cache ``f(*args, **kwargs)`` now; returns it."""
        core._flight_for(args, kwargs)
        return await in_thread(core.refresh, *args, **kwargs)

    async def get_many(ids: Iterable[Any], *, loader: Optional[Callable[[List[Any]], Any]] = None) -> Dict[Any, Any]:
        """``{id: f(id)}`` for many ids (see `CachedFunction.get_many`); `loader` may be async."""
        batch = loader
        if loader is not None and is_async_callable(loader):
            async_loader = loader

            def batch(missing: List[Any]) -> Mapping[Any, Any]:
                return _run_on_caller_loop(async_loader, (missing,), {})  # type: ignore[no-any-return]

        items = list(ids)
        for item in items:
            core._flight_for((item,), {})
        return await in_thread(core.get_many, items, loader=batch)  # type: ignore[no-any-return]

    attributes: Dict[str, Any] = dict(
        invalidate=core.invalidate, invalidate_all=core.invalidate_all, set=core.set,
        cache_info=core.cache_info, cache_clear=core.cache_clear, refresh=refresh, get_many=get_many,
        namespace=core.namespace, cached_function=core,
    )
    for name, value in attributes.items():
        setattr(cached, name, value)
    return cached
