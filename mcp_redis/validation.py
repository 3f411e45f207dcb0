"""Argument checks shared by every feature: durations, counts and what a decorated callable is.

A duration must be a real number of seconds (``bool`` is refused), finite,
and at most a bound that every use of it can honour: `MAX_SECONDS` (ten
years) for TTLs, leases and windows, since larger values overflow Redis's
integer expiries and ``threading.Event.wait``; `MAX_NETWORK_SECONDS` (one hour)
for socket, connect and pool waits, retry backoffs and the breaker's reset
(``socket.settimeout`` overflows far below ten years, and every call may wait
that long); `MAX_STATEMENT_SECONDS` for PostgreSQL's per-call bound
(``statement_timeout`` and libpq's ``tcp_user_timeout`` are int32
milliseconds). Every duration setting and argument of the library goes
through `seconds`. Errors name the argument and are raised before anything
is written.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from typing import Any, Iterable, Optional

from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["MAX_SECONDS", "MAX_NETWORK_SECONDS", "MAX_STATEMENT_SECONDS", "MAX_JSON_DEPTH", "seconds",
           "optional_seconds", "check_json_depth", "loads_bounded", "too_deep", "is_async_callable", "is_generator_callable"]

MAX_SECONDS = 10 * 365 * 24 * 3600.0
MAX_NETWORK_SECONDS = 3600.0
MAX_STATEMENT_SECONDS = float((2**31 - 1) // 1000)  # int32 ms in whole seconds: 2,147,483 s (~24.8 days)
# JSON values the library stores or sends (events, session fields, cached values) nest at most
# this deep: Python's json recurses, and a value the caller's thread could encode near the
# recursion limit would fail to decode in the library's own, deeper threads (a listener, a
# stream consumer) and be dropped there. Far below the limit, so any thread decodes it.
MAX_JSON_DEPTH = 256


def seconds(value: object, argument: str, *, allow_zero: bool = False, maximum: float = MAX_SECONDS,
            minimum: float = 0.0) -> float:
    """`value` as float seconds: > 0 (>= 0 with `allow_zero`), >= `minimum`, finite, <= `maximum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(argument, f"must be a number of seconds, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        raise InvalidArgument(argument, f"must be at most {maximum:,.0f} seconds, got an int beyond any float") from None
    if not math.isfinite(number):
        raise InvalidArgument(argument, f"must be finite, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(argument, f"must be {bound} seconds, got {value!r}")
    if number < minimum:
        raise InvalidArgument(argument, f"must be at least {minimum:g} seconds, got {value!r}")
    if number > maximum:
        raise InvalidArgument(argument, f"must be at most {maximum:,.0f} seconds, got {value!r}")
    return number


def optional_seconds(value: object, argument: str, *, allow_zero: bool = False,
                     maximum: float = MAX_SECONDS, minimum: float = 0.0) -> Optional[float]:
    """Like `seconds`, with None passed through (meaning "default" or "forever")."""
    if value is None:
        return None
    return seconds(value, argument, allow_zero=allow_zero, maximum=maximum, minimum=minimum)


def too_deep(argument: str) -> InvalidArgument:
    return InvalidArgument(argument, f"is nested deeper than {MAX_JSON_DEPTH} levels (JSON)")


def check_json_depth(value: object, text: str, argument: str) -> None:
    """Refuse `value` (`text`: its JSON) when nested deeper than `MAX_JSON_DEPTH`."""
    if _deeper_than(MAX_JSON_DEPTH, value, text):
        raise too_deep(argument)


def _deeper_than(bound: int, value: object, text: Any) -> bool:
    """True when `value` (`text`: its JSON, str or bytes) nests deeper than `bound` levels.

    Free for the usual value (fewer brackets in its JSON than the bound);
    otherwise one walk of the value, without recursion.
    """
    open_list, open_object = (b"[", b"{") if isinstance(text, (bytes, bytearray)) else ("[", "{")
    if text.count(open_list) + text.count(open_object) <= bound:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            inner: Iterable[object] = item.values()
        elif isinstance(item, (list, tuple)):
            inner = item
        else:
            continue
        if depth > bound:
            return True
        stack.extend((child, depth + 1) for child in inner)
    return False


def loads_bounded(text: Any, wrapped: int = 0, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)`` of a value read back from Redis, which the library wrote nested
    at most `MAX_JSON_DEPTH` levels (plus `wrapped`, the levels of its own envelope around it): a
    deeper one (a foreign writer's) is a ValueError, whether or not this Python's json can decode it
    (3.13's goes far deeper than earlier ones, which raise RecursionError), so what a caller gets
    does not depend on the Python version."""
    bound = MAX_JSON_DEPTH + wrapped
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {bound} levels") from None
    if _deeper_than(bound, value, text):
        raise ValueError(f"JSON nested deeper than {bound} levels")
    return value


def _call_target(fn: Any) -> Any:
    """What calling `fn` runs: a partial's function, a callable object's ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isroutine(fn) or isinstance(fn, type):
        return fn
    return getattr(type(fn), "__call__", fn)  # noqa: B004  (the method itself, not a callability test)


def is_async_callable(fn: Any) -> bool:
    """Calling `fn` returns a coroutine: an ``async def``, or a partial of one or an object whose
    ``__call__`` is one (the decorators must await those too, not count or cache the coroutine)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(_call_target(fn))


def is_generator_callable(fn: Any) -> bool:
    """Calling `fn` returns a generator or an async generator (the same ways as `is_async_callable`)."""
    target = _call_target(fn)
    return any(check(x) for x in (fn, target) for check in (inspect.isgeneratorfunction, inspect.isasyncgenfunction))
