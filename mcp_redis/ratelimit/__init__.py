"""Rate limiting: `RateLimiter` and `@rate_limited`, on Redis, PostgreSQL or in-process.

    limiter = RateLimiter("kg_store", limits=[(20, 3600), (5, 60)])
    result = limiter.hit(agent_id)          # one round trip, all or nothing
    if not result.allowed: ... result.retry_after, result.headers()

    @rate_limited("kg_store", limit=20, window=3600, key="agent_id")
    def store_knowledge(agent_id, payload): ...

The backend is chosen per call by ``client.mode("rate_limits")`` (the
limiter's client, else the default one) through `_BY_MODE`; when it does
not answer, the client's ``rate_limit_fallback`` setting decides through
`_FALLBACK` (default: the in-process limiter), logged once per outage of
that client and counted.

The package has the shape of every feature:

* ``__init__`` (this front): `RateLimiter`, `rate_limited`; the mode and
  fallback tables. `limits`: `Limit`, the per-settings plan, the results
  and `ratelimit_headers` (all re-exported here).
* `base`: the `Backend` protocol (``acquire``, ``clear``) and the named types
  between front and backend (`Policy`, `Spec`, `Reply`, `Outcome`).
* `algorithms`: `Algorithm` and the Python models of the Lua scripts.
* `redis` (`RedisBackend`: one Lua script per algorithm, ``mcp_redis/lua/``),
  `postgres` (`PostgresBackend`: table ``<pg_schema>.rate_limits``) and `memory`
  (`MemoryBackend`: in-process, "local" in settings). Each is one per client
  (`Client.singleton`), as is the outage log.

Every backend answers the same figures: the in-process and PostgreSQL ones
run the Python models, which mirror the Lua scripts step for step; times
are integer microseconds between front and backend, float seconds in
results.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type, TypeVar, Union

from ..client import Client, resolve
from ..config import Mode, RateLimitFallback, Settings
from ..errors import InvalidArgument, InvalidArgumentType
from ..keys import KeySpace, validate_id
from ..metrics import METRICS
from ..validation import is_async_callable, is_generator_callable
from .algorithms import Algorithm
from .base import Backend, Outcome, Policy, Reply, Spec
from .limits import Limit, LimitStatus, RateLimitResult, _check_int, _coerce_limits, _Plan, _Ticket, ratelimit_headers
from .memory import MemoryBackend
from .postgres import PostgresBackend
from .redis import RedisBackend

__all__ = [
    "Algorithm",
    "Backend",
    "Limit",
    "LimitStatus",
    "MAX_LOG_COST",
    "RateLimitResult",
    "RateLimiter",
    "rate_limited",
    "ratelimit_headers",
]

log = logging.getLogger("mcp_redis.ratelimit")
F = TypeVar("F", bound=Callable[..., Any])

# -- the backends: mode and fallback as data ------------------------------------------
def _redis(client: Client) -> Backend:
    return RedisBackend(client.redis("rate_limits"))


def _postgres(client: Client) -> Backend:
    return PostgresBackend(client.postgres())


def _memory(client: Client) -> Backend:
    return MemoryBackend(client.settings.rate_limit_local_maxsize)


#: A backend's name (in results and metrics) -> (its key among the client's singletons, its factory).
_BACKENDS: Dict[str, Tuple[str, Callable[[Client], Backend]]] = {
    "redis": ("ratelimit.redis", _redis),
    "postgres": ("ratelimit.postgres", _postgres),
    "local": ("ratelimit.memory", _memory),
}

#: ``rate_limits`` mode -> the backend that counts (None: switched off, every call admitted as ``"off"``).
_BY_MODE: Dict[Mode, Optional[str]] = {Mode.REDIS: "redis", Mode.POSTGRES: "postgres", Mode.LOCAL: "local",
                                       Mode.OFF: None}

#: ``rate_limit_fallback`` -> what answers when the mode's backend does not, in order: a backend
#: (skipped if it is the one that failed, or PostgreSQL without a DATABASE_URL; one that fails too
#: passes to the next) or a verdict (`_VERDICTS`). The in-process backend always answers.
_FALLBACK: Dict[RateLimitFallback, Tuple[str, ...]] = {
    RateLimitFallback.LOCAL: ("local",),
    RateLimitFallback.POSTGRES: ("postgres", "local"),
    RateLimitFallback.OPEN: ("open",),
    RateLimitFallback.CLOSED: ("closed",),
}

#: Verdicts decided by policy, not by counting: name -> allowed.
_VERDICTS: Dict[str, bool] = {"off": True, "open": True, "closed": False}


def _backend(client: Client, which: str) -> Backend:
    """The client's backend `which` (one per client and process, built on first use)."""
    singleton_key, build = _BACKENDS[which]
    backend: Optional[Backend] = client.peek(singleton_key)
    if backend is None:
        backend = client.singleton(singleton_key, lambda: build(client))
    return backend


# -- the limiter --------------------------------------------------------------------
class RateLimiter:
    """`limit` calls per `window` seconds per key — or several limits at once, all or nothing.

    ``RateLimiter("kg_store", 20, 3600)`` or
    ``RateLimiter("kg_store", limits=[(20, 3600), Limit(5, 60, "burst")])``.
    `window` None means ``REDIS_RATE_LIMIT_WINDOW`` at call time. Thread-safe;
    cheap to create; holds no connection (it uses its client's backends).
    """

    def __init__(
        self,
        name: str,
        limit: Optional[int] = None,
        window: Optional[float] = None,
        *,
        algorithm: Union[Algorithm, str] = Algorithm.SLIDING_WINDOW,
        limits: Optional[Sequence[Union[Limit, Tuple[Any, ...]]]] = None,
        client: Optional[Client] = None,
    ) -> None:
        self.name = validate_id(name, "name")
        if client is not None and not isinstance(client, Client):
            raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
        # None: the default client, resolved at each call (follows configure()).
        self.client = client
        try:
            self.algorithm = Algorithm(algorithm)
        except ValueError:
            choices = ", ".join(sorted({a.value for a in Algorithm}))
            raise InvalidArgument("algorithm", f"must be one of {choices}, got {algorithm!r}") from None
        self.limits = _coerce_limits(limit, window, limits)
        self._plan_cache: Optional[Tuple[Settings, _Plan]] = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{lim.limit}/{lim.window if lim.window is not None else 'default'}s" for lim in self.limits)
        return f"RateLimiter({self.name!r}, [{shown}], algorithm={self.algorithm.value!r})"

    # -- the verbs -----------------------------------------------------------------
    def hit(self, key: str, cost: int = 1) -> RateLimitResult:
        """Consume `cost` units of every limit for `key` if all of them allow it, else none."""
        return self._run(key, cost, True)

    def peek(self, key: str, cost: int = 1) -> RateLimitResult:
        """What `hit(key, cost)` would answer now, without consuming anything."""
        return self._run(key, cost, False)

    def _reset_all(self) -> None:
        """Forget every key's state (the backend in force and the in-process one): the legacy ``reset()``."""
        client = resolve(self.client)
        plan = self._plan(client.settings)
        if plan.backend is not None and plan.backend != "local":
            _backend(client, plan.backend).clear_all(plan.policy)
        _backend(client, "local").clear_all(plan.policy)

    def reset(self, key: str) -> None:
        """Forget every limit's state for `key` (in the backend in force, and in the in-process one)."""
        key = validate_id(key, "key")
        client = resolve(self.client)
        plan = self._plan(client.settings)
        if plan.backend is not None and plan.backend != "local":
            _backend(client, plan.backend).clear(plan.policy, key)
        _backend(client, "local").clear(plan.policy, key)

    # -- internals -------------------------------------------------------------------
    def _plan(self, s: Settings) -> _Plan:
        cached = self._plan_cache
        if cached is not None and cached[0] is s:
            return cached[1]
        windows = tuple(float(lim.window) if lim.window is not None else float(s.rate_limit_window)
                        for lim in self.limits)
        specs = tuple(Spec(lim.limit, max(1, round(w * 1_000_000))) for lim, w in zip(self.limits, windows))
        if len({spec.window_us for spec in specs}) != len(specs):
            raise InvalidArgument("limits", "two limits share one window; keep the stricter one")
        if self.algorithm is Algorithm.GCRA:
            for spec in specs:  # its state is a time in whole microseconds: a unit must cost one at least
                if spec.limit > spec.window_us:
                    raise InvalidArgument("limit", f"{spec.limit} per {spec.window_us / 1e6:g}s is more than one a "
                                                   "microsecond, finer than GCRA's clock: use another algorithm")
        mode = s.mode("rate_limits")
        backend = _BY_MODE[mode]
        policy = Policy.of(self.algorithm, self.name, specs, KeySpace(s.key_prefix))
        plan = _Plan(
            policy=policy,
            specs=specs,
            windows=windows,
            labels=tuple(lim.label(w) for lim, w in zip(self.limits, windows)),
            max_cost=_max_cost(self.algorithm, min(lim.limit for lim in self.limits)),
            mode=mode,
            backend=backend,
            singleton_key=_BACKENDS[backend][0] if backend is not None else "",
        )
        self._plan_cache = (s, plan)
        return plan

    def _run(self, key: str, cost: int, consume: bool) -> RateLimitResult:
        key = validate_id(key, "key")
        cost = _check_int(cost, "cost")
        client = resolve(self.client)
        plan = self._plan(client.settings)
        if cost > plan.max_cost:
            raise _too_costly(cost, min(spec.limit for spec in plan.specs))
        which = plan.backend
        if which is None:
            return self._verdict(plan, "off", client)
        backend: Optional[Backend] = client.peek(plan.singleton_key)  # built: the one lookup of the hot path
        if backend is None:
            backend = _backend(client, which)
        t0 = time.monotonic_ns()  # before the hit: a refund over-estimates its age (the safe side)
        try:
            reply = backend.acquire(plan.policy, key, cost, consume)
        except backend.errors as exc:
            return self._fallback(client, plan, key, cost, consume, which, exc, t0)
        outages: Optional[Dict[str, bool]] = client.peek(_OUTAGES)
        if outages and outages.get(which):
            _recovered(outages, which)
        result = self._result(plan, reply, which)
        if reply.allowed and consume:
            result._ticket = _Ticket(((self, key, cost, reply, t0, which, plan.policy),))
        return result

    def refund(self, result: RateLimitResult) -> bool:
        """Give back, atomically, what the admitted hit that returned `result` consumed; True if anything was.

        For a call that failed after being admitted. Exact per algorithm
        (the backend's ``refund``): never more than the hit took and never
        to a window that did not count it, so refunds never let more than
        `limit` successful calls through in a window. False, changing
        nothing: a refused hit, a peek, a verdict (off/open/closed), a
        result already refunded, units already out of their window, or a
        backend that does not answer now (logged; the units stay consumed,
        the safe side). A refund is never retried: when its reply is lost
        it may have been applied, once, and False is returned all the same.
        """
        if not isinstance(result, RateLimitResult):
            raise InvalidArgumentType("result", f"must be a RateLimitResult, not {type(result).__name__}")
        cell = result._ticket
        if cell is None:
            return False
        try:
            limiter = cell[0][0]
        except IndexError:  # already taken (by this result, a copy of it, or another thread)
            return False
        if limiter is not self:
            raise InvalidArgument("result", f"was returned by limiter {limiter.name!r}, not {self.name!r}")
        try:
            _, key, cost, reply, t0, which, policy = cell.pop()  # once, whichever thread or copy comes first
        except IndexError:
            return False
        elapsed_us = (time.monotonic_ns() - t0) // 1000
        backend = _backend(resolve(self.client), which)
        try:
            return backend.refund(policy, key, cost, reply, elapsed_us)
        except backend.errors as exc:
            log.warning("rate limiting: refund on %s failed (%s); the units stay consumed", which,
                        type(exc).__name__)
            return False

    def _fallback(self, client: Client, plan: _Plan, key: str, cost: int, consume: bool, failed: str,
                  exc: BaseException, t0: int) -> RateLimitResult:
        """The documented policy when backend `failed` does not answer (never raises a backend error)."""
        s = client.settings
        for step in _FALLBACK[s.rate_limit_fallback]:
            if step in _VERDICTS:
                _outage_started(client, failed, step, exc)
                return self._verdict(plan, step, client)
            if step == failed or (step == "postgres" and not s.database_url):
                continue
            backend = _backend(client, step)
            try:
                reply = backend.acquire(plan.policy, key, cost, consume)
            except backend.errors as step_exc:
                exc, failed = step_exc, f"{failed}+{step}"
                continue
            _outage_started(client, failed, step, exc)
            result = self._result(plan, reply, step)
            if reply.allowed and consume:
                result._ticket = _Ticket(((self, key, cost, reply, t0, step, plan.policy),))
            return result
        raise AssertionError("every fallback ends with a verdict or the in-process backend")  # pragma: no cover

    def _result(self, plan: _Plan, reply: Reply, backend: str) -> RateLimitResult:
        allowed, refused, outcomes = reply
        if refused >= 0:
            binding = refused
            METRICS.inc("ratelimit_rejections_total", limiter=self.name, backend=backend)
        elif len(outcomes) > 1:
            binding = min(range(len(outcomes)), key=lambda i: outcomes[i].remaining)
        else:
            binding = 0
        return RateLimitResult(allowed, self.name, plan, outcomes, binding, backend)

    def _verdict(self, plan: _Plan, verdict: str, client: Client) -> RateLimitResult:
        """A result decided by policy, not by counting (switch off, fail open/closed).

        A refusal's ``retry_after`` is the client's ``breaker_reset_timeout``.
        """
        allowed = _VERDICTS[verdict]
        if allowed:
            outcomes = [Outcome(spec.limit, 0, 0) for spec in plan.specs]
        else:
            retry_us = round(client.settings.breaker_reset_timeout * 1e6)
            outcomes = [Outcome(0, retry_us, 0) for _ in plan.specs]
            METRICS.inc("ratelimit_rejections_total", limiter=self.name, backend=verdict)
        return RateLimitResult(allowed, self.name, plan, outcomes, 0, verdict)


# -- outages, logged once per outage of a client --------------------------------------
#: The client's singleton holding {backend or "a+b": in an outage}; built at the first outage.
MAX_LOG_COST = 10_000
"""The most units one sliding-window call may take: its log holds an entry per unit, written in one step
(10^7 units blocked Redis for 1.4 s; 10^15 froze it). The counting algorithms take any cost up to the limit."""


def _max_cost(algorithm: Algorithm, smallest_limit: int) -> int:
    return min(smallest_limit, MAX_LOG_COST) if algorithm is Algorithm.SLIDING_WINDOW else smallest_limit


def _too_costly(cost: int, smallest_limit: int) -> InvalidArgument:
    if cost > smallest_limit:
        return InvalidArgument("cost", f"{cost} exceeds the limit {smallest_limit}: it could never pass")
    return InvalidArgument("cost", f"{cost} is more than the {MAX_LOG_COST} units one sliding_window call may "
                           "take (its log keeps an entry per unit); use sliding_window_counter or gcra")


_OUTAGES = "ratelimit.outages"


def _outage_started(client: Client, backend: str, to: str, exc: BaseException) -> None:
    METRICS.inc("ratelimit_fallback_total", backend=backend, to=to)
    outages: Dict[str, bool] = client.singleton(_OUTAGES, dict)
    if not outages.get(backend):
        outages[backend] = True
        log.warning("rate limiting: %s unavailable (%s); applying fallback %r until it answers again",
                    backend, type(exc).__name__, to)


def _recovered(outages: Dict[str, bool], backend: str) -> None:
    """`backend` answers again: its outage and every combined one ("redis+postgres") are over."""
    for label in list(outages):
        if label == backend or "+" in label:
            outages[label] = False
    log.info("rate limiting: %s answers again; fallback over", backend)


# -- the decorator -------------------------------------------------------------------
KeyArg = Union[str, Callable[..., str]]
CostArg = Union[int, Callable[..., int]]


def rate_limited(
    name: str,
    limit: Optional[int] = None,
    window: Optional[float] = None,
    *,
    key: KeyArg = "agent_id",
    cost: CostArg = 1,
    algorithm: Union[Algorithm, str] = Algorithm.SLIDING_WINDOW,
    limits: Optional[Sequence[Union[Limit, Tuple[Any, ...]]]] = None,
    on_limited: Optional[Callable[..., Any]] = None,
    refund_on: Union[Type[BaseException], Tuple[Type[BaseException], ...]] = (),
    client: Optional[Client] = None,
) -> Callable[[F], F]:
    """Limit calls of the decorated function per key; over the limit raise `RateLimitExceeded`.

    `refund_on`: exception classes; an admitted call that raises one of them
    gives its units back (`RateLimiter.refund`) before the exception
    propagates, so only calls that succeed (or fail otherwise) count.

    `key`: a parameter name, or a callable taking the call's arguments.
    `cost`: an int or such a callable. `on_limited(error, *args, **kwargs)`:
    called instead of raising; its return value is returned. The function is
    not called when refused. ``wrapper.limiter`` is the `RateLimiter`.
    """
    limiter = RateLimiter(name, limit, window, algorithm=algorithm, limits=limits, client=client)
    if not callable(key) and not isinstance(key, str):
        raise InvalidArgumentType("key", f"must be a parameter name or a callable, not {type(key).__name__}")
    if not callable(cost):
        _check_int(cost, "cost")
    if on_limited is not None and not callable(on_limited):
        raise InvalidArgumentType("on_limited", "must be callable")
    refund_types = _check_refund_on(refund_on)

    def decorate(fn: F) -> F:
        if isinstance(fn, staticmethod):  # above @staticmethod: wrap its function, keep it static
            return staticmethod(decorate(fn.__func__))  # type: ignore[return-value]
        if isinstance(fn, classmethod):
            raise InvalidArgumentType("fn", "is a classmethod object: put @rate_limited below @classmethod")
        if is_generator_callable(fn):
            raise InvalidArgumentType(
                "fn", f"{getattr(fn, '__qualname__', fn)!r} is a generator function: a call would be counted "
                "when the generator is created, not when it runs; rate-limit the function that consumes it")
        key_of = _key_getter(fn, key)
        if is_async_callable(fn):
            return _async_wrapper(fn, limiter, key_of, cost, on_limited,  # type: ignore[return-value]
                                  refund_types)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            units = cost(*args, **kwargs) if callable(cost) else cost
            result = limiter.hit(key_of(args, kwargs), units)
            if not result.allowed:
                error = result.error()
                if on_limited is not None:
                    return on_limited(error, *args, **kwargs)
                raise error
            if not refund_types:
                return fn(*args, **kwargs)
            try:
                return fn(*args, **kwargs)
            except refund_types:
                limiter.refund(result)
                raise

        wrapper.limiter = limiter  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _async_wrapper(fn: Callable[..., Any], limiter: RateLimiter, key_of: Callable[[Tuple[Any, ...], Dict[str, Any]], str],
                   cost: CostArg, on_limited: Optional[Callable[..., Any]],
                   refund_types: Tuple[Type[BaseException], ...] = ()) -> Callable[..., Any]:
    """`rate_limited` on an ``async def``: counted when awaited, never when the coroutine is created.

    The hit runs in a worker thread (``asyncio.to_thread``) unless the
    in-process limiter answers it (local mode, no I/O), so a Redis or
    PostgreSQL round trip, retry or fallback never blocks the event loop.
    An async `on_limited` is awaited.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        units = cost(*args, **kwargs) if callable(cost) else cost
        rate_key = key_of(args, kwargs)
        remote = limiter._plan(resolve(limiter.client).settings).mode in (Mode.REDIS, Mode.POSTGRES)
        if remote:
            result = await asyncio.to_thread(limiter.hit, rate_key, units)
        else:
            result = limiter.hit(rate_key, units)
        if not result.allowed:
            error = result.error()
            if on_limited is not None:
                outcome = on_limited(error, *args, **kwargs)
                return await outcome if inspect.isawaitable(outcome) else outcome
            raise error
        try:
            return await fn(*args, **kwargs)
        except refund_types:
            if remote:
                await asyncio.to_thread(limiter.refund, result)
            else:
                limiter.refund(result)
            raise

    wrapper.limiter = limiter  # type: ignore[attr-defined]
    return wrapper


def _check_refund_on(refund_on: Any) -> Tuple[Type[BaseException], ...]:
    """`refund_on` as a tuple of exception classes (one class is accepted too)."""
    types = (refund_on,) if isinstance(refund_on, type) else refund_on
    if not isinstance(types, tuple) or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise InvalidArgumentType("refund_on", f"must be an exception class or a tuple of them, not {refund_on!r}")
    return types


def _key_getter(fn: Callable[..., Any], key: KeyArg) -> Callable[[Tuple[Any, ...], Dict[str, Any]], str]:
    """A fast (args, kwargs) -> key for `fn`, resolved once at decoration time."""
    if callable(key):
        key_fn = key

        def from_callable(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
            return validate_id(key_fn(*args, **kwargs), "key")

        return from_callable
    param_name = key
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: keyword only
        params = {}  # type: ignore[assignment]
    param = params.get(param_name)
    if param is None and not any(p.kind is p.VAR_KEYWORD for p in params.values()) and params:
        raise InvalidArgument("key", f"{getattr(fn, '__qualname__', fn)!r} has no parameter {param_name!r}")
    position: Optional[int] = None
    default: Any = inspect.Parameter.empty
    if param is not None:
        default = param.default
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            position = list(params).index(param_name)

    def from_parameter(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        if param_name in kwargs:
            value = kwargs[param_name]
        elif position is not None and position < len(args):
            value = args[position]
        elif default is not inspect.Parameter.empty:
            value = default
        else:
            raise InvalidArgument(param_name, "missing: it is the rate-limit key")
        return validate_id(value, param_name)

    return from_parameter

