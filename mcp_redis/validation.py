"""Argument checks shared by every feature: durations and counts.

A duration must be a real number of seconds (``bool`` is refused), finite,
and at most `MAX_SECONDS` (ten years): larger values overflow Redis's integer
expiries and ``threading.Event.wait``. Errors name the argument and are
raised before anything is written.
"""

from __future__ import annotations

import math
from typing import Optional

from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["MAX_SECONDS", "seconds", "optional_seconds"]

MAX_SECONDS = 10 * 365 * 24 * 3600.0


def seconds(value: object, argument: str, *, allow_zero: bool = False, maximum: float = MAX_SECONDS) -> float:
    """`value` as float seconds: > 0 (>= 0 with `allow_zero`), finite, <= `maximum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(argument, f"must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgument(argument, f"must be finite, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(argument, f"must be {bound} seconds, got {value!r}")
    if number > maximum:
        raise InvalidArgument(argument, f"must be at most {maximum:g} seconds, got {value!r}")
    return number


def optional_seconds(value: object, argument: str, *, allow_zero: bool = False,
                     maximum: float = MAX_SECONDS) -> Optional[float]:
    """Like `seconds`, with None passed through (meaning "default" or "forever")."""
    if value is None:
        return None
    return seconds(value, argument, allow_zero=allow_zero, maximum=maximum)
