"""Argument checks and the JSON codec every events backend shares.

Events are JSON objects on the wire (pub/sub payloads and stream fields
alike): `encode_event` turns a dict into compact JSON or raises naming the
argument (and the offending *type*, never a value); `decode_event` turns a
payload back into a dict, or None when it is not a JSON object.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from ..errors import InvalidArgument, InvalidArgumentType
from ..keys import MAX_ID_LENGTH
from ..validation import check_json_depth, loads_bounded, too_deep
from .base import Event, EventHandler

__all__ = ["encode_event", "decode_event", "check_channel", "check_handler", "check_int"]


def check_channel(value: object, argument: str = "channel") -> str:
    """A channel name or pattern: a str of 1 to 1,024 characters."""
    if not isinstance(value, str):
        raise InvalidArgumentType(argument, f"must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidArgument(argument, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(argument, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


def check_handler(handler: object) -> EventHandler:
    if not callable(handler):
        raise InvalidArgumentType("handler", f"must be callable, not {type(handler).__name__}")
    return handler


def check_int(value: object, argument: str, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(argument, f"must be an int, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InvalidArgument(argument, f"must be {bound}, got {value}")
    return value


def encode_event(event: object, argument: str = "event") -> str:
    """`event` as compact JSON; raises naming `argument` unless a JSON-ready dict."""
    if not isinstance(event, dict):
        raise InvalidArgumentType(argument, f"must be a dict, not {type(event).__name__}")
    try:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except TypeError as exc:
        # The message names the offending type only, never a value.
        raise InvalidArgumentType(argument, f"is not JSON-serialisable ({_type_hint(exc)})") from None
    except ValueError:
        raise InvalidArgument(argument, "is not JSON-serialisable (NaN/Infinity or a circular reference)") from None
    except RecursionError:
        raise too_deep(argument) from None
    check_json_depth(event, text, argument)
    return text


def _type_hint(exc: TypeError) -> str:
    text = str(exc)
    return text.split(" is not JSON serializable")[0] if "JSON serializable" in text else "unsupported key or value"


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, but it decodes to Infinity
        raise ValueError("number out of range")
    return value


def decode_event(data: object) -> Optional[Event]:
    """The event dict in a payload (bytes: UTF-8), or None if it is not a strict JSON object.

    Lone surrogates (which `encode_event` lets through, as the client encodes
    them) decode back. Not UTF-8, NaN/Infinity (Python's json would take them, and a number
    out of a float's range, such as 1e999, would become one), nested deeper
    than Python's recursion limit, or anything but an object: None, for the
    caller to skip (or dead-letter).
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
    if not isinstance(data, str):
        return None
    try:
        value = loads_bounded(data, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
