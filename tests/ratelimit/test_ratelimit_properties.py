"""Properties over many call sequences (hypothesis, real redis-server).

* every key the limiter writes has a TTL, whatever the calls, crashes and
  script flushes in between;
* the Python models (run by the in-process and PostgreSQL backends) answer exactly like the
  Lua scripts, step for step, on a simulated server clock;
* the sliding-window counter stays within its documented error bound.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcp_redis
from mcp_redis import Algorithm, RateLimiter
from mcp_redis.connections import get_redis
from mcp_redis.keys import KeySpace
from mcp_redis.ratelimit.base import Policy
from mcp_redis.ratelimit.memory import MemoryBackend
from mcp_redis.ratelimit.redis import RedisBackend
from mcp_redis.testing import RedisServer
from tests.ratelimit.simclock import SimulatedTTLs

ALGORITHMS = [a for a in Algorithm if a.name != "TOKEN_BUCKET"]


def examples(n: int) -> Any:
    """Hypothesis settings for tests that use (function-scoped) server fixtures."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

limits_st = st.lists(
    st.tuples(st.integers(1, 5), st.sampled_from([0.002, 0.02, 0.5, 60])), min_size=1, max_size=2,
    unique_by=lambda lim: lim[1],
)
op_st = st.one_of(
    st.tuples(st.just("hit"), st.sampled_from(ALGORITHMS), limits_st, st.sampled_from(["a", "b\0*"]), st.integers(1, 3)),
    st.tuples(st.just("peek"), st.sampled_from(ALGORITHMS), limits_st, st.sampled_from(["a", "b\0*"]), st.just(1)),
    st.tuples(st.just("reset"), st.sampled_from(ALGORITHMS), limits_st, st.sampled_from(["a", "b\0*"]), st.just(1)),
    st.tuples(st.sampled_from(["crash", "script_flush"])),
)


@examples(40)
@given(ops=st.lists(op_st, max_size=25))
def test_every_key_written_has_a_ttl_after_any_call_sequence(redis_mode: str, redis_server: RedisServer,
                                                             ops: List[Tuple[Any, ...]]) -> None:
    for op in ops:
        if op[0] == "crash":
            # The process dies between two calls: its sockets vanish, a new
            # process starts with fresh clients.
            get_redis().client.connection_pool.disconnect()
            mcp_redis.reset()
            continue
        if op[0] == "script_flush":  # as after a restart or failover
            redis_server.client().script_flush()
            continue
        verb, algorithm, limits, key, cost = op
        limiter = RateLimiter("ttl", limits=limits, algorithm=algorithm)
        cost = min(cost, min(lim for lim, _ in limits))
        if verb == "hit":
            assert limiter.hit(key, cost).backend == "redis"
        elif verb == "peek":
            limiter.peek(key)
        else:
            limiter.reset(key)
    client = redis_server.client()
    for k in client.scan_iter(match="*", count=1000):
        assert client.pttl(k) != -1, f"{k!r} has no TTL"


# -- the Python models answer like the Lua scripts --------------------------------
steps_st = st.lists(
    st.tuples(st.integers(0, 1_500_000), st.integers(1, 3), st.booleans()), min_size=1, max_size=30
)


@examples(80)
@given(
    # The fixed window's Lua times windows by key TTLs (the real server clock),
    # which a simulated clock cannot drive; its behaviour is specified in
    # test_ratelimit.py on every backend.
    algorithm=st.sampled_from([a for a in ALGORITHMS if a is not Algorithm.FIXED_WINDOW]),
    specs=st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1_000_000, 2_500_000, 3_333_333, 7_000_000])),
                   min_size=1, max_size=2, unique_by=lambda s: s[1]),
    base=st.integers(1_600_000_000_000_000, 1_800_000_000_000_000),
    steps=steps_st,
)
def test_python_models_answer_exactly_like_the_lua_scripts(
    redis_mode: str, algorithm: Algorithm, specs: List[Tuple[int, int]], base: int,
    steps: List[Tuple[int, int, bool]],
) -> None:
    redis_store = RedisBackend(get_redis())
    local = MemoryBackend()
    client = get_redis().client
    client.flushall()
    policy = Policy.of(algorithm, "model", specs, KeySpace("mcp:"))
    keys = policy.keys_for("k")
    ttls = SimulatedTTLs(client)  # the keys expire on the simulated clock, as late as Redis may be
    now = base
    for dt, cost, consume in steps:
        now += dt
        cost = min(cost, min(lim for lim, _ in specs))
        from_lua = ttls.call(keys, now, lambda: redis_store.acquire(policy, "k", cost, consume, now_us=now))
        from_model = local.acquire(policy, "k", cost, consume, now_us=now)
        assert from_lua == from_model, (now - base, cost, consume)


# -- the sliding-window counter's error bound ----------------------------------------
def _counter_run(client_store: RedisBackend, arrivals: List[int], limit: int, window: int) -> List[int]:
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, "bound", [(limit, window)], KeySpace("mcp:"))
    admitted = []
    for t in arrivals:
        allowed, _, _ = client_store.acquire(policy, "k", 1, True, now_us=t)
        if allowed:
            admitted.append(t)
    return admitted


def _max_in_any_span(admitted: List[int], window: int) -> int:
    return max((i - bisect.bisect_right(admitted, t - window) + 1 for i, t in enumerate(admitted)), default=0)


def _max_per_aligned_window(admitted: List[int], window: int) -> int:
    return max((len(list(g)) for _, g in itertools.groupby(admitted, key=lambda t: t // window)), default=0)


def test_sliding_window_counter_worst_case_stays_under_twice_the_limit(redis_mode: str) -> None:
    # The documented worst case: the previous window's hits all land at its
    # very end, then callers hammer the next window.
    store = RedisBackend(get_redis())
    get_redis().client.flushall()
    limit, window = 50, 10_000_000
    start = 170_000_000 * window
    arrivals = [start - 1000 + i for i in range(limit)] + list(range(start, start + window, window // 500))
    admitted = _counter_run(store, arrivals, limit, window)
    assert _max_per_aligned_window(admitted, window) <= limit
    assert limit < _max_in_any_span(admitted, window) < 2 * limit


@examples(40)
@given(
    gaps=st.lists(st.integers(0, 400_000), min_size=1, max_size=120),
    limit=st.integers(1, 10),
    base=st.integers(1_600_000_000_000_000, 1_800_000_000_000_000),
)
def test_sliding_window_counter_error_bound_holds_for_any_arrivals(
    redis_mode: str, gaps: List[int], limit: int, base: int
) -> None:
    window = 2_000_000
    get_redis().client.flushall()
    arrivals = list(itertools.accumulate(gaps, initial=base))
    admitted = _counter_run(RedisBackend(get_redis()), arrivals, limit, window)
    assert _max_per_aligned_window(admitted, window) <= limit
    assert _max_in_any_span(admitted, window) <= 2 * limit
    # No false denial while the estimate's inputs are empty: the first
    # `limit` arrivals of a window with no traffic before it all pass.
    first_window = [t for t in arrivals if t // window == base // window]
    assert admitted[: min(limit, len(first_window))] == first_window[:limit]
