"""Refunds: `RateLimiter.refund` and ``@rate_limited(refund_on=...)`` on every backend and algorithm.

The concurrent, multi-process exactness of refunds is in
``test_ratelimit_concurrency.py``; these tests state what one refund does.
"""

from __future__ import annotations

import asyncio
import copy
from typing import List

import pytest

import mcp_redis
from mcp_redis import Algorithm, RateLimiter, RateLimitExceeded, rate_limited
from mcp_redis.errors import InvalidArgument, InvalidArgumentType
from mcp_redis.testing import RedisServer, wait_for

ALGORITHMS = [a for a in Algorithm if a.name != "TOKEN_BUCKET"]


@pytest.fixture(params=["redis", "local", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """The library configured for one rate-limit backend."""
    mode = request.param
    if mode == "redis":
        mcp_redis.configure(redis_url=request.getfixturevalue("redis_url"))
    elif mode == "postgres":
        mcp_redis.configure(database_url=request.getfixturevalue("database_url"), rate_limits="postgres")
    else:
        mcp_redis.configure(rate_limits="local")
    return str(mode)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_refund_gives_back_exactly_the_calls_units_once(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("refunds", limits=[(3, 600), (5, 3600)], algorithm=algorithm)
    results = [limiter.hit("agent-1") for _ in range(3)]
    assert all(r.allowed for r in results)
    assert limiter.refund(results[1]) is True
    assert limiter.refund(results[1]) is False, "a result is refunded once"
    assert limiter.hit("agent-1").allowed, "the refunded unit is back"
    assert not limiter.hit("agent-1").allowed, "and only that one"


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_copies_of_a_result_share_its_one_refund(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("refunds-copies", 2, 600, algorithm=algorithm)
    kept, failed = limiter.hit("agent-1"), limiter.hit("agent-1")
    assert kept.allowed and failed.allowed
    twins = [copy.copy(failed), copy.deepcopy(failed)]
    assert limiter.refund(twins[1]) is True
    assert limiter.refund(failed) is False and limiter.refund(twins[0]) is False, "one hit, one refund"
    assert limiter.hit("agent-1").allowed, "the refunded unit is back"
    assert not limiter.hit("agent-1").allowed, "and only that one"


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_refund_of_a_cost_gives_back_all_its_units(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("refunds-cost", 4, 600, algorithm=algorithm)
    first = limiter.hit("agent-1", cost=3)
    assert first.allowed and not limiter.hit("agent-1", cost=2).allowed
    assert limiter.refund(first)
    assert limiter.hit("agent-1", cost=4).allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_refund_of_a_refused_hit_or_a_peek_changes_nothing(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("refunds-refused", 1, 600, algorithm=algorithm)
    assert limiter.hit("agent-1").allowed
    refused, peeked = limiter.hit("agent-1"), limiter.peek("agent-1")
    assert not refused.allowed
    assert limiter.refund(refused) is False and limiter.refund(peeked) is False
    assert not limiter.hit("agent-1").allowed


@pytest.mark.parametrize("algorithm", [Algorithm.SLIDING_WINDOW, Algorithm.FIXED_WINDOW, Algorithm.GCRA],
                         ids=lambda a: a.value)
def test_refund_after_the_calls_window_ended_never_frees_a_unit_of_the_next(backend: str,
                                                                             algorithm: Algorithm) -> None:
    limiter = RateLimiter("refunds-late", 1, 0.3, algorithm=algorithm)
    old = limiter.hit("agent-1")
    assert old.allowed
    wait_for(lambda: limiter.peek("agent-1").allowed, what="the window to end")
    assert limiter.hit("agent-1").allowed, "a new window's unit"
    assert limiter.refund(old) is False
    assert not limiter.hit("agent-1").allowed, "the late refund freed nothing"


@pytest.mark.parametrize("backend, algorithm", [
    *((b, Algorithm.SLIDING_WINDOW) for b in ("redis", "local", "postgres")),
    *((b, Algorithm.FIXED_WINDOW) for b in ("local", "postgres")),
], indirect=["backend"], ids=lambda v: getattr(v, "value", v))
def test_refund_of_a_call_admitted_before_reset_frees_nothing_where_the_docs_say_so(
        backend: str, algorithm: Algorithm) -> None:
    """docs/ratelimit.md: the sliding log (by nonce) and the fixed window that stores its start
    (in-process, PostgreSQL) never credit a pre-`reset` call to the state started after it (the
    other algorithms may: a documented limit)."""
    limiter = RateLimiter("refunds-reset", 3, 600, algorithm=algorithm)
    old = limiter.hit("agent-1")
    assert old.allowed
    limiter.reset("agent-1")
    assert all(limiter.hit("agent-1").allowed for _ in range(3))
    assert limiter.refund(old) is False
    assert not limiter.hit("agent-1").allowed, "the refund of a call the new state never counted freed nothing"


def test_refund_keeps_every_key_with_a_ttl(redis_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=redis_server.url)
    for algorithm in ALGORITHMS:
        limiter = RateLimiter(f"refunds-ttl-{algorithm.value}", limits=[(3, 600), (9, 3600)], algorithm=algorithm)
        first = limiter.hit("agent-1")
        limiter.hit("agent-1")
        assert limiter.refund(first)
    client = redis_server.client()
    keys = list(client.scan_iter(match="mcp:ratelimit:*"))
    assert keys
    assert all(client.pttl(k) > 0 for k in keys), {k: client.pttl(k) for k in keys}


def test_refund_of_another_limiters_result_is_refused() -> None:
    mcp_redis.configure(rate_limits="local")
    result = RateLimiter("a", 1, 60).hit("agent-1")
    with pytest.raises(InvalidArgument, match="result"):
        RateLimiter("b", 1, 60).refund(result)
    with pytest.raises(InvalidArgumentType, match="result"):
        RateLimiter("b", 1, 60).refund("not a result")  # type: ignore[arg-type]


def test_decorator_refund_on_gives_failed_calls_slots_back_and_reraises(backend: str) -> None:
    calls: List[bool] = []

    @rate_limited("refund-on", 2, 600, key="agent_id", refund_on=(ValueError,))
    def store(agent_id: str, fail: bool) -> str:
        calls.append(fail)
        if fail:
            raise ValueError("bad payload")
        return "stored"

    for _ in range(5):
        with pytest.raises(ValueError, match="bad payload"):
            store("agent-1", True)
    assert [store("agent-1", False), store("agent-1", False)] == ["stored", "stored"]
    with pytest.raises(RateLimitExceeded):
        store("agent-1", False)
    assert len(calls) == 7


def test_decorator_keeps_the_slot_of_exceptions_not_listed(backend: str) -> None:
    @rate_limited("refund-other", 1, 600, key="agent_id", refund_on=(ValueError,))
    def store(agent_id: str) -> None:
        raise KeyError("not refunded")

    with pytest.raises(KeyError):
        store("agent-1")
    with pytest.raises(RateLimitExceeded):
        store("agent-1")


def test_async_decorator_refund_on_gives_the_slot_back(backend: str) -> None:
    @rate_limited("refund-async", 1, 600, key="agent_id", refund_on=ValueError)
    async def store(agent_id: str, fail: bool) -> str:
        if fail:
            raise ValueError("bad payload")
        return "stored"

    with pytest.raises(ValueError):
        asyncio.run(store("agent-1", True))
    assert asyncio.run(store("agent-1", False)) == "stored"
    with pytest.raises(RateLimitExceeded):
        asyncio.run(store("agent-1", False))


@pytest.mark.parametrize("refund_on", ["ValueError", (ValueError, 3), [ValueError], int])
def test_bad_refund_on_names_the_argument(refund_on: object) -> None:
    with pytest.raises(InvalidArgumentType, match="refund_on"):
        rate_limited("x", 1, 60, refund_on=refund_on)  # type: ignore[arg-type]
