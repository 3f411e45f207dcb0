"""Key building: injective, glob-free, prefix-bound, hash-tag aware."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_redis.errors import InvalidArgument, InvalidArgumentType
from mcp_redis.keys import MAX_ID_LENGTH, KeySpace, decode_id, encode_id, validate_id

ids = st.text(min_size=1, max_size=64)  # full Unicode: NUL, newlines, surrogates, glob chars
GLOB = set("*?[]\\")


@given(ids, ids)
@settings(max_examples=500)
def test_distinct_ids_never_share_a_key(a: str, b: str) -> None:
    ks = KeySpace("mcp:")
    if a != b:
        assert ks.key("lock", a) != ks.key("lock", b)
        assert ks.key("lock", a, tag=True) != ks.key("lock", b, tag=True)


@given(st.lists(ids, min_size=1, max_size=3), st.lists(ids, min_size=1, max_size=3))
def test_distinct_id_tuples_never_share_a_key(a: list, b: list) -> None:
    ks = KeySpace("mcp:")
    if a != b:
        assert ks.key("x", *a) != ks.key("x", *b)


@given(ids)
@settings(max_examples=500)
def test_encoded_ids_carry_no_glob_separator_or_hash_tag_characters(value: str) -> None:
    segment = encode_id(value)
    assert not (set(segment) & (GLOB | {":", "{", "}", "#", " ", "\n", "\x00"}))
    assert segment.isascii()
    assert decode_id(segment) == value


@given(ids)
def test_every_key_keeps_the_prefix_and_matches_only_its_namespace_pattern(value: str) -> None:
    ks = KeySpace("app1:")
    key = ks.key("session", value)
    assert key.startswith("app1:session:")
    assert fnmatch.fnmatchcase(key, ks.namespace_pattern("session"))
    assert not fnmatch.fnmatchcase(key, ks.namespace_pattern("lock"))


@given(ids)
def test_hash_tag_covers_the_id_so_suffixed_keys_share_a_slot(value: str) -> None:
    from redis.crc import key_slot

    ks = KeySpace("mcp:")
    a = ks.key("lock", value, tag=True)
    b = ks.key("lock", value, tag=True, suffix="fence")
    assert key_slot(a.encode()) == key_slot(b.encode())


def test_plain_ids_stay_readable() -> None:
    assert KeySpace("mcp:").key("session", "3f2a-9c_x.y") == "mcp:session:3f2a-9c_x.y"


@pytest.mark.parametrize(
    "value, exc",
    [(None, InvalidArgumentType), (42, InvalidArgumentType), (b"bytes", InvalidArgumentType),
     ("", InvalidArgument), ("x" * (MAX_ID_LENGTH + 1), InvalidArgument)],
)
def test_invalid_ids_raise_naming_the_argument(value: object, exc: type) -> None:
    with pytest.raises(exc, match="agent_id") as info:
        validate_id(value, "agent_id")
    assert isinstance(info.value, (ValueError, TypeError))


def test_longest_id_is_accepted() -> None:
    assert validate_id("é" * MAX_ID_LENGTH, "agent_id")


@pytest.mark.parametrize("prefix", ["", "a*", "a{b}", "x" * 65, "sp ace"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    from mcp_redis.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="key_prefix"):
        KeySpace(prefix)
