"""RedisBackend: the proposal's facade over the same features and fallbacks."""

from __future__ import annotations

import threading
from typing import Any, List

import pytest

import mcp_redis
from mcp_redis import LockTimeout, RedisBackend
from mcp_redis.connections import get_redis


def test_sessions_round_trip_through_redis(redis_mode: str) -> None:
    backend = RedisBackend()
    backend.set_session("s-1", "agent-1", ttl=60)
    assert backend.get_session("s-1") == "agent-1"
    assert backend.get_session("unknown") is None
    ttl = get_redis().client.pttl(next(iter(get_redis().client.scan_iter("mcp:*s-1*"))))
    assert 0 < ttl <= 60_000


def test_acquire_lock_is_exclusive_across_backend_objects(redis_mode: str) -> None:
    a, b = RedisBackend(), RedisBackend()
    with a.acquire_lock("agent-7", timeout=5):
        box: List[BaseException] = []

        def other() -> None:
            try:
                with b.acquire_lock("agent-7", timeout=5, blocking_timeout=0.1):
                    pass  # pragma: no cover - must not enter
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(box) == 1 and isinstance(box[0], LockTimeout)


def test_check_rate_limit_admits_exactly_the_limit(redis_mode: str) -> None:
    backend = RedisBackend()
    verdicts = [backend.check_rate_limit("agent-1", 5, 60) for _ in range(8)]
    assert verdicts == [True] * 5 + [False] * 3
    assert backend.check_rate_limit("agent-2", 5, 60)


def test_cache_set_get_json_with_ttl(redis_mode: str) -> None:
    backend = RedisBackend()
    backend.cache_set("agents:list", {"ids": ["a", "b"], "n": 2}, ttl=30)
    assert backend.cache_get("agents:list") == {"ids": ["a", "b"], "n": 2}
    assert backend.cache_get("missing") is None
    client = get_redis().client
    keys = list(client.scan_iter("mcp:kv:*"))
    assert len(keys) == 1 and 0 < client.pttl(keys[0]) <= 30_000


@pytest.mark.parametrize("bad", [{"value": object()}, {"ttl": 0}, {"ttl": float("nan")}, {"key": ""}])
def test_cache_set_refuses_bad_input_naming_it_and_writes_nothing(redis_mode: str, bad: Any) -> None:
    args = {"key": "k", "value": 1, "ttl": 10}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        RedisBackend().cache_set(args["key"], args["value"], ttl=args["ttl"])
    assert get_redis().client.dbsize() == 0


def test_cache_is_a_miss_not_an_error_while_redis_is_down(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    backend = RedisBackend()
    backend.cache_set("k", [1], ttl=10)
    server.kill()
    for _ in range(10):
        assert backend.cache_get("k") is None
        backend.cache_set("k", [2], ttl=10)  # best effort, no exception


def test_local_mode_backend_works_without_redis() -> None:
    backend = RedisBackend()
    backend.set_session("s", "a")
    assert backend.get_session("s") == "a"
    backend.cache_set("k", {"x": 1})
    assert backend.cache_get("k") == {"x": 1}
    assert [backend.check_rate_limit("a", 2, 60) for _ in range(3)] == [True, True, False]
    with backend.acquire_lock("agent", timeout=5) as held:
        assert held.backend == "local" and isinstance(held.fencing_token, int)


def test_backend_with_settings_applies_them_process_wide(redis_url: str) -> None:
    s = mcp_redis.Settings(redis_url=redis_url, key_prefix="other:")
    backend = RedisBackend(s)
    backend.cache_set("k", 1)
    assert mcp_redis.settings().key_prefix == "other:"
    assert list(get_redis().client.scan_iter("other:kv:*"))


def test_local_mode_cache_belongs_to_its_client() -> None:
    with mcp_redis.Client(redis_url=None) as one, mcp_redis.Client(redis_url=None) as other:
        RedisBackend(one).cache_set("k", {"x": 1})
        assert RedisBackend(one).cache_get("k") == {"x": 1}
        assert RedisBackend(other).cache_get("k") is None


@pytest.mark.parametrize("valid, bad", [((1, 60), (True, 60)), ((1, 60), (1.0, 60)), ((1, 1), (1, True))], ids=repr)
def test_a_bad_limit_or_window_is_refused_after_an_equal_valid_one_was_used(valid: tuple, bad: tuple) -> None:  # type: ignore[type-arg]
    backend = RedisBackend()
    assert backend.check_rate_limit("a", *valid)  # caches the limiter of `valid`, which `bad` equals
    with pytest.raises(mcp_redis.InvalidArgumentType):
        backend.check_rate_limit("a", *bad)
