"""The Redis layouts of the rate-limit state (issue 18): compact, and the same figures as the models.

Each test drives the Redis backend on a simulated clock (``now_us``) and the
in-process model side by side, then looks at what the key holds.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest

from mcp_redis import Algorithm
from mcp_redis.keys import KeySpace
from mcp_redis.ratelimit.base import Policy, Reply, Spec
from mcp_redis.ratelimit.memory import MemoryBackend
from mcp_redis.testing import RedisServer, server_flavor
from tests.ratelimit.simclock import SimulatedTTLs

NOW = 1_800_000_000_000_000  # a simulated clock near today's (us)

Stores = Tuple[Any, MemoryBackend, SimulatedTTLs]


@pytest.fixture
def stores(redis_mode: str) -> Stores:
    from mcp_redis.client import default_client
    from mcp_redis.ratelimit import _backend

    store = _backend(default_client(), "redis")
    return store, MemoryBackend(), SimulatedTTLs(store.conn.client)


def both(stores: Stores, policy: Policy, key: str, cost: int, consume: bool, now: int) -> Reply:
    redis_store, model, ttls = stores
    got = ttls.call(policy.keys_for(key), now, lambda: redis_store.acquire(policy, key, cost, consume, now_us=now))
    assert got == model.acquire(policy, key, cost, consume, now_us=now), (cost, consume, now)
    return got


@pytest.mark.parametrize("expired", [1, 2, 3, 5, 8, 21, 49, 50])
def test_sliding_log_drops_any_number_of_expired_entries_exactly(stores: Stores,
                                                                 redis_server: RedisServer, expired: int) -> None:
    # 50 hits 1 ms apart, then a check when `expired` of them have left the
    # window: the tail is cut by galloping and bisecting, and what is left is
    # exactly the live entries (their count is the list's length).
    policy = Policy.of(Algorithm.SLIDING_WINDOW, f"trim{expired}", [Spec(50, 1_000_000)], KeySpace("mcp:"))
    for i in range(50):
        both(stores, policy, "k", 1, True, NOW + i * 1000)
    assert not both(stores, policy, "k", 1, True, NOW + 50_000).allowed
    at = NOW + 1_000_000 + (expired - 1) * 1000  # entry i is gone from NOW + i ms + 1 s on
    reply = both(stores, policy, "k", 1, False, at)
    assert reply.outcomes[0].remaining == expired
    reply = both(stores, policy, "k", 1, True, at)
    assert reply.allowed and reply.outcomes[0].remaining == expired - 1
    (key,) = policy.keys_for("k")
    assert redis_server.client().llen(key) == 50 - expired + 1


def test_sliding_log_entries_are_15_bytes_and_the_call_counts_once_per_unit(
        stores: Stores, redis_server: RedisServer) -> None:
    policy = Policy.of(Algorithm.SLIDING_WINDOW, "entries", [Spec(20, 3_600_000_000)], KeySpace("mcp:"))
    both(stores, policy, "k", 3, True, NOW)
    both(stores, policy, "k", 1, True, NOW + 1)
    (key,) = policy.keys_for("k")
    entries: List[bytes] = redis_server.client(decode_responses=False).lrange(key, 0, -1)
    assert [len(e) for e in entries] == [15] * 4
    assert entries[1] == entries[2] == entries[3] != entries[0], "a call's units share one entry text, newest first"
    assert int.from_bytes(entries[0][:7], "big") == NOW + 1


@pytest.mark.parametrize("algorithm", [Algorithm.SLIDING_WINDOW_COUNTER, Algorithm.GCRA, Algorithm.FIXED_WINDOW],
                         ids=lambda a: a.value)
def test_constant_state_is_one_bare_integer(redis_mode: str, redis_server: RedisServer, algorithm: Algorithm) -> None:
    # Redis keeps an integer value in the key's object itself (encoding
    # "int"): no string allocation, the smallest a key can be.
    import mcp_redis

    limiter = mcp_redis.RateLimiter(f"int-{algorithm.value}", 20, 3600, algorithm=algorithm)
    for _ in range(5):
        assert limiter.hit("agent").allowed
    keys = [k for k in redis_server.client().keys(f"*int-{algorithm.value}*")]
    assert len(keys) == 1
    assert redis_server.client().object("encoding", keys[0]) == "int"


SHARED = 2**31 - 1  # OBJECT REFCOUNT of one of Redis's shared integers (0..9,999)


@pytest.mark.parametrize("limit", [20, 1_000, 2_499])
def test_sliding_window_counter_first_window_is_a_shared_integer(stores: Stores, redis_server: RedisServer,
                                                                 limit: int) -> None:
    # A limiter's first window (nothing counted in the window before): the
    # count and the window's index mod 4, which Redis keeps as one of its
    # shared integers, no object of the key's own (what limits' INCR key
    # costs); a full key at 1,000/minute included.
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, f"first-{limit}", [Spec(limit, 60_000_000)],
                       KeySpace("mcp:"))
    (key,) = policy.keys_for("k")
    idx = NOW // 60_000_000
    both(stores, policy, "k", 1, True, NOW)
    both(stores, policy, "k", limit - 1, True, NOW + 1)
    client = redis_server.client()
    assert int(client.get(key)) == limit * 4 + idx % 4
    # What an INCR'd count of the same size (limits' layout) gets on this
    # server: shared on Redis; on Valkey 8, which embeds each key in its
    # value's object, every value is an object of its own.
    client.incrby("reference", limit * 4 + idx % 4)
    assert client.object("refcount", key) == client.object("refcount", "reference")
    if server_flavor() == "redis":
        assert client.object("refcount", key) == SHARED
    # The next window counts this one as its previous: the packed layout (its own integer).
    both(stores, policy, "k", 1, True, (idx + 1) * 60_000_000 + 30_000_000)
    assert int(client.get(key)) >= 2**51 and client.object("refcount", key) == 1


def test_sliding_window_counter_first_window_count_outliving_its_ttl_is_not_this_windows(
        stores: Stores, redis_server: RedisServer) -> None:
    # The key expires at the end of the window after its own, but Redis may
    # delete it a little late: read in the window after next, or later, its
    # count is stale (an index mod 2 would take it for this window's and
    # refuse), and in the window after its own it is the previous count.
    redis_store, model, _ = stores
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, "late", [Spec(3, 1_000_000)], KeySpace("mcp:"))
    (key,) = policy.keys_for("k")
    start = NOW - NOW % 1_000_000
    both(stores, policy, "k", 3, True, start + 10)
    assert int(redis_server.client().get(key)) < 10_000
    for late in (1_000_010, 2_000_000, 2_000_001, 3_500_000):
        redis_server.client().pexpire(key, 60_000)  # still there, whatever the simulated clock says
        now = start + late
        got = redis_store.acquire(policy, "k", 1, False, now_us=now)
        assert got == model.acquire(policy, "k", 1, False, now_us=now), late
        assert got.allowed == (late >= 2_000_000), late


def test_sliding_window_counter_beyond_2_21_per_window_keeps_exact_counts(
        stores: Stores, redis_server: RedisServer) -> None:
    # Counts of 2^21 and more do not fit the integer layouts: the key holds
    # "<index>:<current>:<previous>" then, and every figure stays the model's.
    big = 10_000_000
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, "big", [Spec(big, 60_000_000)], KeySpace("mcp:"))
    start = NOW - NOW % 60_000_000
    both(stores, policy, "k", 5_000_000, True, start + 1_000)
    (key,) = policy.keys_for("k")
    assert redis_server.client().get(key).count(":") == 2
    both(stores, policy, "k", 1, True, start + 2_000)
    both(stores, policy, "k", 4_999_999, True, start + 3_000)
    assert not both(stores, policy, "k", 1, True, start + 4_000).allowed
    # The next window: the 10,000,000 become the previous count, weighted.
    reply = both(stores, policy, "k", 1, False, start + 60_000_000 + 30_000_000)
    assert reply.outcomes[0].remaining == big - 5_000_000
    both(stores, policy, "k", 7, True, start + 60_000_000 + 30_000_000)
    # Small counts again: back to the integer layout.
    both(stores, policy, "k", 3, True, start + 180_000_000)
    assert redis_server.client().object("encoding", key) == "int"


@pytest.mark.parametrize("algorithm", [Algorithm.SLIDING_WINDOW, Algorithm.SLIDING_WINDOW_COUNTER, Algorithm.GCRA],
                         ids=lambda a: a.value)
@pytest.mark.parametrize("limit", [1, 7, 10_000_000])
def test_one_limit_admitted_answers_the_models_figures(stores: Stores, algorithm: Algorithm,
                                                      limit: int) -> None:
    # One limit, admitted: the script answers one integer (the client knows
    # the limit and the window), the same figures as the model's text would.
    policy = Policy.of(algorithm, f"one-{limit}", [Spec(limit, 3_600_000_000)], KeySpace("mcp:"))
    for i in range(min(limit, 5)):
        reply = both(stores, policy, "k", 1, True, NOW + i * 999_983)
        assert reply.allowed and (i > 0 or reply.outcomes[0].remaining == limit - 1)


def test_fixed_window_one_limit_reports_its_window_in_microseconds(redis_mode: str) -> None:
    import mcp_redis

    limiter = mcp_redis.RateLimiter("fw-one", 3, 60, algorithm=Algorithm.FIXED_WINDOW)
    first, second = limiter.hit("k"), limiter.hit("k")
    assert (first.remaining, second.remaining) == (2, 1)
    assert first.reset_after == 60.0
    assert 59.0 < second.reset_after <= 60.0
    limiter.hit("k")
    refused = limiter.hit("k")
    assert not refused.allowed and 59.0 < refused.retry_after <= 60.001


def test_sliding_window_counter_keys_of_the_previous_layout_are_not_read(redis_mode: str,
                                                                         redis_server: RedisServer) -> None:
    # docs/ratelimit.md: the layout changed with the tag (`sc` -> `wc`), so a
    # process of the release before never misreads a key of this one, nor
    # the other way round: during a rolling upgrade the two count apart.
    import mcp_redis

    limiter = mcp_redis.RateLimiter("upgrade", 5, 3600, algorithm=Algorithm.SLIDING_WINDOW_COUNTER)
    (key,) = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, "upgrade", [Spec(5, 3_600_000_000)],
                       KeySpace("mcp:")).keys_for("k")
    assert key.endswith("#wc_3600000000")
    client = redis_server.client()
    seconds, micros = client.time()
    idx = (seconds * 1_000_000 + micros) // 3_600_000_000
    old_key = key.replace("#wc_", "#sc_")
    client.set(old_key, (5 * 2**22) * 512 + idx % 512, px=60_000)  # full, in the old layout
    reply = limiter.hit("k")
    assert reply.allowed and reply.remaining == 4
    assert int(client.get(old_key)) == (5 * 2**22) * 512 + idx % 512, "left as it was"


def test_sliding_window_counter_estimate_at_huge_limits_is_the_models(stores: Stores) -> None:
    # previous * time left passes 2^53 at a limit of 10^15: Lua multiplies in
    # doubles, and the models do the same (an exact integer product answered
    # one more `remaining` than the script: a reviewer's fuzzing).
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, "huge", [Spec(10**15, 2_440_052)], KeySpace("mcp:"))
    start = NOW - NOW % 2_440_052
    both(stores, policy, "k", 10**15 - 1, True, start + 5)
    reply = both(stores, policy, "k", 1, False, start + 2_440_052 + 17_586)
    assert reply.outcomes[0].remaining == 7_207_223_452_616  # the exact product: ...615


@pytest.mark.parametrize("windows", [[1_000_000], [1_000_000, 3_000_000]], ids=["one limit", "two limits"])
def test_sliding_window_counter_keys_expire_at_the_end_of_the_window_after_their_own(
        stores: Stores, windows: List[int]) -> None:
    # What the first-window layout relies on (index mod 4): not much later
    # (nor earlier: the count is still needed as the previous one).
    _, _, ttls = stores
    policy = Policy.of(Algorithm.SLIDING_WINDOW_COUNTER, f"ttl{len(windows)}", [Spec(9, w) for w in windows],
                       KeySpace("mcp:"))
    keys = policy.keys_for("k")
    start = NOW - NOW % 3_000_000  # a window start of every limit

    def ends_ok(now: int) -> None:  # whatever the write (kept TTL, new TTL, either layout)
        for key, window in zip(keys, windows):
            end = (now // window + 2) * window
            # Redis counts a TTL in whole ms from its own ms clock: up to 1 ms early.
            assert end - 1_000 <= ttls.ends[key] <= end + 100_000, (key, ttls.ends[key] - end)

    for now in (start + 10, start + 500_000, start + 1_200_000, start + 3_100_000):
        # first window; the same window (TTL kept); the 1 s limit's next window (packed); later windows
        both(stores, policy, "k", 1, True, now)
        ends_ok(now)
