"""Rate limiting: the behaviour of `RateLimiter` and `@rate_limited` on every backend."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, List

import pytest

import mcp_redis
from mcp_redis import Algorithm, Limit, RateLimiter, RateLimitExceeded, rate_limited
from mcp_redis.errors import InvalidArgument, InvalidArgumentType
from mcp_redis.metrics import METRICS
from mcp_redis.testing import RedisServer
from tests.ratelimit.simclock import SimulatedTTLs

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


def keys_of(server: RedisServer) -> List[str]:
    return sorted(server.client().scan_iter(match="mcp:*"))


# -- the verbs -----------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_hit_admits_up_to_limit_then_refuses_with_retry_after(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("store", 3, 60, algorithm=algorithm)
    results = [limiter.hit("agent-1") for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    refused = results[-1]
    assert refused.limit == 3 and refused.backend == backend
    # The counter may wait into the next window, while the previous one's share decays.
    # A fixed window's key still exists during its expiry millisecond: + 1 ms.
    longest = 120 if algorithm is Algorithm.SLIDING_WINDOW_COUNTER else 60.001
    assert 0 < refused.retry_after <= longest
    assert 0 < refused.reset_after <= 120
    assert refused.refused_by == "3/60s"
    assert all(r.retry_after == 0 for r in results[:3])
    assert limiter.hit("agent-2").allowed, "keys are independent"


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_every_limits_figures_stay_whole_after_the_limit_is_lowered_on_a_live_key(
        backend: str, algorithm: Algorithm) -> None:
    # A reviewer: statuses[i].remaining read -7 (only the top-level figure was clamped), and the
    # fixed window's refusal on Redis said retry in 60.001 s but every unit back in 60.000 s.
    for _ in range(10):
        assert RateLimiter("lowered", 10, 60, algorithm=algorithm).hit("k").allowed
    for result in (RateLimiter("lowered", 3, 60, algorithm=algorithm).hit("k"),
                   RateLimiter("lowered", 3, 60, algorithm=algorithm).peek("k"),
                   RateLimiter("lowered", limits=[(3, 60), (100, 3600)], algorithm=algorithm).hit("k")):
        assert not result.allowed and result.remaining == 0
        assert result.reset_after >= result.retry_after > 0
        for status in result.statuses:
            assert status.remaining >= 0 and status.reset_after >= status.retry_after >= 0


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_decade_long_window_reports_exact_figures(backend: str, algorithm: Algorithm) -> None:
    # 10 years is 3.15e14 µs: past the 1e14 where Lua's number-to-text
    # conversion switches to exponent notation, so the scripts must format it.
    decade = 10 * 365 * 24 * 3600.0
    limiter = RateLimiter("decade", 1, decade, algorithm=algorithm)
    admitted = limiter.hit("k")
    refused = limiter.hit("k")
    assert admitted.allowed and not refused.allowed
    longest = 2 * decade if algorithm is Algorithm.SLIDING_WINDOW_COUNTER else decade + 0.001
    assert decade - 60 < refused.retry_after <= longest
    assert decade - 60 < refused.reset_after <= 2 * decade


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_multi_limit_refusal_consumes_from_no_limit(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("kg", limits=[(10, 3600), Limit(3, 60, "burst")], algorithm=algorithm)
    assert limiter.hit("a", cost=2).allowed
    refused = limiter.hit("a", cost=2)
    assert not refused.allowed and refused.refused_by == "burst"
    hourly, burst = limiter.peek("a").statuses
    assert (hourly.remaining, burst.remaining) == (8, 1), "the refused hit took nothing from either limit"
    assert limiter.hit("a").allowed
    assert not limiter.hit("a").allowed
    assert limiter.peek("a").statuses[0].remaining == 7


def test_multi_limit_result_reports_the_tightest_limit(backend: str) -> None:
    limiter = RateLimiter("kg", limits=[(20, 3600), (5, 60)])
    result = limiter.hit("a")
    assert (result.limit, result.remaining) == (5, 4)
    assert [s.remaining for s in result.statuses] == [19, 4]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_peek_does_not_consume(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("p", 2, 60, algorithm=algorithm)
    assert limiter.peek("k").remaining == 2
    limiter.hit("k")
    for _ in range(3):
        peeked = limiter.peek("k")
        assert peeked.allowed and peeked.remaining == 1
    limiter.hit("k")
    assert not limiter.peek("k").allowed
    assert limiter.peek("k").retry_after > 0


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_reset_forgets_the_key(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("r", limits=[(1, 60), (5, 3600)], algorithm=algorithm)
    limiter.hit("k")
    assert not limiter.hit("k").allowed
    limiter.reset("k")
    assert limiter.hit("k").allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_caller_sleeping_retry_after_is_admitted(backend: str, algorithm: Algorithm) -> None:
    limiter = RateLimiter("s", 2, 0.2, algorithm=algorithm)
    for _ in range(100):  # refills while a loaded machine runs slowly: hit until refused
        result = limiter.hit("k")
        if not result.allowed:
            break
    assert not result.allowed
    time.sleep(result.retry_after)
    assert limiter.hit("k").allowed


def test_cost_counts_units_and_is_all_or_nothing(backend: str) -> None:
    limiter = RateLimiter("c", 5, 60)
    assert limiter.hit("k", cost=3).remaining == 2
    refused = limiter.hit("k", cost=3)
    assert not refused.allowed and refused.remaining == 2
    assert limiter.hit("k", cost=2).remaining == 0


def test_a_sliding_window_call_takes_at_most_max_log_cost_units(backend: str) -> None:
    """The log keeps an entry per unit: a cost of 10^7 blocked Redis for 1.4 s and 10^15 froze
    it (and raised MemoryError in local mode). Above MAX_LOG_COST the call is refused, naming
    `cost`, before anything is counted; the counting algorithms take any cost up to the limit."""
    from mcp_redis.ratelimit import MAX_LOG_COST

    limiter = RateLimiter("heavy", 10**15, 3600)
    for cost in (MAX_LOG_COST + 1, 10**15):
        with pytest.raises(InvalidArgument, match="cost.*sliding_window_counter or gcra"):
            limiter.hit("k", cost=cost)
    assert limiter.peek("k").remaining == 10**15
    assert limiter.hit("k", cost=MAX_LOG_COST).remaining == 10**15 - MAX_LOG_COST
    with pytest.raises(InvalidArgument, match="exceeds the limit 5"):
        RateLimiter("small", 5, 60).hit("k", cost=6)
    for algorithm in (Algorithm.SLIDING_WINDOW_COUNTER, Algorithm.FIXED_WINDOW):
        assert RateLimiter(f"heavy-{algorithm.value}", 10**15, 3600, algorithm=algorithm).hit(
            "k", cost=10**12).remaining == 10**15 - 10**12


def test_ids_with_any_unicode_are_distinct_keys(backend: str) -> None:
    limiter = RateLimiter("n\0ame *", 1, 60)
    for key in ("a", "a*", "a\0", "ä", "{a}", "a:b"):
        assert limiter.hit(key).allowed, key


# -- the backend protocol, called directly ---------------------------------------------
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a is not Algorithm.FIXED_WINDOW], ids=lambda a: a.value)
def test_every_backend_answers_the_protocol_like_the_python_models(backend: str, algorithm: Algorithm) -> None:
    # One signature on every backend, and the same replies as the models on a
    # simulated clock. (The fixed window's script times windows by key TTLs,
    # the real server clock, which a simulated clock cannot drive.)
    from mcp_redis.client import default_client
    from mcp_redis.connections import get_redis
    from mcp_redis.keys import KeySpace
    from mcp_redis.ratelimit import _backend
    from mcp_redis.ratelimit.base import Policy, Spec
    from mcp_redis.ratelimit.memory import MemoryBackend

    store = _backend(default_client(), backend)
    assert store.name == backend
    model = MemoryBackend()
    policy = Policy.of(algorithm, "contract", [Spec(3, 2_000_000), Spec(5, 7_000_000)], KeySpace("mcp:"))
    now = time.time_ns() // 1000 + 3_600_000_000  # ahead of the real clock: no row or key expires for real
    steps = [(0, 1, True), (10, 2, True), (10, 1, False), (10, 1, True), (500_000, 1, True),
             (2_100_000, 2, True), (0, 1, False), (1, 3, True), (7_000_000, 3, True), (3, 1, True)]
    replies = []
    ttls = SimulatedTTLs(get_redis().client) if backend == "redis" else None
    for dt, cost, consume in steps:
        now += dt

        def call(cost: int = cost, consume: bool = consume, now: int = now) -> Any:
            return store.acquire(policy, "k", cost, consume, now_us=now)
        reply = call() if ttls is None else ttls.call(policy.keys_for("k"), now, call)
        assert reply == model.acquire(policy, "k", cost, consume, now_us=now), (dt, cost, consume)
        replies.append(reply.allowed)
    assert True in replies and False in replies, "the sequence exercises admissions and refusals"
    store.clear(policy, "k")
    assert store.acquire(policy, "k", 3, False, now_us=now) == (True, -1, [(3, 0, 0), (5, 0, 0)]), \
        "cleared: nothing counted"


# -- arguments --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, argument, kind",
    [
        ({"name": "", "limit": 1, "window": 1}, "name", InvalidArgument),
        ({"name": None, "limit": 1, "window": 1}, "name", InvalidArgumentType),
        ({"name": "x", "limit": 0, "window": 1}, "limit", InvalidArgument),
        ({"name": "x", "limit": 1.5, "window": 1}, "limit", InvalidArgumentType),
        ({"name": "x", "limit": 1, "window": 0}, "window", InvalidArgument),
        ({"name": "x", "limit": 1, "window": "1"}, "window", InvalidArgumentType),
        ({"name": "x", "limit": 1, "window": 1, "algorithm": "leaky"}, "algorithm", InvalidArgument),
        ({"name": "x"}, "limit", InvalidArgument),
        ({"name": "x", "limits": []}, "limits", InvalidArgument),
        ({"name": "x", "limit": 1, "limits": [(1, 1)]}, "limits", InvalidArgument),
    ],
)
def test_bad_limiter_arguments_name_the_argument(kwargs: Any, argument: str, kind: type) -> None:
    with pytest.raises(kind, match=f"^{argument}:"):
        RateLimiter(**kwargs)


def test_bad_call_arguments_raise_before_anything_is_written(redis_mode: str, redis_server: RedisServer) -> None:
    limiter = RateLimiter("x", 3, 60)
    for key, argument, kind in [(None, "key", InvalidArgumentType), ("", "key", InvalidArgument),
                                ("k" * 1025, "key", InvalidArgument)]:
        with pytest.raises(kind, match=f"^{argument}:"):
            limiter.hit(key)  # type: ignore[arg-type]
    for cost, kind in [(0, InvalidArgument), (4, InvalidArgument), (True, InvalidArgumentType), (1.0, InvalidArgumentType)]:
        with pytest.raises(kind, match="^cost:"):
            limiter.hit("k", cost=cost)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="^limits:"):
        RateLimiter("x", limits=[(1, 60), (2, 60.0)]).hit("k")
    assert keys_of(redis_server) == []


# -- the decorator ------------------------------------------------------------------
def test_decorator_raises_with_fields_and_does_not_call(backend: str) -> None:
    calls: List[str] = []

    @rate_limited("kg_store", limit=2, window=3600, key="agent_id")
    def store_knowledge(agent_id: str, payload: str) -> str:
        """Store one item."""
        calls.append(payload)
        return payload

    assert store_knowledge("a1", "x") == "x"
    assert store_knowledge(agent_id="a1", payload="y") == "y"
    with pytest.raises(RateLimitExceeded) as info:
        store_knowledge("a1", payload="z")
    err = info.value
    assert calls == ["x", "y"]
    assert isinstance(err, mcp_redis.McpRedisError)
    assert (err.limit, err.remaining) == (2, 0)
    assert 3590 < err.retry_after <= 3600 and err.reset_after > 0
    assert err.result.headers()["Retry-After"]  # type: ignore[attr-defined]
    assert store_knowledge("a2", "w") == "w"


def test_decorator_keeps_name_doc_and_signature() -> None:
    def store(agent_id: str, payload: int = 3) -> int:
        """Docs."""
        return payload

    wrapped = rate_limited("n", 5, 60)(store)
    assert wrapped.__name__ == "store" and wrapped.__doc__ == "Docs."
    assert inspect.signature(wrapped) == inspect.signature(store)
    assert isinstance(wrapped.limiter, RateLimiter)  # type: ignore[attr-defined]


def test_decorator_key_from_method_default_and_callable(backend: str) -> None:
    class Service:
        @rate_limited("svc", 1, 60, key="agent_id")
        def call(self, agent_id: str = "default") -> str:
            return agent_id

    service = Service()
    assert service.call("a") == "a"
    assert service.call() == "default"
    with pytest.raises(RateLimitExceeded):
        service.call(agent_id="a")
    with pytest.raises(RateLimitExceeded):
        service.call()

    @rate_limited("cb", 1, 60, key=lambda user, *_, **__: f"user-{user['id']}")
    def handler(user: dict, body: str) -> str:
        return body

    assert handler({"id": 7}, "x") == "x"
    with pytest.raises(RateLimitExceeded):
        handler({"id": 7}, body="y")
    assert handler({"id": 8}, "z") == "z"


def test_decorator_cost_callable_and_on_limited_hook(backend: str) -> None:
    seen: List[Any] = []

    def refuse(error: RateLimitExceeded, agent_id: str, n: int) -> str:
        seen.append((error.retry_after > 0, agent_id, n))
        return "later"

    @rate_limited("w", 5, 60, cost=lambda agent_id, n: n, on_limited=refuse)
    def work(agent_id: str, n: int) -> str:
        return "done"

    assert work("a", 4) == "done"
    assert work("a", 2) == "later"
    assert seen == [(True, "a", 2)]
    assert work("a", 1) == "done"


def test_decorator_rejects_unknown_parameter_at_decoration() -> None:
    with pytest.raises(InvalidArgument, match="^key:"):
        @rate_limited("x", 1, 60, key="agent")
        def f(agent_id: str) -> None: ...


def test_decorator_bad_key_value_names_the_parameter(redis_mode: str, redis_server: RedisServer) -> None:
    @rate_limited("x", 1, 60)
    def f(agent_id: Any) -> None: ...

    with pytest.raises(InvalidArgumentType, match="^agent_id:"):
        f(None)
    with pytest.raises(InvalidArgument, match="^agent_id:"):
        f("")
    assert keys_of(redis_server) == []


def test_window_none_reads_settings_when_called(redis_url: str) -> None:
    limiter = RateLimiter("late", 1)
    mcp_redis.configure(redis_url=redis_url, rate_limit_window=7)
    result = limiter.hit("k")
    assert result.statuses[0].window == 7.0
    assert 6 < limiter.hit("k").retry_after <= 7


def test_switch_off_admits_every_call() -> None:
    mcp_redis.configure(rate_limits="off")
    limiter = RateLimiter("off", 1, 60)
    assert all(limiter.hit("k").allowed for _ in range(5))
    assert limiter.hit("k").backend == "off"


def test_configure_switches_backend_for_existing_limiters(redis_url: str) -> None:
    limiter = RateLimiter("sw", 1, 60)
    mcp_redis.configure(rate_limits="local")
    assert limiter.hit("k").backend == "local"
    mcp_redis.configure(redis_url=redis_url, rate_limits="redis")
    assert limiter.hit("k").backend == "redis"


# -- headers --------------------------------------------------------------------------
def test_headers_follow_the_ietf_draft() -> None:
    mcp_redis.configure(rate_limits="local")
    limiter = RateLimiter("api", limits=[(20, 3600), Limit(2, 60, 'b"urst')])
    ok = limiter.hit("k")
    assert ok.headers() == {
        "RateLimit-Policy": '"b\\"urst";q=2;w=60, "20/3600s";q=20;w=3600',
        "RateLimit": '"b\\"urst";r=1;t=60, "20/3600s";r=19;t=3600',
    }
    limiter.hit("k")
    refused = limiter.hit("k")
    headers = mcp_redis.ratelimit_headers(refused)
    assert headers["Retry-After"] == "60"
    assert headers["RateLimit"].startswith('"b\\"urst";r=0;t=60')


# -- when the backend is down -----------------------------------------------------------
def _down_redis(redis_factory: Any, **extra: Any) -> None:
    server = redis_factory()
    url = server.url
    server.kill()
    mcp_redis.configure(redis_url=url, retry_attempts=1, breaker_reset_timeout=30, socket_connect_timeout=0.2, **extra)


def test_redis_down_falls_back_to_local_logged_once_and_counted(
    redis_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _down_redis(redis_factory)

    @rate_limited("fb", 2, 60)
    def f(agent_id: str) -> str:
        return "ok"

    with caplog.at_level(logging.WARNING, logger="mcp_redis.ratelimit"):
        assert f("a") == "ok" and f("a") == "ok"
        with pytest.raises(RateLimitExceeded):
            f("a")
        assert f.limiter.hit("b").backend == "local"  # type: ignore[attr-defined]
    warnings = [r for r in caplog.records if r.name == "mcp_redis.ratelimit" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fallback" in warnings[0].getMessage()
    assert METRICS.counter("ratelimit_fallback_total", backend="redis", to="local") == 4


def test_each_client_has_its_own_in_process_limiter() -> None:
    with mcp_redis.Client(rate_limits="local") as first, mcp_redis.Client(rate_limits="local") as second:
        one, other = RateLimiter("own", 1, 60, client=first), RateLimiter("own", 1, 60, client=second)
        assert one.hit("k").allowed and not one.hit("k").allowed
        assert other.hit("k").allowed, "the other client's limiter has counted nothing"


def test_each_client_logs_its_own_outage_once(redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Outage bookkeeping belongs to a client: one client's logged outage does
    # not silence another client's, on another deployment.
    clients = []
    for _ in range(2):
        server = redis_factory()
        url = server.url
        server.kill()
        clients.append(mcp_redis.Client(redis_url=url, retry_attempts=1, breaker_reset_timeout=30,
                                        socket_connect_timeout=0.2))
    try:
        with caplog.at_level(logging.WARNING, logger="mcp_redis.ratelimit"):
            for client in clients:
                limiter = RateLimiter("fb", 2, 60, client=client)
                assert [limiter.hit("a").backend for _ in range(2)] == ["local", "local"]
        warnings = [r for r in caplog.records if r.name == "mcp_redis.ratelimit" and r.levelno == logging.WARNING]
        assert len(warnings) == 2, [w.getMessage() for w in warnings]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("policy, allowed", [("open", True), ("closed", False)])
def test_redis_down_open_and_closed_policies(redis_factory: Any, policy: str, allowed: bool) -> None:
    _down_redis(redis_factory, rate_limit_fallback=policy)
    result = RateLimiter("fb", 1, 60).hit("k")
    assert result.allowed is allowed and result.backend == policy
    if not allowed:
        assert result.retry_after == 30


def test_redis_down_postgres_policy_uses_the_table(redis_factory: Any, database_url: str) -> None:
    _down_redis(redis_factory, rate_limit_fallback="postgres", database_url=database_url)
    limiter = RateLimiter("fb", 1, 60)
    first = limiter.hit("k")
    assert first.allowed and first.backend == "postgres"
    assert not limiter.hit("k").allowed


def test_redis_back_after_outage_is_used_again(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=1, breaker_reset_timeout=0.05)
    limiter = RateLimiter("back", 5, 60)
    assert limiter.hit("k").backend == "redis"
    server.stop()
    assert limiter.hit("k").backend == "local"
    server.start()
    mcp_redis.testing.wait_for(lambda: limiter.hit("k").backend == "redis", 5, what="redis used again")


def test_noscript_after_restart_reloads_the_script(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    limiter = RateLimiter("ns", 2, 60)
    assert limiter.hit("k").backend == "redis"
    server.restart()  # empty: no data, no scripts
    server.client().script_flush()
    results = [limiter.hit("k") for _ in range(3)]
    assert [r.backend for r in results] == ["redis"] * 3
    assert [r.allowed for r in results] == [True, True, False]


def test_sliding_window_call_replayed_with_its_nonce_counts_once(redis_mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # What a retry after a lost reply sends: the same call, its nonce marked
    # as retried (a 9th byte). Its entries are there already, so it is
    # admitted once and counted once, even after a shorter limit's window has
    # emptied that limit's log.
    from mcp_redis.client import default_client
    from mcp_redis.connections import get_redis
    from mcp_redis.keys import KeySpace
    from mcp_redis.ratelimit import _backend
    from mcp_redis.ratelimit.base import Policy, Spec

    store = _backend(default_client(), "redis")
    # 1 per hour and 1 per 10 ms
    policy = Policy.of(Algorithm.SLIDING_WINDOW, "replay", [Spec(1, 3_600_000_000), Spec(1, 10_000)], KeySpace("mcp:"))
    keys = policy.keys_for("k")
    nonces = iter([b"call-a..", b"call-a..r", b"call-a..r", b"call-b.."])
    monkeypatch.setattr(store, "_nonce", lambda: next(nonces))
    now = 1_800_000_000_000_000
    first = store.acquire(policy, "k", 1, True, now_us=now)
    replay = store.acquire(policy, "k", 1, True, now_us=now + 1_000)
    late = store.acquire(policy, "k", 1, True, now_us=now + 50_000)
    other = store.acquire(policy, "k", 1, True, now_us=now + 50_000)
    assert first[:2] == (True, -1) and first[2][0][0] == 0
    assert replay[:2] == (True, -1) and replay[2][0][0] == 0, "the replay was admitted and took nothing more"
    assert late[:2] == (True, -1), "still the same call once the short log is empty"
    assert other[0] is False and other[1] == 0, "a different call is refused by the hourly limit"
    client = get_redis().client
    assert client.llen(keys[0]) == 1 and client.llen(keys[1]) == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.value)
def test_application_clock_skew_changes_nothing(redis_mode: str, algorithm: Algorithm,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Two hosts whose clocks disagree by an hour share one window: only the
    # Redis server's clock times the limits.
    limiter = RateLimiter("skew", 2, 60, algorithm=algorithm)
    assert limiter.hit("k").allowed
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    monkeypatch.setattr(time, "time_ns", lambda: int((real() + 3600) * 1e9))
    assert limiter.hit("k").allowed
    refused = limiter.hit("k")
    longest = 120 if algorithm is Algorithm.SLIDING_WINDOW_COUNTER else 60.001
    assert not refused.allowed and refused.retry_after <= longest


def test_postgres_down_in_postgres_mode_falls_back_and_the_decorator_does_not_raise() -> None:
    from mcp_redis.testing import free_port

    mcp_redis.configure(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
                        rate_limits="postgres", retry_attempts=1)

    @rate_limited("pgdown", 1, 60)
    def f(agent_id: str) -> str:
        return "ok"

    assert f("a") == "ok"
    with pytest.raises(RateLimitExceeded):
        f("a")
    assert f.limiter.peek("b").backend == "local"  # type: ignore[attr-defined]
    assert METRICS.counter("ratelimit_fallback_total", backend="postgres", to="local") == 3


def test_no_background_thread_is_started(backend: str) -> None:
    import threading

    limiter = RateLimiter("threads", limits=[(5, 60), (10, 3600)])
    limiter.peek("warm-up")  # the backend's own clients exist before the count
    before = {t.ident for t in threading.enumerate()}
    for _ in range(7):
        limiter.hit("k")
    limiter.peek("k")
    limiter.reset("k")
    assert {t.ident for t in threading.enumerate()} - before == set()


# -- the in-process limiter's bound ---------------------------------------------------
def test_local_bound_never_evicts_live_state_and_refuses_instead() -> None:
    mcp_redis.configure(rate_limits="local")  # default bound: 100,000 entries
    limiter = RateLimiter("bound", 1, 3600)
    assert limiter.hit("first").allowed
    refused_others = sum(not limiter.hit(f"other-{i}").allowed for i in range(120_000))
    assert not limiter.hit("first").allowed
    assert refused_others >= 20_000  # no room for them: refused, never made room by evicting live state
    assert METRICS.counter("ratelimit_local_full_total", limiter="bound") == refused_others


def test_local_bound_is_configurable_and_counted_in_stats() -> None:
    mcp_redis.configure(rate_limits="local", rate_limit_local_maxsize=640)
    limiter = RateLimiter("small", 1, 3600)
    assert limiter.hit("first").allowed
    results = [limiter.hit(f"other-{i}") for i in range(2_000)]
    refusals = [r for r in results if not r.allowed]
    assert len(results) - len(refusals) <= 640
    assert refusals and all(r.retry_after > 0 and r.backend == "local" for r in refusals)
    assert not limiter.hit("first").allowed
    counters = mcp_redis.stats(backends=False)["process"]["rate_limits"]["counters"]
    assert counters["ratelimit_local_full_total{limiter=small}"] == len(refusals)


def test_local_fallback_bound_never_re_admits(redis_factory: Any) -> None:
    _down_redis(redis_factory, rate_limit_local_maxsize=640)
    limiter = RateLimiter("fb-bound", 1, 3600)
    assert limiter.hit("first").backend == "local"
    for i in range(2_000):
        limiter.hit(f"other-{i}")
    refused = limiter.hit("first")
    assert not refused.allowed and refused.backend == "local"


def test_local_bound_frees_room_once_windows_have_passed() -> None:
    from mcp_redis.keys import KeySpace
    from mcp_redis.ratelimit.base import Policy, Spec
    from mcp_redis.ratelimit.memory import MemoryBackend

    store = MemoryBackend(maxsize=64)  # one entry per stripe
    policy = Policy.of(Algorithm.SLIDING_WINDOW, "n", [Spec(1, 1_000_000)], KeySpace("mcp:"))  # 1 per second
    admitted = [k for k in map(str, range(1_000)) if store.acquire(policy, k, 1, True, now_us=10_000_000)[0]]
    assert len(admitted) == 64
    # Still inside the window: a new key is refused (and a peek says so), an admitted one stays refused.
    assert not store.acquire(policy, "late", 1, False, now_us=10_500_000)[0]
    assert not store.acquire(policy, "late", 1, True, now_us=10_500_000)[0]
    assert not store.acquire(policy, admitted[0], 1, True, now_us=10_500_000)[0]
    # Once the window has passed, the expired entries make room.
    assert store.acquire(policy, "late", 1, True, now_us=11_000_001)[0]


@pytest.mark.parametrize("value", [0, 63, 1.5, True, "100"])
def test_bad_local_bound_names_the_setting(value: Any) -> None:
    with pytest.raises(mcp_redis.ConfigurationError, match="rate_limit_local_maxsize"):
        mcp_redis.configure(rate_limit_local_maxsize=value)
