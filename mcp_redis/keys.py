"""The one place that builds Redis keys.

Every key is ``<prefix><namespace>:<encoded id>[#<suffix>]``. Ids are
validated (a ``str`` of 1 to 1,024 characters) and encoded so that

* distinct ids never share a key (the encoding is injective);
* no id carries a glob character (``* ? [ ] \\``), a ``:`` or a ``{``/``}``
  into a key, so an id can neither widen a SCAN pattern nor leave its
  namespace nor hijack a cluster hash tag;
* every key starts with the configured prefix.

Ids made only of ``[A-Za-z0-9_.-]`` (the common case: UUIDs, slugs) are kept
as they are, so keys stay readable in ``redis-cli``. Anything else becomes
``~`` followed by unpadded URL-safe base64 of its UTF-8 bytes (surrogates
passed through); ``~`` never starts a plain id, so the two forms never meet.
"""

from __future__ import annotations

import base64
import re
from typing import Optional

from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType

__all__ = ["MAX_ID_LENGTH", "validate_id", "encode_id", "decode_id", "KeySpace"]

MAX_ID_LENGTH = 1024
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_.:\-/]{1,64}")
_NAMESPACE = re.compile(r"[a-z][a-z0-9_\-]{0,31}")


def validate_id(value: object, argument: str) -> str:
    """Return `value` if it is a valid identifier, else raise naming `argument`."""
    if not isinstance(value, str):
        raise InvalidArgumentType(
            argument, f"must be a str, not {type(value).__name__}"
        )
    if not value:
        raise InvalidArgument(argument, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            argument, f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
        )
    return value


def encode_id(value: str) -> str:
    """Encode a validated id into a key-safe, collision-free segment."""
    if _PLAIN.fullmatch(value):
        return value
    raw = value.encode("utf-8", "surrogatepass")
    return "~" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_id(segment: str) -> str:
    """Invert `encode_id` (used by tools that list keys)."""
    if not segment.startswith("~"):
        return segment
    body = segment[1:]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return raw.decode("utf-8", "surrogatepass")


def validate_prefix(prefix: object) -> str:
    """Check the key prefix: short, printable, no glob or hash-tag characters."""
    if not isinstance(prefix, str):
        raise ConfigurationError(
            f"key_prefix: must be a str, not {type(prefix).__name__}"
        )
    if not _PREFIX.fullmatch(prefix):
        raise ConfigurationError(
            "key_prefix: must be 1-64 characters of [A-Za-z0-9_.:-/], "
            f"got {prefix!r}"
        )
    return prefix


class KeySpace:
    """Builds the keys of one prefix. Cheap; build one per call if you like."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)

    def __repr__(self) -> str:
        return f"KeySpace(prefix={self.prefix!r})"

    def key(
        self,
        namespace: str,
        *ids: str,
        tag: bool = False,
        suffix: Optional[str] = None,
    ) -> str:
        """``<prefix><namespace>:<id>[:<id>...][#<suffix>]``.

        `ids` must already be validated. With ``tag=True`` the id part is
        wrapped in ``{}`` so that keys built with the same ids and different
        suffixes land in one Redis Cluster hash slot.
        """
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace: invalid {namespace!r}")
        body = ":".join(encode_id(i) for i in ids)
        if tag:
            body = "{" + body + "}"
        key = f"{self.prefix}{namespace}:{body}"
        if suffix is not None:
            if not _NAMESPACE.fullmatch(suffix):
                raise ValueError(f"suffix: invalid {suffix!r}")
            key += "#" + suffix
        return key

    def namespace_pattern(self, namespace: str) -> str:
        """A SCAN ``MATCH`` pattern for every key of `namespace` (nothing else)."""
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace: invalid {namespace!r}")
        return f"{self.prefix}{namespace}:*"

    def channel(self, name: str) -> str:
        """A pub/sub channel name under the prefix (channels share the prefix)."""
        return f"{self.prefix}{name}"
