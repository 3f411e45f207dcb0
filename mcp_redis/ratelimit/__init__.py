"""Rate limiting: `RateLimiter` and `@rate_limited`, on Redis, PostgreSQL or in-process.

    limiter = RateLimiter("kg_store", limits=[(20, 3600), (5, 60)])
    result = limiter.hit(agent_id)          # one round trip, all or nothing
    if not result.allowed: ... result.retry_after, result.headers()

    @rate_limited("kg_store", limit=20, window=3600, key="agent_id")
    def store_knowledge(agent_id, payload): ...

The backend is chosen per call by ``client.mode("rate_limits")`` (the
limiter's client, else the default one); when it is unreachable, the
client's ``rate_limit_fallback`` setting decides (default: the
in-process limiter, logged once per outage and counted). Algorithms and
storages live in `mcp_redis.ratelimit_storage`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import redis.exceptions

from .client import Client, resolve
from .config import Mode, RateLimitFallback, Settings, on_reset
from .connections import on_fork
from .errors import BackendUnavailable, InvalidArgument, InvalidArgumentType, RateLimitExceeded
from .keys import KeySpace, validate_id
from .metrics import METRICS
from .postgres import pg_error
from .ratelimit_storage import Algorithm, PostgresStorage, RedisStorage, Reply, local_storage
from .validation import seconds as check_seconds

__all__ = [
    "Algorithm",
    "Limit",
    "LimitStatus",
    "RateLimitResult",
    "RateLimiter",
    "rate_limited",
    "ratelimit_headers",
]

log = logging.getLogger("mcp_redis.ratelimit")
F = TypeVar("F", bound=Callable[..., Any])
NAMESPACE = "ratelimit"
_MAX_WINDOW = 10 * 365 * 86400.0  # ten years; keeps microseconds well inside a double


class Limit(NamedTuple):
    """`limit` units per `window` seconds (None: ``REDIS_RATE_LIMIT_WINDOW`` at call time)."""

    limit: int
    window: float | None = None  # PEP 604 spelling: the API reference (pdoc) resolves it without imports
    name: str | None = None

    def label(self, window: float) -> str:
        """The policy name shown in headers and errors: `name`, else ``"<limit>/<window>s"``."""
        return self.name if self.name is not None else f"{self.limit}/{window:g}s"


class LimitStatus(NamedTuple):
    """One limit's figures after a call (seconds as floats)."""

    name: str
    limit: int
    window: float
    remaining: int
    retry_after: float
    reset_after: float


class RateLimitResult:
    """The outcome of `hit`/`peek`: the verdict and the figures of the binding limit.

    With several limits, `limit`/`remaining`/`reset_after` describe the one
    that refused (or, when admitted, the one with the fewest units left);
    `statuses` holds every limit's figures. Truthy when allowed.
    """

    __slots__ = ("allowed", "limit", "remaining", "retry_after", "reset_after",
                 "name", "refused_by", "backend", "_plan", "_outcomes")

    def __init__(self, allowed: bool, name: str, plan: _Plan, outcomes: Sequence[Tuple[int, int, int]],
                 binding: int, backend: str) -> None:
        remaining, retry, reset = outcomes[binding]
        self.allowed = allowed
        self.name = name
        self.limit = plan.specs[binding][0]
        self.remaining = remaining if remaining > 0 else 0
        self.retry_after = 0.0 if allowed else retry / 1e6
        self.reset_after = reset / 1e6
        self.refused_by: Optional[str] = None if allowed else plan.labels[binding]
        self.backend = backend
        self._plan = plan
        self._outcomes = outcomes

    @property
    def statuses(self) -> Tuple[LimitStatus, ...]:
        """Every limit's figures, in the order the limits were given."""
        plan = self._plan
        return tuple(
            LimitStatus(label, spec[0], window, remaining, retry / 1e6, reset / 1e6)
            for label, spec, window, (remaining, retry, reset) in zip(plan.labels, plan.specs, plan.windows,
                                                                       self._outcomes)
        )

    def __bool__(self) -> bool:
        return self.allowed

    def __repr__(self) -> str:
        return (f"RateLimitResult(allowed={self.allowed}, name={self.name!r}, limit={self.limit}, "
                f"remaining={self.remaining}, retry_after={self.retry_after:.6f}, "
                f"reset_after={self.reset_after:.6f}, refused_by={self.refused_by!r}, backend={self.backend!r})")

    def error(self) -> RateLimitExceeded:
        """The `RateLimitExceeded` describing this (refused) result; ``.result`` is attached."""
        exc = RateLimitExceeded(self.name, self.limit, self.remaining, self.retry_after, self.reset_after,
                                refused_by=self.refused_by)
        exc.result = self  # type: ignore[attr-defined]
        return exc

    def headers(self) -> Dict[str, str]:
        """The IETF ``RateLimit-Policy`` / ``RateLimit`` fields, and ``Retry-After`` when refused."""
        return ratelimit_headers(self)


def ratelimit_headers(result: RateLimitResult) -> Dict[str, str]:
    """HTTP response fields per draft-ietf-httpapi-ratelimit-headers (-10).

    ``RateLimit-Policy: "p";q=<limit>;w=<window s>`` and
    ``RateLimit: "p";r=<remaining>;t=<s until reset>`` list every limit
    (binding one first); ``Retry-After`` (whole seconds, rounded up, never
    earlier than the binding ``t``) is present only when refused.
    """
    statuses = result.statuses
    order = sorted(range(len(statuses)),
                   key=lambda i: (statuses[i].name != (result.refused_by or ""), statuses[i].remaining))
    policies: List[str] = []
    states: List[str] = []
    for i in order:
        st = statuses[i]
        label = _sf_string(st.name)
        policies.append(f"{label};q={st.limit};w={max(1, math.ceil(st.window))}")
        states.append(f"{label};r={max(0, st.remaining)};t={max(0, math.ceil(st.reset_after))}")
    out = {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
    if not result.allowed:
        out["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
    return out


def _sf_string(text: str) -> str:
    """A structured-field string: printable ASCII, quotes and backslashes escaped."""
    safe = "".join(c if " " <= c <= "~" else "_" for c in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- limits and their per-settings plan ------------------------------------------
def _check_int(value: Any, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(argument, f"must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(argument, f"must be >= {minimum}, got {value}")
    return value


def _check_window(value: Any, argument: str) -> float:
    return check_seconds(value, argument, minimum=0.001, maximum=_MAX_WINDOW)


def _coerce_limits(limit: Any, window: Any, limits: Any) -> Tuple[Limit, ...]:
    if limits is None:
        if limit is None:
            raise InvalidArgument("limit", "is required (or pass limits=[(limit, window), ...])")
        specs: Iterable[Any] = [Limit(limit, window)]
        argument = "limit"
    else:
        if limit is not None or window is not None:
            raise InvalidArgument("limits", "pass either limit/window or limits, not both")
        if isinstance(limits, (str, bytes)) or not isinstance(limits, Iterable):
            raise InvalidArgumentType("limits", f"must be a sequence of Limit or (limit, window), not {type(limits).__name__}")
        specs = list(limits)
        if not specs:
            raise InvalidArgument("limits", "must not be empty")
        argument = "limits"
    out: List[Limit] = []
    for item in specs:
        if not isinstance(item, Limit):
            if not isinstance(item, tuple) or not 1 <= len(item) <= 3:
                raise InvalidArgumentType(argument, f"items must be Limit or (limit, window[, name]), not {item!r}")
            item = Limit(*item)
        _check_int(item.limit, "limit")
        if item.window is not None:
            _check_window(item.window, "window")
        if item.name is not None and (not isinstance(item.name, str) or not item.name):
            raise InvalidArgument(argument, f"a limit's name must be a non-empty str, got {item.name!r}")
        out.append(item)
    return tuple(out)


class _Plan(NamedTuple):
    """Everything a call needs that depends only on the settings in force."""

    keyspace: KeySpace
    limits: Tuple[Limit, ...]
    windows: Tuple[float, ...]
    specs: Tuple[Tuple[int, int], ...]  # (limit, window_us)
    flat: Tuple[str, ...]  # limit_1, window_us_1, ... pre-formatted for the wire
    suffixes: Tuple[str, ...]
    labels: Tuple[str, ...]
    max_cost: int
    mode: Mode
    redis_keys: Dict[str, List[str]]  # key -> its Redis keys (bounded memo)

    def keys_for(self, name: str, key: str) -> List[str]:
        """The Redis keys of `key`'s limits (one hash slot: the ids form the tag)."""
        keys = self.redis_keys.get(key)
        if keys is None:
            if len(self.redis_keys) >= 4096:
                self.redis_keys.clear()
            keys = [self.keyspace.key(NAMESPACE, name, key, tag=True, suffix=x) for x in self.suffixes]
            self.redis_keys[key] = keys
        return keys


# -- the limiter --------------------------------------------------------------------
class RateLimiter:
    """`limit` calls per `window` seconds per key — or several limits at once, all or nothing.

    ``RateLimiter("kg_store", 20, 3600)`` or
    ``RateLimiter("kg_store", limits=[(20, 3600), Limit(5, 60, "burst")])``.
    `window` None means ``REDIS_RATE_LIMIT_WINDOW`` at call time. Thread-safe;
    cheap to create; holds no connection (it uses the process-wide clients).
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

    def reset(self, key: str) -> None:
        """Forget every limit's state for `key` (in the backend in force)."""
        key = validate_id(key, "key")
        client = resolve(self.client)
        plan = self._plan(client.settings)
        mode = plan.mode
        if mode is Mode.REDIS:
            _redis_storage(client).clear(plan.keys_for(self.name, key))
        elif mode is Mode.POSTGRES:
            _pg_storage(client).clear(self.algorithm, self.name, key, plan.specs)
        local_storage(client).clear(self.algorithm, self.name, key, plan.specs)

    # -- internals -------------------------------------------------------------------
    def _plan(self, s: Settings) -> _Plan:
        cached = self._plan_cache
        if cached is not None and cached[0] is s:
            return cached[1]
        windows = tuple(float(lim.window) if lim.window is not None else float(s.rate_limit_window)
                        for lim in self.limits)
        specs = tuple((lim.limit, max(1, round(w * 1_000_000))) for lim, w in zip(self.limits, windows))
        if len({w for _, w in specs}) != len(specs):
            raise InvalidArgument("limits", "two limits share one window; keep the stricter one")
        short = self.algorithm.short
        plan = _Plan(
            keyspace=KeySpace(s.key_prefix),
            limits=self.limits,
            windows=windows,
            specs=specs,
            flat=tuple(str(x) for spec in specs for x in spec),
            suffixes=tuple(f"{short}_{w}" for _, w in specs),
            labels=tuple(lim.label(w) for lim, w in zip(self.limits, windows)),
            max_cost=min(lim.limit for lim in self.limits),
            mode=s.mode("rate_limits"),
            redis_keys={},
        )
        self._plan_cache = (s, plan)
        return plan

    def _run(self, key: str, cost: int, consume: bool) -> RateLimitResult:
        key = validate_id(key, "key")
        cost = _check_int(cost, "cost")
        client = resolve(self.client)
        s = client.settings
        plan = self._plan(s)
        if cost > plan.max_cost:
            raise InvalidArgument("cost", f"{cost} exceeds the limit {plan.max_cost}: it could never pass")
        mode = plan.mode
        if mode is Mode.REDIS:
            try:
                reply = _redis_storage(client).acquire(self.algorithm, plan.keys_for(self.name, key), plan.flat, cost,
                                                 consume)
            except (BackendUnavailable, redis.exceptions.RedisError) as exc:
                return self._fallback(client, plan, key, cost, consume, "redis", exc)
            if _outage["redis"]:
                _recovered("redis")
            return self._result(plan, reply, "redis")
        if mode is Mode.LOCAL:
            reply = local_storage(client).acquire(self.algorithm, self.name, key, plan.specs, cost, consume)
            return self._result(plan, reply, "local")
        if mode is Mode.POSTGRES:
            try:
                reply = _pg_storage(client).acquire(self.algorithm, self.name, key, plan.specs, cost, consume)
            except (BackendUnavailable, pg_error()) as exc:
                return self._fallback(client, plan, key, cost, consume, "postgres", exc)
            if _outage["postgres"]:
                _recovered("postgres")
            return self._result(plan, reply, "postgres")
        return self._verdict(plan, True, "off")

    def _fallback(self, client: Client, plan: _Plan, key: str, cost: int, consume: bool, backend: str,
                  exc: BaseException) -> RateLimitResult:
        """The documented policy when `backend` does not answer (never raises a backend error)."""
        s = client.settings
        policy = s.rate_limit_fallback
        if policy is RateLimitFallback.POSTGRES and backend == "redis" and s.database_url:
            try:
                reply = _pg_storage(client).acquire(self.algorithm, self.name, key, plan.specs, cost, consume)
            except (BackendUnavailable, pg_error()) as pg_exc:
                exc, backend = pg_exc, "redis+postgres"
            else:
                _outage_started(backend, "postgres", exc)
                return self._result(plan, reply, "postgres")
        if policy is RateLimitFallback.OPEN:
            _outage_started(backend, "open", exc)
            return self._verdict(plan, True, "open")
        if policy is RateLimitFallback.CLOSED:
            _outage_started(backend, "closed", exc)
            return self._verdict(plan, False, "closed", retry_after=s.breaker_reset_timeout)
        _outage_started(backend, "local", exc)
        reply = local_storage(client).acquire(self.algorithm, self.name, key, plan.specs, cost, consume)
        return self._result(plan, reply, "local")

    def _result(self, plan: _Plan, reply: Reply, backend: str) -> RateLimitResult:
        allowed, refused, outcomes = reply
        if refused >= 0:
            binding = refused
            METRICS.inc("ratelimit_rejections_total", limiter=self.name, backend=backend)
        elif len(outcomes) > 1:
            binding = min(range(len(outcomes)), key=lambda i: outcomes[i][0])
        else:
            binding = 0
        return RateLimitResult(allowed, self.name, plan, outcomes, binding, backend)

    def _verdict(self, plan: _Plan, allowed: bool, backend: str, retry_after: float = 0.0) -> RateLimitResult:
        """A result decided by policy, not by counting (switch off, fail open/closed)."""
        retry_us = round(retry_after * 1e6)
        outcomes = [(spec[0], 0, 0) if allowed else (0, retry_us, 0) for spec in plan.specs]
        if not allowed:
            METRICS.inc("ratelimit_rejections_total", limiter=self.name, backend=backend)
        return RateLimitResult(allowed, self.name, plan, outcomes, 0, backend)


# -- per-client storages and process-wide outage bookkeeping ----------------------------
_outage: Dict[str, bool] = {"redis": False, "postgres": False, "redis+postgres": False}


def _redis_storage(client: Optional[Client] = None) -> RedisStorage:
    """The client's storage over its rate-limit deployment (scripts registered once)."""
    c = resolve(client)
    return c.singleton(_REDIS_STORAGE, lambda: RedisStorage(c.redis("rate_limits")))


def _pg_storage(client: Optional[Client] = None) -> PostgresStorage:
    """The client's storage over its PostgreSQL table."""
    c = resolve(client)
    return c.singleton(_PG_STORAGE, lambda: PostgresStorage(c.postgres()))


_REDIS_STORAGE = "ratelimit.redis_storage"
_PG_STORAGE = "ratelimit.postgres_storage"


def _outage_started(backend: str, to: str, exc: BaseException) -> None:
    METRICS.inc("ratelimit_fallback_total", backend=backend, to=to)
    if not _outage.get(backend):
        _outage[backend] = True
        log.warning("rate limiting: %s unavailable (%s); applying fallback %r until it answers again",
                    backend, type(exc).__name__, to)


def _recovered(backend: str) -> None:
    _outage[backend] = False
    _outage["redis+postgres"] = False
    log.info("rate limiting: %s answers again; fallback over", backend)


@on_reset
@on_fork
def _forget() -> None:
    """A new configuration (or a forked child) starts with no outage logged."""
    for k in _outage:
        _outage[k] = False


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
    client: Optional[Client] = None,
) -> Callable[[F], F]:
    """Limit calls of the decorated function per key; over the limit raise `RateLimitExceeded`.

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

    def decorate(fn: F) -> F:
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise InvalidArgumentType(
                "fn", f"{getattr(fn, '__qualname__', fn)!r} is a generator function: a call would be counted "
                "when the generator is created, not when it runs; rate-limit the function that consumes it")
        key_of = _key_getter(fn, key)
        if inspect.iscoroutinefunction(fn):
            return _async_wrapper(fn, limiter, key_of, cost, on_limited)  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            units = cost(*args, **kwargs) if callable(cost) else cost
            result = limiter.hit(key_of(args, kwargs), units)
            if not result.allowed:
                error = result.error()
                if on_limited is not None:
                    return on_limited(error, *args, **kwargs)
                raise error
            return fn(*args, **kwargs)

        wrapper.limiter = limiter  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _async_wrapper(fn: Callable[..., Any], limiter: RateLimiter, key_of: Callable[[Tuple[Any, ...], Dict[str, Any]], str],
                   cost: CostArg, on_limited: Optional[Callable[..., Any]]) -> Callable[..., Any]:
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
        if limiter._plan(resolve(limiter.client).settings).mode in (Mode.REDIS, Mode.POSTGRES):
            result = await asyncio.to_thread(limiter.hit, rate_key, units)
        else:
            result = limiter.hit(rate_key, units)
        if not result.allowed:
            error = result.error()
            if on_limited is not None:
                outcome = on_limited(error, *args, **kwargs)
                return await outcome if inspect.isawaitable(outcome) else outcome
            raise error
        return await fn(*args, **kwargs)

    wrapper.limiter = limiter  # type: ignore[attr-defined]
    return wrapper


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

