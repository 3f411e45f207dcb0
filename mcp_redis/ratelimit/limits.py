"""The limits a `RateLimiter` holds, the per-settings plan built from them, and the results.

`Limit` (what users pass), `_Plan` (what a call needs, built once per
settings: the backend's `Policy` and the figures results are reported
against), `RateLimitResult` / `LimitStatus` (what a call returns) and
`ratelimit_headers` (the IETF response fields).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..config import Mode
from ..errors import InvalidArgument, InvalidArgumentType, RateLimitExceeded
from ..validation import seconds as check_seconds
from .base import Outcome, Policy, Spec

__all__ = ["Limit", "LimitStatus", "RateLimitResult", "ratelimit_headers"]

_MAX_WINDOW = 10 * 365 * 86400.0  # ten years; keeps microseconds well inside a double
#: The largest limit: every count and figure stays an exact integer in a double (Lua's numbers).
MAX_LIMIT = 10**15


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


class _Ticket(list):  # type: ignore[type-arg]
    """What `RateLimiter.refund` needs of an admitted hit: one item, taken once (``pop``, atomic).

    Copies of a result share it (``copy``/``deepcopy`` return it as is), so
    a hit is refunded at most once whichever copy is refunded.
    """

    __slots__ = ()

    def __copy__(self) -> _Ticket:
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> _Ticket:
        return self


class RateLimitResult:
    """The outcome of `hit`/`peek`: the verdict and the figures of the binding limit.

    With several limits, `limit`/`remaining`/`reset_after` describe the one
    that refused (or, when admitted, the one with the fewest units left);
    `statuses` holds every limit's figures. Truthy when allowed.
    """

    __slots__ = ("allowed", "limit", "remaining", "retry_after", "reset_after",
                 "name", "refused_by", "backend", "_plan", "_outcomes", "_ticket")

    def __init__(self, allowed: bool, name: str, plan: _Plan, outcomes: Sequence[Outcome],
                 binding: int, backend: str) -> None:
        remaining, retry, reset = outcomes[binding]
        self.allowed = allowed
        self.name = name
        self.limit = plan.specs[binding].limit
        self.remaining = remaining if remaining > 0 else 0
        self.retry_after = 0.0 if allowed else retry / 1e6
        self.reset_after = (reset if reset > retry or allowed else retry) / 1e6
        self.refused_by: Optional[str] = None if allowed else plan.labels[binding]
        self.backend = backend
        self._plan = plan
        self._outcomes = outcomes
        # What `RateLimiter.refund` needs of an admitted hit (set by the front), else None.
        self._ticket: Optional[_Ticket] = None

    @property
    def statuses(self) -> Tuple[LimitStatus, ...]:
        """Every limit's figures, in the order the limits were given."""
        plan = self._plan
        # Never below 0 (a limit lowered on a live key leaves more counted than it allows), and
        # every unit is back no sooner than the next one is (reset_after >= retry_after).
        return tuple(
            LimitStatus(label, spec.limit, window, remaining if remaining > 0 else 0, retry / 1e6,
                        (reset if reset > retry else retry) / 1e6)
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
def _check_int(value: Any, argument: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(argument, f"must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(argument, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(argument, f"must be <= {maximum:.0e}, got {value}")
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
        _check_int(item.limit, "limit", maximum=MAX_LIMIT)  # counts stay exact in Lua's doubles (2^53)
        if item.window is not None:
            _check_window(item.window, "window")
        if item.name is not None and (not isinstance(item.name, str) or not item.name):
            raise InvalidArgument(argument, f"a limit's name must be a non-empty str, got {item.name!r}")
        out.append(item)
    return tuple(out)


class _Plan(NamedTuple):
    """Everything a call needs that depends only on the settings in force."""

    policy: Policy  # what the backend is asked
    specs: Tuple[Spec, ...]
    windows: Tuple[float, ...]
    labels: Tuple[str, ...]
    max_cost: int
    mode: Mode
    backend: Optional[str]  # the front's _BY_MODE[mode]: the backend's name, None when switched off
    singleton_key: str  # that backend's key among the client's singletons
