"""Sentences of the docs that no other test backed: each test names the doc it checks."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import redis

import mcp_redis
from mcp_redis.compat import StateLockManager
from mcp_redis.testing import wait_for
from tests.cache.test_cache import Clock, use_clock

LIVE = r"L[0-9a-f]{24}\|"
NONCE = r"[0-9a-f]{32}"


def _raw(redis_url: str, key: str) -> object:
    return redis.Redis.from_url(redis_url, decode_responses=True).get(key)


# docs/locks.md (acquire(token=...), Keys), README.md: the lock key's value format.
def test_lock_key_holds_liveness_id_then_token_and_nonce(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims", timeout=10)
    assert lk.acquire(token="job-42")
    try:
        value = _raw(redis_mode, "mcp:lock:{doc-claims}")
        assert isinstance(value, str) and re.fullmatch(LIVE + r"job-42:" + NONCE, value), value
        assert value.split("|", 1)[1].startswith("job-42:")
    finally:
        lk.release()


def test_lock_key_without_token_holds_liveness_id_then_nonce(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims", timeout=10)
    assert lk.acquire()
    try:
        value = _raw(redis_mode, "mcp:lock:{doc-claims}")
        assert isinstance(value, str) and re.fullmatch(LIVE + NONCE, value), value
    finally:
        lk.release()


# docs/locks.md: "`sleep` is accepted and ignored".
def test_lock_with_sleep_given_acquires_and_releases_like_without(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims-sleep", timeout=10, sleep=5.0)
    assert lk.acquire(blocking_timeout=1)
    assert lk.owned()
    other = mcp_redis.lock("doc-claims-sleep", timeout=10, sleep=5.0, thread_local=False)
    assert other.acquire(blocking=False) is False
    lk.release()
    assert _raw(redis_mode, "mcp:lock:{doc-claims-sleep}") is None
    assert other.acquire(blocking=False) is True
    other.release()


# docs/locks.md (Keys): the `…#e<id>` extend record expires after 10.75 s with the defaults.
def test_extend_record_expires_after_the_retry_window(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims-extend", timeout=10)
    assert lk.acquire()
    try:
        assert lk.extend(5)
        r = redis.Redis.from_url(redis_mode, decode_responses=True)
        records = [k for k in r.scan_iter("mcp:lock:{doc-claims-extend}#e*")]
        assert len(records) == 1, records
        assert re.fullmatch(r"mcp:lock:\{doc-claims-extend\}#e[0-9a-f]{24}", records[0])
        assert 10_000 < r.pttl(records[0]) <= 10_750
    finally:
        lk.release()


# docs/reliability.md (Failover): the default policy.
def test_default_policy_is_3_attempts_20_to_250_ms_breaker_5_reset_1_s() -> None:
    s = mcp_redis.settings()
    assert s.retry_attempts == 3
    assert s.retry_initial_backoff == 0.02
    assert s.retry_max_backoff == 0.25
    assert s.breaker_failure_threshold == 5
    assert s.breaker_reset_timeout == 1.0


# docs/migration.md (Agent ids in local mode): the compat lock refuses ids that name no file.
@pytest.mark.parametrize("agent_id", ["a/b", "a\x00b", ".", "..", "\ud800", "x" * 300, "é" * 126])
def test_compat_lock_in_local_mode_refuses_ids_that_name_no_file(agent_id: str, tmp_path: Path) -> None:
    mcp_redis.configure(locks="local")
    manager = StateLockManager(lock_dir=str(tmp_path))
    with pytest.raises(ValueError, match="agent_id") as info:
        with manager.acquire_agent_lock(agent_id, timeout=0.5, max_retries=1):
            pass
    assert isinstance(info.value, mcp_redis.InvalidArgument)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("agent_id", ["agent-1", "x" * 250, "é" * 125])
def test_compat_lock_in_local_mode_accepts_an_id_that_names_a_file(agent_id: str, tmp_path: Path) -> None:
    mcp_redis.configure(locks="local")
    manager = StateLockManager(lock_dir=str(tmp_path))
    with manager.acquire_agent_lock(agent_id, timeout=0.5, max_retries=1):
        pass


# -- docs/cache.md ---------------------------------------------------------------------------
def _cache_clock(monkeypatch: pytest.MonkeyPatch, perf_step: float = 0.0) -> Clock:
    """The cache modules read a controllable clock (tests/cache/test_cache.py's)."""
    clock = Clock(perf_step)
    use_clock(monkeypatch, clock)
    return clock


def _loader(namespace: str, loads: List[str], rows: Dict[str, int], **options: Any) -> Any:
    @mcp_redis.cached_metadata(namespace=namespace, **options)
    def get_agent_metadata(agent_id: str) -> Dict[str, int]:
        loads.append(agent_id)
        return {"version": rows.get(agent_id, 0)}

    return get_agent_metadata


def _listening(fn: Any) -> None:
    """Start the invalidation listener, whose first subscription flushes L1, and let it pass."""
    fn("listener-warmup")
    assert mcp_redis.cache.wait_for_listener(10)
    fn.cache_clear()
    fn.invalidate("listener-warmup")


def _rclient(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def _keys_ending(url: str, suffix: str) -> List[str]:
    return [k for k in _rclient(url).keys("mcp:cache:*") if k.endswith(suffix)]


# docs/cache.md (Options): `l1_ttl` is "capped by `ttl`".
def test_l1_copy_lives_no_longer_than_ttl_even_when_l1_ttl_is_longer(redis_mode: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _cache_clock(monkeypatch)
    monkeypatch.setattr(random, "uniform", lambda a, b: b)  # jitter +50 %: the L2 entry lives 15 s
    load = _loader("doc.l1cap", [], {}, ttl=10, l1_ttl=30, jitter=0.5, beta=0)
    _listening(load)
    load("a1")
    clock.offset = 9
    load("a1")
    assert load.cache_info().l1_hits == 1
    clock.offset = 12  # past ttl (10 s), before l1_ttl (30 s) and the L2 expiry (15 s)
    load("a1")
    info = load.cache_info()
    assert (info.l1_hits, info.l2_hits) == (1, 1), info


# docs/cache.md (Options): `l1_ttl` is "capped ... by the L2 entry's remaining life".
def test_l1_copy_read_from_l2_lives_no_longer_than_the_l2_entry(redis_mode: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _cache_clock(monkeypatch)
    loads: List[str] = []
    rows: Dict[str, int] = {}
    writer = _loader("doc.l2cap", loads, rows, ttl=60, l1_ttl=30, jitter=0, beta=0)
    reader = _loader("doc.l2cap", loads, rows, ttl=60, l1_ttl=30, jitter=0, beta=0)
    _listening(reader)
    loads.clear()
    writer("a1")  # L2 entry expires at +60 s
    clock.offset = 50
    assert reader("a1") == {"version": 0}  # L2 hit: an L1 copy for 10 s, not 30
    assert reader.cache_info().l2_hits == 1
    rows["a1"] = 1
    clock.offset = 55
    assert reader("a1") == {"version": 0} and reader.cache_info().l1_hits == 1
    clock.offset = 61  # the L2 entry has expired; a 30 s L1 copy would still answer
    assert reader("a1") == {"version": 1}
    assert loads == ["a1", "a1"]


# docs/cache.md (LRU): `maxsize` "(least recently used out)".
def test_l1_evicts_the_least_recently_used_entry(redis_mode: str) -> None:
    load = _loader("doc.lru", [], {}, maxsize=2)
    _listening(load)
    load("a")
    load("b")
    load("a")  # "a" is now the most recently used
    load("c")  # evicts "b"
    info = load.cache_info()
    assert (info.l1_hits, info.l1_size) == (1, 2)
    load("a")
    assert load.cache_info().l1_hits == 2  # kept
    load("b")
    info = load.cache_info()
    assert (info.l1_hits, info.l2_hits) == (2, 1)  # evicted from L1: read from L2


# docs/cache.md (No stale write-back): "Epochs never repeat, even after their key
# expired: each is at least the server's clock in ms."
def test_epochs_are_at_least_the_server_clock_in_ms_and_never_repeat(redis_mode: str) -> None:
    r = _rclient(redis_mode)
    load = _loader("doc.epoch", [], {})
    sec, usec = r.time()
    before = sec * 1000 + usec // 1000
    load.invalidate("a1")
    [epoch_key] = _keys_ending(redis_mode, "#epoch")
    first = int(r.get(epoch_key))  # type: ignore[arg-type]
    sec, usec = r.time()
    assert before <= first <= sec * 1000 + usec // 1000
    r.delete(epoch_key)  # as if it had expired: its TTL had passed, so the clock had moved on
    def server_ms() -> int:
        sec, usec = r.time()
        return int(sec) * 1000 + int(usec) // 1000

    wait_for(lambda: server_ms() > first, 5, what="the server clock past the first epoch")
    load.invalidate("a1")
    second = int(r.get(epoch_key))  # type: ignore[arg-type]
    assert second > first
    ahead = second + 10**9  # an epoch ahead of the server's clock: the next one is still larger
    r.set(epoch_key, ahead)
    load.invalidate("a1")
    assert int(r.get(epoch_key)) == ahead + 1  # type: ignore[arg-type]


# docs/cache.md (No stale write-back): "a load slower than half that (≥ 300 s) is not
# written back" (half the generation key's life: max(2 × (ttl × 1.1 + max_stale), 600 s)).
# Half of it: 300 s for ttl=10, 440 s for ttl=400 (440.00000000000006 in floats, so 441).
@pytest.mark.parametrize("ttl,fast,slow", [(10, 299.0, 300.0), (400, 439.0, 441.0)])
def test_a_load_slower_than_half_the_guard_ttl_is_not_written_back(redis_mode: str, monkeypatch: pytest.MonkeyPatch,
                                                                 ttl: int, fast: float, slow: float) -> None:
    clock = _cache_clock(monkeypatch, perf_step=fast)
    load = _loader(f"doc.slow{ttl}", [], {}, ttl=ttl)
    r = _rclient(redis_mode)
    load("fast")
    assert [json.loads(r.get(k))["v"] for k in _keys_ending(redis_mode, "}")] == [{"version": 0}]  # written back
    clock.perf_step = slow
    load("slow")
    assert len(_keys_ending(redis_mode, "}")) == 1  # not written back
    assert load("slow") == {"version": 0}  # the caller still got its value (from L1)


# docs/cache.md (XFetch, Every key expires): the refresh lock lives 0.25-10 s (≤ 10 s).
@pytest.mark.parametrize("load_seconds,low,high", [(0.01, 100, 250), (5.0, 9_000, 10_000)])
def test_the_early_refresh_lock_lives_between_a_quarter_second_and_ten_seconds(
        redis_mode: str, monkeypatch: pytest.MonkeyPatch, load_seconds: float, low: int, high: int) -> None:
    clock = _cache_clock(monkeypatch, perf_step=load_seconds)
    load = _loader("doc.refresh", [], {}, ttl=10, jitter=0)
    load("a1")
    clock.offset = 9.9  # 0.1 s left: with rand -> 1, XFetch fires for either load time
    monkeypatch.setattr(random, "random", lambda: 1.0 - 2**-53)
    load("a1")
    assert load.cache_info().early_refreshes == 1
    [lock] = _keys_ending(redis_mode, "#refresh")
    assert low < _rclient(redis_mode).pttl(lock) <= high


# docs/cache.md (invalidate_all): the generation key lives
# `max(2 × (ttl × 1.1 + max_stale), 600 s)` and every read of it renews that.
@pytest.mark.parametrize("ttl,max_stale,life_ms", [(10, None, 600_000), (1000, 100, 2_400_000)])
def test_the_generation_key_lives_as_documented_and_each_read_renews_it(
        redis_mode: str, ttl: int, max_stale: Any, life_ms: int) -> None:
    r = _rclient(redis_mode)
    load = _loader(f"doc.gen{ttl}", [], {}, ttl=ttl, max_stale=max_stale)
    load.invalidate_all()
    gen_key = f"mcp:cache:doc.gen{ttl}#gen"
    assert life_ms - 5_000 < r.pttl(gen_key) <= life_ms
    r.pexpire(gen_key, 5_000)
    load.cache_clear()  # forget the cached generation: the next call reads it
    load("a1")
    assert life_ms - 5_000 < r.pttl(gen_key) <= life_ms


# docs/cache.md (Fallback policy): invalidations Redis missed are remembered "up to
# 10,000 keys, then it becomes an `invalidate_all`".
@pytest.mark.long
@pytest.mark.parametrize("count", [10_000, 10_001])
def test_pending_invalidations_past_ten_thousand_become_one_invalidate_all(redis_factory: Any, count: int) -> None:
    server = redis_factory()
    down = dict(retry_attempts=1, breaker_failure_threshold=1, socket_connect_timeout=0.2)
    mcp_redis.configure(redis_url=server.url, breaker_reset_timeout=60, **down)
    load = _loader("doc.pending", [], {})
    load("warm")
    server.kill()
    for i in range(count):
        load.invalidate(f"k{i}")
    assert load._pending_all is (count > 10_000)
    assert len(load._pending) == (0 if count > 10_000 else count)
    server.start()
    mcp_redis.configure(redis_url=server.url, breaker_reset_timeout=0.2, **down)
    load("warm")  # an L2 read replays what is pending first
    r = _rclient(server.url)
    epochs = _keys_ending(server.url, "#epoch")
    if count > 10_000:
        assert r.get("mcp:cache:doc.pending#gen") is not None and epochs == []
    else:
        assert r.get("mcp:cache:doc.pending#gen") is None and len(epochs) == count


# -- docs/ratelimit.md -------------------------------------------------------------------
# docs/ratelimit.md (Options): "`window` (seconds, float ≥ 0.001 ...)".
def test_rate_limit_window_is_at_least_a_millisecond(redis_mode: str) -> None:
    assert mcp_redis.RateLimiter("doc-window", 5, 0.001).hit("k").allowed
    assert mcp_redis.RateLimiter("doc-windows", limits=[(5, 0.001), (9, 60)]).hit("k").allowed
    for make in (lambda: mcp_redis.RateLimiter("doc-window", 5, 0.0009),
                 lambda: mcp_redis.RateLimiter("doc-windows", limits=[(5, 0.0009)]),
                 lambda: mcp_redis.rate_limited("doc-window", limit=5, window=0.0009)):
        with pytest.raises(mcp_redis.InvalidArgument) as info:
            make()
        assert info.value.argument == "window"


# docs/ratelimit.md (When Redis does not answer): "Redis is used again as soon as it
# answers (the breaker's half-open probe), logged at INFO."
def test_rate_limiting_back_on_redis_after_an_outage_is_logged_at_info(redis_factory: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=1, breaker_reset_timeout=0.2,
                        socket_connect_timeout=0.2)
    limiter = mcp_redis.RateLimiter("doc-back", 100, 60)
    with caplog.at_level(logging.INFO, logger="mcp_redis.ratelimit"):
        assert limiter.hit("k").backend == "redis"
        server.kill()
        assert limiter.hit("k").backend == "local"
        assert not [r for r in caplog.records if r.levelno == logging.INFO]
        server.start()
        wait_for(lambda: limiter.hit("k").backend == "redis", 10, what="back on redis")
    infos = [r for r in caplog.records if r.name == "mcp_redis.ratelimit" and r.levelno == logging.INFO]
    assert len(infos) == 1 and "answers again" in infos[0].getMessage(), [r.getMessage() for r in infos]


# -- docs/events.md -------------------------------------------------------------------------
# docs/events.md (Consumer names): "`consume()`/`run_in_thread` call it [prune_consumers]
# once an hour" (run_in_thread runs consume()).
def test_consume_prunes_consumers_once_an_hour(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mcp_redis.events import EventStream
    from mcp_redis.events import consumer as consumer_mod

    clock = Clock(0.0)
    monkeypatch.setattr(consumer_mod, "time", clock)
    stream = EventStream("doc-prune", "g", "c")
    stream.add_many([{"n": i} for i in range(4)])
    prunes: List[int] = []
    monkeypatch.setattr(EventStream, "prune_consumers", lambda self, *a, **k: prunes.append(len(seen)) or 0)
    seen: List[Any] = []
    offsets = {0: 1800.0, 1: 3599.0, 2: 3600.0}

    def handler(event: Dict[str, Any]) -> None:
        seen.append(event)
        clock.offset = offsets.get(event["n"], clock.offset)

    assert stream.consume(handler, count=1, block_ms=0, max_events=4) == 4
    assert prunes == [3]  # once, after an hour: before the 4th event, not before


# docs/events.md (max_deliveries): the dead-letter stream is
# "`<prefix>stream:{name}#dead`, same bound and TTL".
def test_the_dead_letter_stream_has_the_documented_key_bound_and_ttl(redis_mode: str) -> None:
    from mcp_redis.events import EventStream

    r = _rclient(redis_mode)
    s = EventStream("doc-dead", "g", "c", min_idle_ms=0, claim_interval=0, max_deliveries=1, maxlen=10, ttl=60)

    def handler(event: Dict[str, Any]) -> None:
        raise ValueError("poison")

    for _ in range(25):  # 10 at a time: the stream itself keeps about maxlen entries
        s.add_many([{"n": i} for i in range(10)])
        assert s.process(handler, count=10, block_ms=0) == (0, 10)  # delivery 1
        assert s.process(handler, count=10, block_ms=0) == (0, 0)  # delivery 2: dead-lettered instead
    assert s.dead_lettered == 250 and s.pending() == 0
    assert s.dead_letter_key == "mcp:stream:{doc-dead}#dead"
    assert r.exists("mcp:stream:{doc-dead}#dead")
    assert 10 <= r.xlen(s.dead_letter_key) < 250  # MAXLEN ~ maxlen, like the stream
    assert 55_000 < r.pttl(s.dead_letter_key) <= 60_000
