"""Session records: the small JSON record a binding carries beside its agent id.

A record is what the legacy ``_session_identities`` dict held per session:
``bound_agent_id`` (the agent), library-kept ``bound_at``, ``bind_count`` and
``last_active`` (whole epoch seconds), and caller fields such as
``client_type`` or ``client_info`` (any JSON values). Caller fields are
checked here, before anything is written:

* a name is 1-64 characters of ``[A-Za-z0-9_.-]`` starting with a letter or
  ``_``, and not one of the library-kept names;
* a name that looks like a secret (``api_key``, ``token``, ``password``,
  ``secret``, ``credential``, ``private_key``, ``session_token``, ... in any case,
  with or without ``_``/``-``/``.``, at any depth of a nested value) is
  refused: the record is readable by every process with Redis access and is
  not where credentials belong (docs/security.md);
* the packed fields are at most `MAX_FIELDS_BYTES` (4 KiB) of UTF-8.

Every refusal is an `InvalidArgument` naming the field; nothing is written.

In Redis the record is packed into the binding's own string value (no
second key: see `mcp_redis.sessions.redis`)::

    <agent id> US <bound_at> US <bind_count> US <last_active - bound_at> US <fields>

(US = ``\\x1f``; the three numbers in lower-case hex, which keeps the value
of a UUID agent without fields in jemalloc's 56-byte class); ``<fields>`` is ``name RS json RS name RS json ...``
(RS = ``\\x1e``), each value JSON-encoded on its own so a Lua script can merge
fields by name without decoding values. JSON escapes every control
character, so neither separator occurs inside a value; the agent id may hold
them (the tail is split from the right). A value written by an older version
(the bare agent id) reads as a record without fields.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from ..errors import InvalidArgument, InvalidArgumentType
from ..validation import check_json_depth, too_deep

__all__ = ["RecordData", "LIBRARY_FIELDS", "MAX_FIELDS_BYTES", "check_fields", "pack", "unpack",
           "unpack_fields", "pack_fields", "agent_of", "as_dict", "is_secret_name"]

MAX_FIELDS_BYTES = 4096
US = "\x1f"
RS = "\x1e"
AGENT_FIELD = "bound_agent_id"
LIBRARY_FIELDS = frozenset({AGENT_FIELD, "bound_at", "bind_count", "last_active"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
# Substrings of a normalised name (lower case, separators dropped) that mark a secret.
_SECRET_PARTS = ("apikey", "token", "password", "passwd", "passphrase", "secret", "credential",
                 "privatekey", "accesskey", "authorization", "cookie", "bearer")


class RecordData(NamedTuple):
    """A binding's record apart from its agent id: times in whole epoch seconds, fields packed."""

    bound_at: int
    bind_count: int
    last_active: int
    fields: str  # pack_fields() form; "" when the caller gave none


def is_secret_name(name: str) -> bool:
    """Whether a field name looks like it holds a credential."""
    flat = re.sub(r"[_\-.\s]", "", name.lower())
    return any(part in flat for part in _SECRET_PARTS)


def _check_nested(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if isinstance(key, str) and is_secret_name(key):
                raise InvalidArgument(path, f"holds {key!r}, which looks like a secret: secrets never go "
                                            "into a session record (see docs/security.md)")
            _check_nested(inner, path)
    elif isinstance(value, (list, tuple)):
        for inner in value:
            _check_nested(inner, path)


def _has_nul(value: Any) -> bool:
    """True if a NUL is in any string (value or key) of a JSON value."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(v) for v in value)
    return False


def check_fields(fields: Mapping[str, Any]) -> Dict[str, str]:
    """Validate caller fields; returns {name: JSON text}. Raises `InvalidArgument` naming the field."""
    encoded: Dict[str, str] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgument(str(name)[:80], "a record field name is 1-64 characters of [A-Za-z0-9_.-], "
                                                  "starting with a letter or '_'")
        if name in LIBRARY_FIELDS:
            raise InvalidArgument(name, "is kept by the library; it cannot be set by the caller")
        if is_secret_name(name):
            raise InvalidArgument(name, "looks like a secret: secrets never go into a session record "
                                        "(see docs/security.md)")
        try:
            _check_nested(value, name)
            # Every mode keeps what PostgreSQL's JSONB can: no NUL, no lone surrogate
            # (so turning DATABASE_URL on never breaks a caller that worked before).
            nul = _has_nul(value)
        except RecursionError:
            raise too_deep(name) from None
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentType(name, f"must be a JSON value ({exc})") from None
        except RecursionError:
            raise too_deep(name) from None
        check_json_depth(value, text, name)
        if nul:
            raise InvalidArgument(name, "must not contain NUL (\\u0000): PostgreSQL's JSONB cannot hold it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(name, "must be valid Unicode text (no lone surrogate)") from None
        encoded[name] = text
    return encoded


def pack_fields(encoded: Mapping[str, str]) -> str:
    """{name: JSON text} as the packed form; raises when over `MAX_FIELDS_BYTES`."""
    packed = RS.join(f"{k}{RS}{v}" for k, v in encoded.items())
    size = len(packed.encode("utf-8", "surrogatepass"))
    if size > MAX_FIELDS_BYTES:
        raise InvalidArgument(max(encoded, key=lambda k: len(encoded[k])),
                              f"the record's fields are {size} bytes packed, at most {MAX_FIELDS_BYTES} "
                              "(keep large data elsewhere and store a reference)")
    return packed


def unpack_fields(packed: str) -> Dict[str, Any]:
    if not packed:
        return {}
    parts = packed.split(RS)
    return {parts[i]: json.loads(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}


def fields_json(packed: str) -> Dict[str, str]:
    """The packed fields as {name: JSON text} (no decoding of the values)."""
    if not packed:
        return {}
    parts = packed.split(RS)
    return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}


def pack(agent_id: str, data: RecordData) -> str:
    """The binding's Redis value."""
    return (f"{agent_id}{US}{data.bound_at:x}{US}{data.bind_count:x}{US}"
            f"{max(0, data.last_active - data.bound_at):x}{US}{data.fields}")


def unpack(value: str) -> Tuple[str, Optional[RecordData]]:
    """(agent id, record) from a binding's Redis value; record None for a bare agent id."""
    parts = value.rsplit(US, 4)
    if len(parts) == 5:
        try:
            bound = int(parts[1], 16)
            return parts[0], RecordData(bound, int(parts[2], 16), bound + int(parts[3], 16), parts[4])
        except ValueError:
            pass
    return value, None


def agent_of(value: Optional[str]) -> Optional[str]:
    """The agent id of a binding's Redis value (the hot path: one rsplit)."""
    if value is None:
        return None
    return value.rsplit(US, 4)[0] if value.count(US) >= 4 else value


def as_dict(agent_id: str, data: Optional[RecordData]) -> Dict[str, Any]:
    """The record as the legacy dict: ``bound_agent_id``, the library's fields, the caller's."""
    if data is None:
        return {AGENT_FIELD: agent_id, "bound_at": None, "bind_count": None, "last_active": None}
    out: Dict[str, Any] = unpack_fields(data.fields)
    out.update({AGENT_FIELD: agent_id, "bound_at": data.bound_at, "bind_count": data.bind_count,
                "last_active": data.last_active})
    return out


def to_json(data: RecordData) -> Dict[str, Any]:
    """The record as stored in a PostgreSQL JSONB column."""
    return {"bound_at": data.bound_at, "bind_count": data.bind_count, "last_active": data.last_active,
            "fields": unpack_fields(data.fields)}


def from_json(doc: Optional[Mapping[str, Any]], fallback_s: int) -> RecordData:
    """A JSONB record (None / {} for rows written before records) as `RecordData`."""
    doc = doc or {}
    bound = int(doc.get("bound_at") or fallback_s)
    fields = doc.get("fields") or {}
    packed = RS.join(f"{k}{RS}{json.dumps(v, ensure_ascii=False, separators=(',', ':'))}" for k, v in fields.items())
    return RecordData(bound, int(doc.get("bind_count") or 1), int(doc.get("last_active") or bound), packed)
