"""The rate-limit algorithms: their names and the Python models of their Lua scripts.

Each algorithm is one Lua script (``mcp_redis/lua/ratelimit_<name>.lua``,
run by `mcp_redis.ratelimit.redis.RedisBackend`) and one Python model
below, which mirrors the script line for line; the in-process and
PostgreSQL backends run the models (`run_model`), so every backend answers
the same figures (``tests/ratelimit/test_ratelimit_properties.py`` compares
models and scripts). Times are integer microseconds.
"""

from __future__ import annotations

import bisect
import enum
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .base import Outcome, Reply, Spec

__all__ = ["Algorithm", "MODELS", "run_model", "refund_model"]


class Algorithm(str, enum.Enum):
    """The rate-limiting algorithms; all of them take the same arguments."""

    #: Exact: never more than `limit` in any span of `window` (a log of hits; O(limit) memory).
    SLIDING_WINDOW = "sliding_window"
    #: Approximate, O(1) memory: previous window weighted by overlap + current window.
    SLIDING_WINDOW_COUNTER = "sliding_window_counter"
    #: At most `limit` per window; a window starts at a key's first admitted hit.
    FIXED_WINDOW = "fixed_window"
    #: Token bucket of `limit` tokens refilled evenly over `window` (GCRA, exact refill).
    GCRA = "gcra"
    TOKEN_BUCKET = "gcra"  # noqa: S105 - an alias, not a secret

    @property
    def short(self) -> str:
        """The tag of this algorithm inside key names."""
        return _SHORT[self]


_SHORT = {
    Algorithm.SLIDING_WINDOW: "sl",  # a list of entries ("sw" held the former sorted set)
    # one integer ("swc" held the former text, "sc" a layout with no shared-integer case)
    Algorithm.SLIDING_WINDOW_COUNTER: "wc",
    Algorithm.FIXED_WINDOW: "fw",
    Algorithm.GCRA: "gc",  # an integer in 1/4 us ("gcra" held the former text)
}


# -- the Python models (mirror mcp_redis/lua/ratelimit_*.lua) --------------------
class _Model:
    """One algorithm over a JSON-able per-limit state.

    `check` looks (never mutates) and returns (view, remaining, retry_us,
    reset_us); `consume` turns the view into the new state and returns
    (state, remaining, reset_us, ttl_us).
    """

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        raise NotImplementedError

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        raise NotImplementedError


class _SlidingWindow(_Model):
    """A sorted list of the microsecond stamps of admitted units."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        log_: List[int] = state or []
        live = log_[bisect.bisect_right(log_, now - window):]
        count = len(live)
        reset = live[-1] + window - now if count else 0
        retry = live[count + cost - limit - 1] + window - now if count + cost > limit else 0
        return live, limit - count, retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        live: List[int] = view
        live.extend([now] * cost)
        return live, limit - len(live), window, window


class _FixedWindow(_Model):
    """``[start_us, count]``: a window opens at the first admitted hit."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        start, count = state if state else (now, 0)
        if now >= start + window:
            start, count = now, 0
        reset = start + window - now if count else 0
        retry = start + window - now if count + cost > limit else 0
        return [start, count], limit - count, retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        start, count = view
        left = start + window - now
        return [start, count + cost], limit - count - cost, left, left


class _SlidingWindowCounter(_Model):
    """``[window_index, current, previous]`` on windows aligned to the clock."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        idx = now // window
        w, c, p = state if state else (idx, 0, 0)
        if w == idx - 1:
            p, c = c, 0
        elif w != idx:
            p, c = 0, 0
        start = idx * window
        # In doubles, as Lua computes it (p times the time left can pass 2^53 at huge limits).
        est = float(p) * (start + window - now) / window + c
        reset = start + 2 * window - now if c else (start + window - now if p else 0)
        retry = 0
        if est + cost > limit:
            if p > 0 and c + cost <= limit:
                at = start + window * (1 - (limit - c - cost) / p)
            else:
                need = max(0.0, 1 - (limit - cost) / c) if c > 0 else 0.0
                at = start + window + window * need
            retry = max(1, math.ceil(at - now) + 1)
        return [idx, c, p], math.floor(limit - est), retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        idx, c, p = view
        start = idx * window
        est = float(p) * (start + window - now) / window + c + cost
        left = start + 2 * window - now
        return [idx, c + cost, p], math.floor(limit - est), left, left


class _GCRA(_Model):
    """``tat_us`` (float): the theoretical arrival time of the next unit."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        interval = window / limit
        eps = min(1.0, interval / 2)
        tat = max(float(state) if state is not None else now, now)
        new = tat + cost * interval
        retry = max(1, math.ceil(new - window - now)) if new - window > now + eps else 0
        return new, math.floor((now + window - tat + eps) / interval), retry, math.ceil(tat - now)

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        interval = window / limit
        eps = min(1.0, interval / 2)
        new = round(float(view) * 4) / 4  # stored in quarter microseconds, as the script does
        left = math.ceil(new - now)
        return new, math.floor((now + window - new + eps) / interval), left, left


MODELS: Dict[Algorithm, _Model] = {
    Algorithm.SLIDING_WINDOW: _SlidingWindow(),
    Algorithm.SLIDING_WINDOW_COUNTER: _SlidingWindowCounter(),
    Algorithm.FIXED_WINDOW: _FixedWindow(),
    Algorithm.GCRA: _GCRA(),
}


def run_model(
    algorithm: Algorithm, states: Sequence[Any], now: int, specs: Sequence[Spec], cost: int, consume: bool
) -> Tuple[Reply, Optional[List[Tuple[Any, int]]]]:
    """All limits at once, all or nothing: the reply and, when consumed, [(state, ttl_us)]."""
    model = MODELS[algorithm]
    views: List[Any] = []
    outcomes: List[Outcome] = []
    refused, worst = -1, -1
    for i, ((limit, window), state) in enumerate(zip(specs, states)):
        view, remaining, retry, reset = model.check(state, now, limit, window, cost)
        views.append(view)
        outcomes.append(Outcome(remaining, retry, reset))
        if retry > worst and retry > 0:
            worst, refused = retry, i
    if refused >= 0 or not consume:
        return Reply(refused < 0, refused, outcomes), None
    written: List[Tuple[Any, int]] = []
    for i, ((limit, window), view) in enumerate(zip(specs, views)):
        state, remaining, reset, ttl = model.consume(view, now, limit, window, cost)
        outcomes[i] = Outcome(remaining, 0, reset)
        written.append((state, max(1000, ttl)))
    return Reply(True, -1, outcomes), written


#: A refunded limit's new state: (state, ttl_us), ttl None = keep the expiry, state None = delete.
Refunded = Tuple[Any, Optional[int]]


def refund_model(
    algorithm: Algorithm, states: Sequence[Any], now: int, specs: Sequence[Spec], cost: int, hit_us: int,
    resets_us: Sequence[int],
) -> List[Optional[Refunded]]:
    """Give back what one admitted call took (mirrors ``ratelimit_<name>_refund.lua``); None: unchanged.

    `hit_us` is the hit's own clock reading (these backends know it
    exactly), `resets_us` the hit's ``reset_after`` per limit. Never gives
    back more than the call took, nor to a window that did not count it.
    """
    out: List[Optional[Refunded]] = []
    for (limit, window), state, reset in zip(specs, states, resets_us):
        new: Optional[Refunded] = None
        if state is None:
            pass
        elif algorithm is Algorithm.SLIDING_WINDOW:
            log_ = list(state)
            start = bisect.bisect_left(log_, hit_us)
            end = min(bisect.bisect_right(log_, hit_us), start + cost)
            if end > start:
                del log_[start:end]
                new = (log_, None)
        elif algorithm is Algorithm.FIXED_WINDOW:
            begin, count = state
            if begin <= hit_us < begin + window and now < begin + window and count > 0:
                new = ([begin, count - min(cost, count)], None)
        elif algorithm is Algorithm.SLIDING_WINDOW_COUNTER:
            idx = hit_us // window
            w, c, p = state
            if w == idx and c > 0:
                new = ([w, max(0, c - cost), p], None)
            elif w == idx + 1 and p > 0:
                new = ([w, c, max(0, p - cost)], None)
        else:  # GCRA
            interval = window / limit
            tat = float(state)
            tat_j = tat if tat < hit_us + reset + interval / 2 else hit_us + reset
            if tat >= tat_j - interval / 2:
                back = min(cost * interval, tat_j - now)
                if back > 0:
                    after = round((tat - back) * 4) / 4
                    new = (None, None) if after <= now else (after, max(1000, math.ceil(after - now)))
        out.append(new)
    return out
