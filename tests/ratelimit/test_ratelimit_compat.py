"""`mcp_redis.compat.RateLimiter`: the legacy request limiter's surface, shared through Redis.

The legacy server's own tests run against it with ``scripts/legacy_acceptance.sh`` (docs/migration.md).
"""

from __future__ import annotations

import multiprocessing
import uuid

import pytest

import mcp_redis
from mcp_redis import compat
from mcp_redis.errors import InvalidArgument, InvalidArgumentType
from mcp_redis.testing import RedisServer, free_port
from tests import workers_ratelimit


@pytest.mark.slow
def test_four_processes_of_four_threads_admit_exactly_ten_in_all(redis_url: str) -> None:
    key = f"shared-{uuid.uuid4().hex}"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        jobs = [pool.apply_async(workers_ratelimit.legacy_requests, ({"redis_url": redis_url}, key, 4, 25))
                for _ in range(4)]
        assert sum(job.get(timeout=120) for job in jobs) == 10


def test_messages_name_the_limit_and_count_as_the_legacy_ones(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    per_minute = compat.RateLimiter(max_requests_per_minute=2, max_requests_per_hour=100)
    assert [per_minute.check_rate_limit("a1") for _ in range(2)] == [(True, None), (True, None)]
    assert per_minute.check_rate_limit("a1") == (
        False, "Rate limit exceeded: 2/2 requests per minute. Wait a few seconds and retry.")
    per_hour = compat.RateLimiter(max_requests_per_minute=100, max_requests_per_hour=2, name="hourly")
    per_hour.check_rate_limit("a1"), per_hour.check_rate_limit("a1")
    assert per_hour.check_rate_limit("a1") == (
        False, "Rate limit exceeded: 2/2 requests per hour. Please reduce request frequency.")


def test_refused_requests_are_not_counted_and_stats_count_admitted_ones(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    limiter = compat.RateLimiter(3, 10)
    for _ in range(5):
        limiter.check_rate_limit("a1")
    assert limiter.get_stats("a1") == {
        "requests_last_minute": 3, "requests_last_hour": 3, "limit_per_minute": 3, "limit_per_hour": 10,
        "remaining_minute": 0, "remaining_hour": 7,
    }


def test_both_limits_share_one_state_across_instances_and_every_key_has_a_ttl(redis_server: RedisServer,
                                                                               redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    compat.RateLimiter(5, 100).check_rate_limit("a1")
    assert compat.get_rate_limiter().get_stats("a1")["requests_last_hour"] == 1
    client = redis_server.client()
    keys = list(client.scan_iter(match="mcp:ratelimit:*"))
    assert len(keys) == 2 and all(client.pttl(k) > 0 for k in keys)


def test_reset_without_an_agent_forgets_every_agent_everywhere(redis_server: RedisServer, redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    limiter, other = compat.RateLimiter(5, 100), compat.RateLimiter(5, 100, name="other")
    for agent in ("a1", "a2", "a3"):
        limiter.check_rate_limit(agent)
    other.check_rate_limit("a1")
    limiter.reset()
    assert [limiter.get_stats(a)["requests_last_hour"] for a in ("a1", "a2", "a3")] == [0, 0, 0]
    assert other.get_stats("a1")["requests_last_hour"] == 1, "another limiter's keys stay"


def test_redis_down_applies_the_librarys_fallback() -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    limiter = compat.RateLimiter(2, 100)
    assert [limiter.check_rate_limit("a1")[0] for _ in range(3)] == [True, True, False]
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_fallback="closed")
    allowed, message = compat.RateLimiter(2, 100).check_rate_limit("a1")
    assert not allowed and message is not None and "unavailable" in message


@pytest.mark.parametrize(("kwargs", "argument", "kind"), [
    ({"max_requests_per_minute": 0}, "max_requests_per_minute", InvalidArgument),
    ({"max_requests_per_hour": "many"}, "max_requests_per_hour", InvalidArgumentType),
    ({"max_requests_per_minute": 10**16}, "max_requests_per_minute", InvalidArgument),  # named "limit" before
    ({"max_requests_per_hour": 10**16}, "max_requests_per_hour", InvalidArgument),
])
def test_bad_limits_name_the_argument(kwargs: dict, argument: str, kind: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(kind, match=f"^{argument}:"):
        compat.RateLimiter(**kwargs)


@pytest.mark.parametrize("bad_id", ["", 0, False, b"", []], ids=repr)
def test_a_bad_agent_id_is_refused_naming_it_and_reset_forgets_nothing(redis_url: str, bad_id: object) -> None:
    """`reset` takes None for "every agent"; an empty or non-`str` id (falsy, as the legacy class
    read it) raises naming `agent_id` instead of wiping every agent's counts."""
    mcp_redis.configure(redis_url=redis_url)
    limiter = compat.RateLimiter(5, 100)
    limiter.check_rate_limit("a1")
    for call in (limiter.reset, limiter.check_rate_limit, limiter.get_stats):
        with pytest.raises((InvalidArgument, InvalidArgumentType), match="agent_id"):
            call(bad_id)  # type: ignore[operator]
    assert limiter.get_stats("a1")["requests_last_hour"] == 1
