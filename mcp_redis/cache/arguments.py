"""Arguments -> cache keys: validation, the argument id, the key names.

A call's arguments become one JSON array, its *argument id*: the L2 key
holds it (with the namespace and the generation), and the L1 key is the
bare string for a single ``str`` argument, else ``("j", argument id)``.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Hashable, Optional

from ..errors import InvalidArgument, InvalidArgumentType
from ..keys import KeySpace

__all__ = ["check_json_arg", "check_number", "dumps", "data_key", "l1_key_of", "is_id_param"]

NS = "cache"  # KeySpace namespace of every key the cache writes
_MAX_INT_BITS = 3321  # about 1,000 decimal digits (10**1000 needs 3,322 bits)


def check_json_arg(value: Any, name: str, depth: int = 0) -> None:
    """Arguments become keys through JSON: only types JSON keeps apart."""
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, int):
        # JSON writes ints as decimal text, which Python limits (4,300 digits by default).
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidArgument(name, "is too large an integer to form a cache key (about 1,000 digits at most)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(name, "must be a finite number")
        return
    if depth > 16:
        raise InvalidArgument(name, "is nested too deeply to be a cache key")
    if isinstance(value, (list, tuple)):
        for item in value:
            check_json_arg(item, name, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgumentType(name, f"dict keys must be str to form a cache key, not {type(k).__name__}")
            check_json_arg(v, name, depth + 1)
        return
    raise InvalidArgumentType(
        name, f"must be JSON-serialisable (str, int, float, bool, None, list, dict) to form a cache key, "
        f"not {type(value).__name__}"
    )


def check_number(name: str, value: Any, *, allow_none: bool = False, minimum: float = 0.0,
                 strict: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(name, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise InvalidArgument(name, f"must be {'>' if strict else '>='} {minimum}, got {value!r}")


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


@functools.lru_cache(maxsize=8192)
def data_key(prefix: str, namespace: str, gen: str, l2id: str, suffix: Optional[str]) -> str:
    """An entry's key (memoised: encoding the ids costs more than the GET's parsing)."""
    return KeySpace(prefix).key(NS, namespace, gen, l2id, tag=True, suffix=suffix)


def l1_key_of(l2id: str) -> Hashable:
    """The L1 key of an argument id: the bare str for one str argument."""
    values = json.loads(l2id)
    if len(values) == 1 and isinstance(values[0], str):
        return str(values[0])
    return ("j", l2id)


def is_id_param(name: str) -> bool:
    return name == "id" or name.endswith("_id")
