"""Specification of the metadata cache (`@cached_metadata`) on a real redis-server."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Dict, List

import pytest
import redis

import mcp_redis
from mcp_redis.cache import CachedFunction, cached_metadata, invalidation, wait_for_listener
from mcp_redis.cache import batch as cache_batch
from mcp_redis.cache import function as cache_function
from mcp_redis.cache.flight import Flight
from mcp_redis.client import default_client
from mcp_redis.connections import get_redis
from mcp_redis.errors import InvalidArgument, InvalidArgumentType
from mcp_redis.testing import wait_for


def values_in_redis(url: str) -> Dict[str, Any]:
    """Every cached value in L2 (not epochs, generations or locks), decoded."""
    client = redis_client(url)
    out = {}
    for key in client.keys("mcp:cache:*"):
        raw = client.get(key)
        if "#" not in key and raw is not None:
            out[key] = json.loads(raw)["v"]
    return out


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


class Source:
    """A fake table: the loader's source of truth, counting loads."""

    def __init__(self) -> None:
        self.rows: Dict[str, Any] = {}
        self.loads: List[str] = []
        self.lock = threading.Lock()

    def load(self, agent_id: str) -> Any:
        with self.lock:
            self.loads.append(agent_id)
            return self.rows.get(agent_id, {"agent_id": agent_id, "version": 0})


def make(source: Source, **options: Any) -> CachedFunction[Any]:
    options.setdefault("namespace", "tests.meta")

    @cached_metadata(**options)
    def get_agent_metadata(agent_id: str) -> Any:
        return source.load(agent_id)

    return get_agent_metadata


def listening(fn: CachedFunction[Any]) -> None:
    """Start the process's invalidation listener and let its first flush pass."""
    fn.cache_clear()
    fn("listener-warmup")
    assert wait_for_listener(10)
    fn.invalidate("listener-warmup")
    fn.cache_clear()


class Clock:
    """A controllable clock for the cache module: `offset` shifts wall and
    monotonic time; every perf_counter() call advances `perf_step` seconds
    (so a load appears to take that long)."""

    def __init__(self, perf_step: float = 0.0) -> None:
        self.offset = 0.0
        self.perf_step = perf_step
        self.perf = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def perf_counter(self) -> float:
        self.perf += self.perf_step
        return self.perf

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def use_clock(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    """Make the cache's modules read `clock` instead of the time module."""
    for module in (cache_function, cache_batch):
        monkeypatch.setattr(module, "time", clock)


# -- the basic contract ------------------------------------------------------------
def test_second_call_is_an_l1_hit_and_the_loader_runs_once(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    listening(load)
    source.loads.clear()
    assert load("a1") == {"agent_id": "a1", "version": 0}
    assert load("a1") == {"agent_id": "a1", "version": 0}
    info = load.cache_info()
    assert source.loads == ["a1"]
    assert (info.l1_hits, info.misses) == (1, 2)  # the warm-up was a miss too


def test_value_loaded_by_one_process_is_an_l2_hit_for_another(redis_mode: str) -> None:
    source = Source()
    first, second = make(source), make(source)  # same namespace: the same L2 entries
    first("a1")
    assert second("a1") == {"agent_id": "a1", "version": 0}
    assert source.loads == ["a1"]
    assert second.cache_info().l2_hits == 1


def test_bare_decorator_reads_ttl_from_settings_when_called(redis_url: str) -> None:
    @cached_metadata
    def get_agent_metadata(agent_id: str) -> Dict[str, str]:
        return {"agent_id": agent_id}

    mcp_redis.configure(redis_url=redis_url, metadata_ttl=1000)  # after decoration
    get_agent_metadata("a1")
    client = redis_client(redis_url)
    [key] = [k for k in client.keys("mcp:cache:*") if "#" not in k]
    assert 1000 * 0.9 * 1000 - 5000 <= client.pttl(key) <= 1000 * 1.1 * 1000


def test_l2_ttls_are_jittered_within_ten_percent(redis_mode: str) -> None:
    load = make(Source(), ttl=100)
    for i in range(40):
        load(f"a{i}")
    client = redis_client(redis_mode)
    ttls = [client.pttl(k) for k in client.keys("mcp:cache:*") if "#" not in k]
    assert len(ttls) == 40
    assert all(89_000 <= t <= 110_000 for t in ttls)
    assert max(ttls) - min(ttls) > 2_000  # not all written to expire together


def test_every_key_the_cache_writes_has_a_ttl(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Source()
    load = make(source, ttl=60, negative_ttl=5, lock_ttl=5)
    load("a1")
    load.invalidate("a1")
    load("a1")
    load.set({"agent_id": "a2"}, "a2")
    load.get_many(["a3", "a4", "a1"])
    load.invalidate_all()
    load("a5")
    use_clock(monkeypatch, Clock(perf_step=5.0))  # loads take 5 s
    load("a6")
    monkeypatch.setattr(random, "random", lambda: 0.999999)  # 5 s * 13.8 > ttl: refresh early
    load("a6")
    client = redis_client(redis_mode)
    keys = client.keys("*")
    assert any(k.endswith("#refresh") for k in keys) and any(k.endswith("#gen") for k in keys)
    assert all(client.pttl(k) > 0 for k in keys), {k: client.pttl(k) for k in keys}
    assert all(k.startswith("mcp:") for k in keys)


def test_keyword_and_positional_calls_share_an_entry(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    load("a1")
    load(agent_id="a1")
    assert source.loads == ["a1"]


def test_distinct_arguments_never_share_a_key(redis_mode: str) -> None:
    calls: List[Any] = []

    @cached_metadata(namespace="tests.pairs")
    def lookup(kind: Any, name: Any = None) -> List[Any]:
        calls.append((kind, name))
        return [kind, name]

    pairs = [("1", None), (1, None), (1.5, None), (True, None), ("a", "b"), ("a,b", None), ('["a"', '"b"]'),
             ("a:b", None), ("*", None), ("x\n\x00", None), ({"k": 1}, None), ([1, 2], None), ("", "")]
    for kind, name in pairs:
        assert lookup(kind, name) == [kind, name] or isinstance(kind, dict) or isinstance(kind, list)
    for kind, name in pairs:
        lookup(kind, name)
    assert len(calls) == len(pairs)  # one load each, then hits
    assert len(values_in_redis(redis_mode)) == len(pairs)


@pytest.mark.parametrize("bad, error", [(None, TypeError), ("", ValueError), ("x" * 1025, ValueError),
                                        (7, TypeError)])
def test_bad_ids_raise_naming_the_argument_before_anything_is_written(redis_mode: str, bad: Any,
                                                                     error: type) -> None:
    load = make(Source())
    for call in (lambda: load(bad), lambda: load.invalidate(bad), lambda: load.set({}, bad),
                 lambda: load.get_many(["ok", bad])):
        with pytest.raises(error, match="agent_id"):
            call()
    assert redis_client(redis_mode).keys("*") == []


def test_arguments_json_cannot_hold_are_refused(redis_mode: str) -> None:
    @cached_metadata(namespace="tests.objects")
    def lookup(query: Any) -> int:
        return 1

    with pytest.raises(TypeError, match="query"):
        lookup(object())
    with pytest.raises(ValueError, match="query"):
        lookup(float("nan"))
    assert redis_client(redis_mode).keys("*") == []


def test_loader_exception_propagates_unchanged_and_is_not_cached(redis_mode: str) -> None:
    class Boom(Exception):
        pass

    attempts: List[int] = []

    @cached_metadata(namespace="tests.boom")
    def get_agent_metadata(agent_id: str) -> Dict[str, int]:
        attempts.append(1)
        if len(attempts) == 1:
            raise Boom("database said no")
        return {"ok": 1}

    with pytest.raises(Boom, match="database said no"):
        get_agent_metadata("a1")
    assert values_in_redis(redis_mode) == {}
    assert get_agent_metadata("a1") == {"ok": 1}
    assert len(attempts) == 2


def test_none_is_not_cached_unless_negative_ttl_is_set(redis_mode: str) -> None:
    loads: List[str] = []

    def missing(agent_id: str) -> None:
        loads.append(agent_id)

    plain = cached_metadata(namespace="tests.none_plain")(missing)
    negative = cached_metadata(namespace="tests.none_neg", ttl=300, negative_ttl=7)(missing)
    assert plain("a1") is None and plain("a1") is None
    assert len(loads) == 2
    assert negative("a1") is None and negative("a1") is None
    assert len(loads) == 3
    client = redis_client(redis_mode)
    [key] = [k for k in client.keys("mcp:cache:*tests.none_neg*") if "#" not in k]
    assert 0 < client.pttl(key) <= 7_700


def test_values_come_back_as_json_round_trips_them_in_every_tier(redis_mode: str) -> None:
    @cached_metadata(namespace="tests.shape")
    def lookup(agent_id: str) -> Any:
        return {"tags": ("x", "y"), "n": 1}

    first = lookup("a1")
    lookup.cache_clear()
    second = lookup("a1")  # from L2
    assert first == second == {"tags": ["x", "y"], "n": 1}


# -- invalidation ------------------------------------------------------------------
def test_invalidate_evicts_l2_and_l1_so_the_next_read_loads_the_new_value(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    assert load("a1")["version"] == 0
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    load.invalidate("a1")
    assert values_in_redis(redis_mode) == {}
    assert load("a1")["version"] == 1
    assert load.cache_info().invalidations == 1


def test_invalidate_during_load_never_writes_back_stale_value(redis_mode: str) -> None:
    """A slow load that started before an invalidation fills neither tier."""
    source = Source()
    loading, release = threading.Event(), threading.Event()
    slow_once: List[bool] = [True]

    @cached_metadata(namespace="tests.race")
    def get_agent_metadata(agent_id: str) -> Any:
        value = source.load(agent_id)  # reads the old row...
        if agent_id == "a1" and slow_once and slow_once.pop():
            loading.set()
            assert release.wait(10)  # ...and is still running when the update lands
        return value

    listening(get_agent_metadata)
    result: List[Any] = []
    reader = threading.Thread(target=lambda: result.append(get_agent_metadata("a1")))
    reader.start()
    assert loading.wait(10)
    source.rows["a1"] = {"agent_id": "a1", "version": 1}  # the update commits...
    get_agent_metadata.invalidate("a1")  # ...then invalidates, mid-load
    release.set()
    reader.join(10)
    assert result == [{"agent_id": "a1", "version": 0}]  # the caller gets what it loaded
    assert values_in_redis(redis_mode) == {}  # but L2 was not filled with it
    assert get_agent_metadata("a1") == {"agent_id": "a1", "version": 1}  # nor L1


@pytest.mark.parametrize("value,error", [({"tags": {"x", "y"}}, InvalidArgumentType),
                                         ({"score": float("nan")}, InvalidArgument)], ids=["set", "nan"])
def test_set_of_a_value_json_cannot_hold_names_it_and_changes_nothing(redis_mode: str, value: Any,
                                                                     error: type) -> None:
    source = Source()

    @cached_metadata(namespace="tests.set_bad")
    def get_agent_metadata(agent_id: str) -> Any:
        return source.load(agent_id)

    first = get_agent_metadata("a1")
    in_redis = values_in_redis(redis_mode)
    with pytest.raises(error, match="value"):
        get_agent_metadata.set(value, "a1")
    assert values_in_redis(redis_mode) == in_redis, "L2 unchanged"
    assert get_agent_metadata("a1") == first and len(source.loads) == 1, "L1 unchanged: no reload"


def test_misses_that_cache_nothing_leave_no_key_behind(redis_mode: str) -> None:
    # Each miss leaves a guard marker before its load; a load that writes
    # nothing back (None uncached, the loader raising) takes it away.
    @cached_metadata(namespace="tests.nothing_left")
    def lookup(agent_id: str) -> Any:
        if agent_id.startswith("boom"):
            raise LookupError(agent_id)
        return None

    for i in range(20):
        assert lookup(f"none-{i}") is None
        with pytest.raises(LookupError):
            lookup(f"boom-{i}")
    assert lookup.get_many([f"batch-{i}" for i in range(20)], loader=lambda ids: {i: None for i in ids}) == {
        f"batch-{i}": None for i in range(20)}
    client = redis_client(redis_mode)
    assert [k for k in client.keys("mcp:cache:*") if "tests.nothing_left" in k] == []


@pytest.mark.parametrize("batch", [False, True], ids=["call", "get_many"])
def test_a_load_across_a_redis_restart_never_writes_back_a_value_invalidated_meanwhile(
        redis_factory: Any, batch: bool) -> None:
    # The load reads the old row; the row changes and is invalidated; Redis
    # restarts without persistence, losing the epoch; the load ends. Were
    # "no epoch" compared with "no epoch", the old value would be written
    # back, for every process to read for the whole TTL.
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    rows = {"a1": "OLD"}
    loading, release = threading.Event(), threading.Event()

    def slow(agent_id: str) -> Any:
        value = {"v": rows[agent_id]}
        if threading.current_thread().name == "slow":
            loading.set()
            assert release.wait(10)
        return value

    @cached_metadata(namespace="tests.restart_stale", ttl=300)
    def meta(agent_id: str) -> Any:
        return slow(agent_id)

    out: Dict[str, Any] = {}

    def target() -> None:
        if batch:
            out["slow"] = meta.get_many(["a1"], loader=lambda ids: {i: slow(i) for i in ids})
        else:
            out["slow"] = meta("a1")
    reader = threading.Thread(target=target, name="slow")
    reader.start()
    assert loading.wait(10)
    rows["a1"] = "NEW"
    meta.invalidate("a1")
    server.restart()
    release.set()
    reader.join(30)
    assert out["slow"] in ({"v": "OLD"}, {"a1": {"v": "OLD"}}), "the caller gets what it loaded"
    assert values_in_redis(server.url) == {}, "but L2 was not filled with it"
    meta.cache_clear()
    assert meta("a1") == {"v": "NEW"}
    assert [k for k in redis_client(server.url).keys("*") if redis_client(server.url).pttl(k) < 0] == []


def test_set_during_load_wins_over_the_stale_load(redis_mode: str) -> None:
    source = Source()
    loading, release = threading.Event(), threading.Event()

    @cached_metadata(namespace="tests.race_set")
    def get_agent_metadata(agent_id: str) -> Any:
        value = source.load(agent_id)
        if len(source.loads) == 1:
            loading.set()
            assert release.wait(10)
        return value

    reader = threading.Thread(target=get_agent_metadata, args=("a1",))
    reader.start()
    assert loading.wait(10)
    get_agent_metadata.set({"agent_id": "a1", "version": 5}, "a1")
    release.set()
    reader.join(10)
    assert list(values_in_redis(redis_mode).values()) == [{"agent_id": "a1", "version": 5}]
    get_agent_metadata.cache_clear()
    assert get_agent_metadata("a1") == {"agent_id": "a1", "version": 5}
    assert len(source.loads) == 1


def test_refresh_reloads_and_writes_through(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    other = make(source)
    load("a1")
    other("a1")
    source.rows["a1"] = {"agent_id": "a1", "version": 2}
    assert load.refresh("a1") == {"agent_id": "a1", "version": 2}
    assert other("a1") == {"agent_id": "a1", "version": 2}  # its L1 copy was dropped, L2 has the new one
    assert list(values_in_redis(redis_mode).values()) == [{"agent_id": "a1", "version": 2}]


def test_invalidate_all_is_one_generation_bump_that_hides_every_entry(redis_mode: str) -> None:
    source = Source()
    load, other = make(source), make(source)
    for i in range(5):
        load(f"a{i}")
    other("a0")
    before = len(source.loads)
    client = redis_client(redis_mode)
    client.config_resetstat()
    load.invalidate_all()
    stats = client.info("commandstats")
    assert "cmdstat_scan" not in stats and "cmdstat_del" not in stats
    source.rows["a0"] = {"agent_id": "a0", "version": 9}
    assert other("a0")["version"] == 9
    load("a1")
    assert len(source.loads) == before + 2


def test_invalidate_all_from_another_process_reaches_this_one(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    listening(load)
    load("a1")
    # What another process's invalidate_all sends: a new generation on the channel.
    gen_key = "mcp:cache:tests.meta#gen"
    client = redis_client(redis_mode)
    client.set(gen_key, "424242", px=600_000)
    client.publish("mcp:cache:invalidate", json.dumps({"o": "elsewhere", "n": "tests.meta", "op": "a",
                                                       "g": "424242"}))
    wait_for(lambda: load.cache_info().l1_size == 0, 2, what="L1 flushed by the message")
    source.rows["a1"] = {"agent_id": "a1", "version": 3}
    assert load("a1")["version"] == 3


def test_invalidation_while_redis_is_unreachable_is_replayed_when_it_returns(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    source = Source()
    load = make(source)
    load("a1")
    server.client().save()  # Redis will come back with its data (dump.rdb)
    server.kill()
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    load.invalidate("a1")  # L2 is unreachable: remembered
    assert load.cache_info().errors >= 1
    server.start()
    conn = get_redis()
    wait_for(lambda: conn.policy.available, 5, what="breaker closed")
    other = make(source)  # another process that did not see the invalidation
    assert load("a1")["version"] == 1  # replayed before this L2 read
    assert other("a1")["version"] == 1


def test_a_read_during_a_replay_waits_for_it_instead_of_reading_stale_l2(redis_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The replayer takes the pending queue before it publishes: a read in between must wait for it."""
    from mcp_redis.cache import writes as cache_writes

    mcp_redis.configure(redis_url=redis_url)
    source = Source()
    source.rows["a1"] = {"agent_id": "a1", "version": 0}
    load = make(source)
    load("a1")  # L2 holds version 0
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    load.cache_clear()  # L1 evicted, as a local invalidation does while Redis is unreachable
    _, l2id = load._key(("a1",), {})
    with load._lock:
        load._pending[l2id] = None  # ... and the L2 eviction remembered

    publishing, go, reader_waits = threading.Event(), threading.Event(), threading.Event()
    real_publish = cache_writes._publish

    def slow_publish(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "replayer":
            publishing.set()
            assert go.wait(10)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(cache_writes, "_publish", slow_publish)

    class WatchedLock:
        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def __enter__(self) -> Any:
            if threading.current_thread().name == "reader":
                reader_waits.set()
            return self.lock.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return self.lock.__exit__(*exc)

    load._replay_lock = WatchedLock(load._replay_lock)  # type: ignore[assignment]
    replayer = threading.Thread(target=load._replay_pending, name="replayer")
    replayer.start()
    assert publishing.wait(10), "the replayer never reached its publish"
    seen: List[Any] = []
    reader = threading.Thread(target=lambda: seen.append(load("a1")), name="reader")
    reader.start()
    try:
        assert reader_waits.wait(10), "the read went on to L2 while the replay was in flight"
    finally:
        go.set()
        reader.join(10)
        replayer.join(10)
    assert seen == [{"agent_id": "a1", "version": 1}]


# -- single flight -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["redis", "local"])
def test_sixteen_threads_missing_one_key_call_the_loader_once(redis_url: str, mode: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    mcp_redis.configure(redis_url=redis_url, metadata_cache=mode)
    release = threading.Event()
    waiting = []
    original_wait = Flight.wait

    def counting_wait(flight: Any) -> Any:
        waiting.append(1)
        return original_wait(flight)

    monkeypatch.setattr(Flight, "wait", counting_wait)
    loads: List[str] = []

    @cached_metadata(namespace="tests.flight")
    def get_agent_metadata(agent_id: str) -> Dict[str, str]:
        loads.append(agent_id)
        assert release.wait(10)
        return {"agent_id": agent_id}

    release.set()
    if mode == "redis":
        listening(get_agent_metadata)  # its first subscription would flush mid-test
    release.clear()
    loads.clear()
    barrier = threading.Barrier(16)
    results: List[Any] = []

    def worker() -> None:
        barrier.wait()
        results.append(get_agent_metadata("hot"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: len(waiting) == 15 and len(loads) == 1, 10, what="15 followers behind one leader")
    release.set()
    for t in threads:
        t.join(10)
    assert loads == ["hot"]
    assert results == [{"agent_id": "hot"}] * 16


# -- early refresh, stale, modes ------------------------------------------------------
def test_xfetch_refreshes_a_hot_key_before_it_expires(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_clock(monkeypatch, Clock(perf_step=1.0))  # loads take 1 s
    source = Source()
    load = make(source, ttl=30, beta=1.0)
    load("a1")
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    assert load("a1")["version"] == 0  # an ordinary hit: far from expiry
    # rand -> 1: -delta*beta*ln(1-rand) = 36.7 s > 33 s left: this read recomputes.
    monkeypatch.setattr(random, "random", lambda: 1.0 - 2**-53)
    assert load("a1")["version"] == 1
    monkeypatch.undo()
    info = load.cache_info()
    assert (info.misses, info.early_refreshes, info.loader_calls) == (1, 1, 2)
    assert list(values_in_redis(redis_mode).values()) == [{"agent_id": "a1", "version": 1}]


def test_xfetch_with_beta_zero_never_refreshes_early(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_clock(monkeypatch, Clock(perf_step=1.0))
    source = Source()
    load = make(source, beta=0)
    load("a1")
    monkeypatch.setattr(random, "random", lambda: 1.0 - 2**-53)
    load("a1")
    load.cache_clear()
    load("a1")
    assert load.cache_info().early_refreshes == 0 and len(source.loads) == 1


def test_early_refresh_is_claimed_by_one_process_only(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use_clock(monkeypatch, Clock(perf_step=1.0))
    source = Source()
    first, second = make(source, ttl=30), make(source, ttl=30)
    first("a1")
    second("a1")
    monkeypatch.setattr(random, "random", lambda: 1.0 - 2**-53)
    first("a1")  # wins the SET NX refresh lock and reloads
    second("a1")  # finds the lock taken: serves its (still valid) copy
    assert len(source.loads) == 2
    assert second.cache_info().early_refreshes == 0


def test_loader_failure_serves_stale_value_within_max_stale(redis_mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    use_clock(monkeypatch, clock)
    failing = [False]

    @cached_metadata(namespace="tests.stale", ttl=10, jitter=0, max_stale=60, beta=0)
    def get_agent_metadata(agent_id: str) -> Dict[str, int]:
        if failing[0]:
            raise ConnectionError("postgres down")
        return {"version": 1}

    get_agent_metadata("a1")
    failing[0] = True
    clock.offset = 30  # expired 20 s ago, within max_stale
    assert get_agent_metadata("a1") == {"version": 1}
    assert get_agent_metadata.cache_info().stale_served == 1
    clock.offset = 80  # beyond max_stale: the error propagates
    with pytest.raises(ConnectionError):
        get_agent_metadata("a1")


def test_off_mode_calls_the_loader_every_time_and_writes_nothing(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, metadata_cache="off")
    source = Source()
    load = make(source)
    load("a1")
    load("a1")
    assert source.loads == ["a1", "a1"]
    assert redis_client(redis_url).keys("*") == []


def test_local_mode_uses_the_process_cache_only() -> None:
    source = Source()
    load = make(source)  # no REDIS_URL: local mode
    load("a1")
    load("a1")
    load.invalidate("a1")
    load("a1")
    assert source.loads == ["a1", "a1"]
    assert load.cache_info().l1_hits == 1


def test_mode_switch_takes_effect_at_call_time(redis_url: str) -> None:
    source = Source()
    load = make(source)
    mcp_redis.configure(redis_url=redis_url, metadata_cache="off")
    load("a1")
    mcp_redis.configure(metadata_cache="redis")
    load("a1")
    assert len(values_in_redis(redis_url)) == 1


# -- batch ---------------------------------------------------------------------------------
def test_get_many_does_one_mget_one_marker_pipeline_and_one_write_back_pipeline(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    for i in range(0, 1000, 2):
        load(f"a{i}")  # half of them in L2 already
    load.cache_clear()
    batches: List[List[str]] = []

    def batch_loader(ids: List[str]) -> Dict[str, Any]:
        batches.append(ids)
        return {i: {"agent_id": i, "version": 0} for i in ids}

    client = redis_client(redis_mode)
    client.config_resetstat()
    ids = [f"a{i}" for i in range(1000)]
    result = load.get_many(ids, loader=batch_loader)
    stats = client.info("commandstats")
    assert result == {i: {"agent_id": i, "version": 0} for i in ids}
    assert stats["cmdstat_mget"]["calls"] == 1
    # Inside scripts only: the misses' markers (cache_begin.lua, two GETs
    # each: none of them was ever invalidated) and the write-backs (one each).
    assert stats["cmdstat_get"]["calls"] == 500 * 2 + 500
    assert len(batches) == 1 and len(batches[0]) == 500
    assert stats["cmdstat_eval"]["calls"] == 500 + 500  # one pipeline of markers, one of guarded writes
    assert not [k for k in client.keys("mcp:cache:*#epoch")], "each write-back took its marker away"
    load.cache_clear()
    client.config_resetstat()
    assert load.get_many(ids) == result  # now all L2 hits
    assert "cmdstat_eval" not in client.info("commandstats")
    assert load.get_many(ids) == result  # and all L1 hits
    assert len(source.loads) == 500


def test_get_many_without_batch_loader_calls_the_function_per_miss(redis_mode: str) -> None:
    source = Source()
    load = make(source)
    load("a1")
    assert load.get_many(["a1", "a2", "a3", "a2"]) == {f"a{i}": {"agent_id": f"a{i}", "version": 0}
                                                     for i in (1, 2, 3)}
    assert source.loads == ["a1", "a2", "a3"]


def test_forked_child_starts_with_an_empty_l1(redis_mode: str) -> None:
    """The child has no listener yet, so it must not serve the parent's L1."""
    import os

    source = Source()
    load = make(source)
    listening(load)
    load("a1")
    assert load.cache_info().l1_size == 1
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            code = 0 if load.cache_info().l1_size == 0 and load("a1") == {"agent_id": "a1", "version": 0} else 2
        except BaseException as exc:
            print("child failed:", repr(exc))
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert load.cache_info().l1_size == 1  # the parent's L1 is untouched


# -- keys: a property ---------------------------------------------------------------------
def _tagged(value: Any) -> Any:
    """`value` with every scalar's type made explicit (1, 1.0 and True differ)."""
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_tagged(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _tagged(v)) for k, v in value.items())))
    if isinstance(value, float) and value == 0.0:
        return ("float", str(value))  # keep -0.0 and 0.0 apart
    return (type(value).__name__, value)


def test_argument_ids_decode_back_to_the_arguments_so_keys_are_injective() -> None:
    """Every call's argument id decodes to exactly its arguments (a left inverse),
    so distinct arguments can never share a key; KeySpace then encodes the id
    injectively."""
    from hypothesis import given
    from hypothesis import settings as hsettings
    from hypothesis import strategies as hs

    scalars = hs.none() | hs.booleans() | hs.integers() | hs.floats(allow_nan=False, allow_infinity=False) | hs.text()
    values = hs.recursive(scalars, lambda inner: hs.lists(inner, max_size=3) | hs.dictionaries(hs.text(), inner, max_size=3),
                          max_leaves=8)

    @cached_metadata(namespace="tests.injective")
    def lookup(kind: Any, name: Any = None) -> None:
        return None

    @cached_metadata(namespace="tests.injective_one")
    def one(name: str) -> None:
        return None

    @hsettings(max_examples=100, deadline=None)
    @given(values, values, hs.text(min_size=1))
    def check(kind: Any, name: Any, text: str) -> None:
        _, l2id = lookup._key((kind, name), {})
        assert _tagged(json.loads(l2id)) == _tagged([kind, name])
        # the one-str-argument fast path builds the same id as the general path
        assert one._l2id(text, (text,), {}) == one._key((text,), {})[1]

    check()


def test_lock_ttl_makes_a_second_process_wait_for_the_first_ones_load(redis_mode: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-process single flight (optional): two caches of one namespace
    stand for two processes; the second finds the fill lock and waits for L2."""
    loading, release, waiting = threading.Event(), threading.Event(), threading.Event()
    original = CachedFunction._wait_for_fill

    def signalling_wait(self: Any, *args: Any) -> Any:
        waiting.set()
        return original(self, *args)

    monkeypatch.setattr(CachedFunction, "_wait_for_fill", signalling_wait)
    loads: List[str] = []

    def source(agent_id: str) -> Dict[str, str]:
        loads.append(agent_id)
        loading.set()
        assert release.wait(10)
        return {"agent_id": agent_id}

    first = cached_metadata(namespace="tests.fill_lock", lock_ttl=10)(source)
    second = cached_metadata(namespace="tests.fill_lock", lock_ttl=10)(source)
    results: List[Any] = []
    a = threading.Thread(target=lambda: results.append(first("a1")))
    a.start()
    assert loading.wait(10)
    client = redis_client(redis_mode)
    wait_for(lambda: any(k.endswith("#fill") for k in client.keys("*")), 5, what="fill lock taken")
    b = threading.Thread(target=lambda: results.append(second("a1")))
    b.start()
    assert waiting.wait(10)  # the second process is polling L2 behind the lock
    release.set()
    a.join(10)
    b.join(10)
    assert results == [{"agent_id": "a1"}] * 2
    assert loads == ["a1"]
    assert second.cache_info().l2_hits == 1
    assert not any(k.endswith("#fill") for k in client.keys("*"))  # released after the fill


def test_remote_invalidation_of_a_multi_argument_call_evicts_exactly_that_entry(redis_mode: str) -> None:
    calls: List[Any] = []

    @cached_metadata(namespace="tests.multi")
    def lookup(kind: str, limit: int = 10) -> List[Any]:
        calls.append((kind, limit))
        return [kind, limit, len(calls)]

    listening(lookup)
    lookup("a", 1)
    lookup("a", 2)
    lookup("a")
    calls.clear()
    # What another process's invalidate("a", limit=1) publishes (it already deleted L2).
    _, l2id = lookup._key(("a",), {"limit": 1})
    redis_client(redis_mode).publish("mcp:cache:invalidate", json.dumps(
        {"o": "elsewhere", "n": "tests.multi", "op": "k", "k": l2id}))
    wait_for(lambda: lookup.cache_info().l1_size == 2, 2, what="one L1 entry evicted")
    lookup("a", 2)
    lookup("a")
    assert calls == []  # the other entries are still L1 hits


def test_foreign_messages_on_the_invalidation_channel_are_ignored_and_invalidations_still_arrive(
        redis_mode: str, caplog: pytest.LogCaptureFixture) -> None:
    calls: List[Any] = []

    @cached_metadata(namespace="tests.foreign")
    def lookup(agent_id: str) -> int:
        calls.append(agent_id)
        return len(calls)

    listening(lookup)
    lookup("a")
    assert lookup.cache_info().l1_size == 1
    client = redis_client(redis_mode)
    # Not JSON, not an object, and an object nested deeper than json's recursion limit.
    # And objects shaped almost like ours: an op without its argument, an argument id we never wrote.
    for junk in ("not json", "[1]", "42", '{"a":' + "[" * 5000 + "]" * 5000 + "}",
                 '{"n": "tests.foreign", "op": "k"}', '{"n": "tests.foreign", "op": "a"}',
                 '{"n": "tests.foreign", "op": "k", "k": "not json"}', '{"n": "tests.foreign", "op": "k", "k": 7}',
                 '{"n": "tests.foreign", "op": "k", "k": "5"}', '{"n": "tests.foreign", "op": "k", "k": "null"}',
                 '{"n": "tests.foreign", "op": "k", "k": "{\\"a\\": 1}"}'):
        client.publish("mcp:cache:invalidate", junk)
    _, l2id = lookup._key(("a",), {})
    client.publish("mcp:cache:invalidate", json.dumps({"o": "elsewhere", "n": "tests.foreign", "op": "k", "k": l2id}))
    wait_for(lambda: lookup.cache_info().l1_size == 0, 2, what="the invalidation after the junk applied")
    assert invalidation.of(default_client()).subscriber.active
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert len([r for r in caplog.records if "not an invalidation" in r.getMessage()]) <= 1  # logged once


def test_an_undecodable_payload_before_an_invalidation_costs_a_resubscription_and_an_l1_flush(
        redis_mode: str) -> None:
    """A payload that is not UTF-8 cuts the reply stream: redis-py resubscribed under the listener,
    unseen, so the invalidation queued behind it was lost and L1 served the old value until
    l1_ttl (a reviewer). The listener now subscribes anew itself, and L1 is flushed as after any gap."""
    source = {"a": "old"}

    @cached_metadata(namespace="tests.undecodable", ttl=300, l1_ttl=300)
    def lookup(agent_id: str) -> str:
        return source.get(agent_id, "none")

    listening(lookup)
    assert lookup("a") == "old" and lookup.cache_info().l1_size == 1
    subscriber = invalidation.of(default_client()).subscriber
    reconnects = subscriber.reconnects
    source["a"] = "new"
    _, l2id = lookup._key(("a",), {})
    client = redis_client(redis_mode)
    with client.pipeline(transaction=True) as pipe:  # as another process's invalidate(), a junk payload first
        pipe.delete(*client.keys("mcp:cache:{tests.undecodable*"))
        pipe.publish("mcp:cache:invalidate", b"\xff\xfe not utf-8")
        pipe.publish("mcp:cache:invalidate",
                     json.dumps({"o": "elsewhere", "n": "tests.undecodable", "op": "k", "k": l2id}))
        pipe.execute()
    wait_for(lambda: lookup("a") == "new", 10, what="the new value served once L1 is flushed")
    assert subscriber.reconnects == reconnects + 1 and subscriber.active


def test_followers_get_the_leaders_exception(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    waiting: List[int] = []
    original_wait = Flight.wait

    def counting_wait(flight: Any) -> Any:
        waiting.append(1)
        return original_wait(flight)

    monkeypatch.setattr(Flight, "wait", counting_wait)

    class Down(Exception):
        pass

    @cached_metadata(namespace="tests.flight_error")
    def get_agent_metadata(agent_id: str) -> Any:
        if agent_id == "hot":
            assert release.wait(10)
            raise Down(agent_id)
        return None

    listening(get_agent_metadata)
    errors: List[BaseException] = []

    def worker() -> None:
        try:
            get_agent_metadata("hot")
        except Down as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(waiting) == 3, 10, what="3 followers")
    release.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 4 and all(isinstance(e, Down) for e in errors)
    assert get_agent_metadata.cache_info().loader_calls == 2  # warm-up + one load for four callers


# -- invalidations Redis missed: the replayer ---------------------------------------------
@pytest.fixture
def blip(redis_url: str, redis_server: Any) -> Any:
    """The library configured through a fault proxy (``.drop()`` is a Redis blip for this process)."""
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_connect_timeout=0.5, socket_timeout=0.5,
                            retry_attempts=1, breaker_reset_timeout=0.2)
        yield proxy


def replayer() -> Any:
    return invalidation.of(default_client()).thread


def test_writer_only_invalidation_during_a_blip_is_delivered_by_the_replayer_which_then_exits(
        blip: Any, redis_url: str) -> None:
    load = make(Source())
    for version, agent in enumerate(["a1", "a2"]):
        load.set({"agent_id": agent, "version": version}, agent)  # write-through: no read, no listener
        assert len(values_in_redis(redis_url)) == 1
        blip.drop()
        load.invalidate(agent)
        thread = replayer()
        assert thread is not None and thread.is_alive() and thread.daemon
        blip.pass_through()
        thread.join(10)
        assert not thread.is_alive() and replayer() is None  # nothing pending: it exited
        assert values_in_redis(redis_url) == {}  # delivered with no further call of ours
        assert invalidation.of(default_client()).subscriber is None and not load._pending
    # the second blip started a new thread on demand (the loop above joined two threads)


def test_invalidate_all_during_a_blip_is_delivered_by_the_replayer(blip: Any, redis_url: str) -> None:
    load = make(Source())
    load.set({"agent_id": "a1", "version": 0}, "a1")
    blip.drop()
    load.invalidate_all()
    thread = replayer()
    assert thread is not None
    blip.pass_through()
    thread.join(10)
    assert not thread.is_alive()
    assert redis_client(redis_url).get("mcp:cache:tests.meta#gen") not in (None, "0")


def test_reset_stops_the_replayer_and_keeps_what_is_pending(blip: Any, redis_url: str, redis_server: Any) -> None:
    load = make(Source())
    load.set({"agent_id": "a1", "version": 0}, "a1")
    blip.drop()
    load.invalidate("a1")
    thread = replayer()
    assert thread is not None and thread.is_alive()
    mcp_redis.reset()
    assert not thread.is_alive() and replayer() is None
    assert list(load._pending)  # kept: replayed once this process reaches Redis again
    blip.pass_through()
    mcp_redis.configure(redis_url=redis_url)
    load.invalidate("a2")  # the next invalidation (or L2 read) restarts it
    thread = replayer()
    assert thread is not None
    thread.join(10)
    assert values_in_redis(redis_url) == {} and not load._pending


def test_forked_child_has_no_replayer_until_it_needs_one(blip: Any) -> None:
    import os

    load = make(Source())
    blip.drop()
    load.invalidate("a1")
    assert replayer() is not None
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            inherited = replayer()
            load.invalidate("a2")  # still unreachable: the child's own replayer starts
            own = replayer()
            code = 0 if inherited is None and own is not None and own.is_alive() else 2
        except BaseException as exc:
            print("child failed:", repr(exc))
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    blip.pass_through()


@pytest.mark.parametrize("how", ["invalidate", "set", "invalidate_all"])
def test_the_invalidating_process_never_reads_the_old_value_back(redis_mode: str, how: str) -> None:
    # Reader threads of the same process keep missing and refilling L1 while
    # the main thread changes the source and invalidates (or writes through).
    # A reader that read the old L2 value between the local drop and the Redis
    # write must not leave it in L1: this process ignores its own message.
    source = {"v": 0}

    @cached_metadata(ttl=300, namespace=f"same-process-{how}")
    def load(agent_id: str) -> int:
        return source["v"]

    load("a")
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            load("a")

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    stale = 0
    try:
        for _ in range(100):
            source["v"] += 1
            if how == "invalidate":
                load.invalidate("a")
            elif how == "set":
                load.set(source["v"], "a")
            else:
                load.invalidate_all()
            stale += load("a") != source["v"]
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert stale == 0


def test_a_loader_calling_itself_with_the_same_arguments_raises_instead_of_hanging(redis_mode: str) -> None:
    @cached_metadata(ttl=60, namespace="self-call")
    def load(agent_id: str) -> int:
        return load(agent_id)  # a bug in the loader: it would wait for its own flight for ever

    with pytest.raises(RecursionError):
        load("a")


def test_get_many_gives_each_waiting_caller_its_own_ids_outcome(redis_mode: str) -> None:
    # get_many without a batch loader loads id by id: one id's loader raising
    # must not become the exception of a concurrent caller of another id.
    calls: List[str] = []
    started = threading.Event()

    @cached_metadata(ttl=60, namespace="batch-errors")
    def load(agent_id: str) -> Dict[str, str]:
        calls.append(agent_id)
        if agent_id == "a":
            started.set()
            time.sleep(0.3)  # a slow row: the other caller joins its load
        if agent_id == "bad":
            raise LookupError("row 'bad' is corrupt")
        return {"id": agent_id}

    got: List[Any] = []
    joiner = threading.Thread(target=lambda: started.wait(5) and got.append(load("a")))
    joiner.start()
    with pytest.raises(LookupError):
        load.get_many(["a", "bad"])
    joiner.join(10)
    assert got == [{"id": "a"}]
    assert calls == ["a", "bad"]  # "a" loaded once, its value kept
    assert load("a") == {"id": "a"} and calls == ["a", "bad"]


def test_concurrent_writes_in_one_process_leave_l1_as_redis_has_it(redis_mode: str, redis_server: Any) -> None:
    # Two threads write at the same moment: whatever order Redis applied them
    # in, this process must not keep the other one's value in L1 (set), nor an
    # older generation than Redis's (invalidate_all).
    @cached_metadata(ttl=300, namespace="concurrent-writes")
    def load(agent_id: str) -> int:
        return 0

    load("a")
    load.invalidate_all()
    generation_key = "mcp:cache:concurrent-writes#gen"
    raw = redis_server.client()
    for round_ in range(100):
        gate = threading.Barrier(2)

        def write(value: int) -> None:
            gate.wait()
            load.set(value, "a") if value >= 0 else load.invalidate_all()

        pair = (2 * round_, 2 * round_ + 1) if round_ % 2 else (-1, -2)
        threads = [threading.Thread(target=write, args=(v,)) for v in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        if round_ % 2:
            in_l1 = load("a")
            load.cache_clear()
            assert in_l1 == load("a"), f"round {round_}: L1 kept the value Redis overwrote"
        else:
            assert load._gen is not None and int(load._gen[0]) == int(raw.get(generation_key)), \
                f"round {round_}: an older generation than Redis's"


# -- fourth review round: recursion across threads, early refresh, lost claim reply, odd input --
def test_an_async_loader_awaiting_itself_with_the_same_arguments_raises_instead_of_hanging(
        redis_mode: str) -> None:
    """Its inner call runs in another worker thread than the outer one's: the thread id alone
    did not see the call waiting for itself, and it hung for ever."""
    import asyncio

    @cached_metadata(ttl=60, namespace="self-call-async")
    async def load(agent_id: str) -> int:
        return await load(agent_id)  # type: ignore[no-any-return]

    async def call() -> None:
        await asyncio.wait_for(load("a"), 10)  # only a bound on the hang this test is about

    with pytest.raises(RecursionError):
        asyncio.run(call())


def test_async_recursion_through_get_many_and_other_functions_raises_and_a_loaders_own_task_may_wait(
        redis_mode: str) -> None:
    """get_many's loads did not mark themselves as led (an async batch loader awaiting its own
    function hung, and then every later call of that key); f -> g -> f raises too. A task the
    loader starts and does not wait for is no recursion: it waits for the load like any caller
    (the first version of the check raised RecursionError there)."""
    import asyncio

    @cached_metadata(ttl=60, namespace="recursion-batch")
    async def f(agent_id: str) -> str:
        return agent_id

    async def batch_awaiting_itself(ids: List[str]) -> Dict[str, str]:
        return {i: await f(i) for i in ids}

    @cached_metadata(ttl=60, namespace="recursion-g")
    async def g(agent_id: str) -> str:
        return await h(agent_id)  # type: ignore[no-any-return]

    @cached_metadata(ttl=60, namespace="recursion-h")
    async def h(agent_id: str) -> str:
        return await g(agent_id)  # type: ignore[no-any-return]

    background: List[Any] = []

    @cached_metadata(ttl=60, namespace="recursion-background")
    async def audited(agent_id: str) -> str:
        background.append(asyncio.get_running_loop().create_task(audited(agent_id)))  # not awaited here
        return f"value of {agent_id}"

    async def scenario() -> None:
        for call in (lambda: f.get_many(["a", "b"], loader=batch_awaiting_itself), lambda: g("x")):
            with pytest.raises(RecursionError):
                await asyncio.wait_for(call(), 10)  # the bound is only on the hang this is about
        assert await asyncio.wait_for(f("a"), 10) == "a"  # the failed load left nothing hanging
        assert await asyncio.wait_for(audited("u1"), 10) == "value of u1"
        assert await asyncio.wait_for(background[0], 10) == "value of u1"

    asyncio.run(scenario())


def test_async_misses_hold_no_pool_thread_the_loader_may_need(redis_mode: str) -> None:
    """Every miss and every follower held one of the loop's default pool threads (6 on 2 cores)
    for the whole load: ten callers of one cold key whose loader awaits asyncio.to_thread, or a
    loader eight calls deep, waited for ever. Loads run in threads of their own; followers wait
    on the loop."""
    import asyncio
    import concurrent.futures

    loads: List[str] = []

    @cached_metadata(ttl=60, namespace="starve-hot")
    async def hot(agent_id: str) -> str:
        loads.append(agent_id)
        return await asyncio.to_thread(lambda: f"row of {agent_id}")

    @cached_metadata(ttl=60, namespace="starve-deep")
    async def depth(n: int) -> int:
        return 0 if n == 0 else 1 + await depth(n - 1)  # type: ignore[no-any-return]

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        got = await asyncio.wait_for(asyncio.gather(*(hot("a1") for _ in range(10))), 20)
        assert got == ["row of a1"] * 10 and loads == ["a1"]
        assert await asyncio.wait_for(depth(8), 20) == 8

    asyncio.run(scenario())


def test_a_task_the_loader_starts_may_reach_its_key_through_another_cached_function(redis_mode: str) -> None:
    """The first check counted every load in the task's inherited context as its own: a task the
    loader started, without awaiting it, got RecursionError when it reached the loader's key
    through another cached function. Only an await chain back to the loader is recursion."""
    import asyncio

    started: List[Any] = []

    @cached_metadata(ttl=60, namespace="fp-agent")
    async def agent(agent_id: str) -> Dict[str, str]:
        started.append(asyncio.get_running_loop().create_task(summary(agent_id)))  # not awaited here
        return {"id": agent_id}

    @cached_metadata(ttl=60, namespace="fp-summary")
    async def summary(agent_id: str) -> str:
        return f"summary of {(await agent(agent_id))['id']}"

    async def scenario() -> None:
        assert await asyncio.wait_for(agent("a1"), 10) == {"id": "a1"}
        assert await asyncio.wait_for(started[0], 10) == "summary of a1"

    asyncio.run(scenario())


def test_async_loads_survive_a_closed_loop_and_a_stop_iteration_and_serve_the_valid_copy_while_refreshing(
        redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Third review of the coroutine front: a loop closed while its loader ran left the load
    thread waiting for ever and every later caller of the key with it; a StopIteration from a
    loader never woke its caller; callers during an early refresh waited for the whole reload
    instead of getting the still-valid copy, as the plain function's do."""
    import asyncio

    release = threading.Event()

    @cached_metadata(ttl=60, namespace="closed-loop")
    async def slow(agent_id: str) -> str:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return f"value of {agent_id}"

    loop = asyncio.new_event_loop()
    with pytest.raises(asyncio.TimeoutError):
        loop.run_until_complete(asyncio.wait_for(slow("b"), 0.2))
    loop.close()  # the loader task still pending: close() cancels nothing
    # The abandoned load ends (it used to wait for ever, and every later caller of "b" with it).
    wait_for(lambda: not slow.cached_function._flights, 10, what="the abandoned load to end")  # type: ignore[attr-defined]
    release.set()
    assert asyncio.run(asyncio.wait_for(slow("b"), 10)) == "value of b"

    @cached_metadata(ttl=60, namespace="stop-iteration")
    async def plain(agent_id: str) -> str:
        return agent_id

    def batch(ids: List[str]) -> Dict[str, str]:
        raise StopIteration

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(asyncio.wait_for(plain.get_many(["x"], loader=batch), 10))

    delay = [0.05]
    # A 0.05 s load at beta 10^6 refreshes early unless the draw's random number is below
    # 60 / (5 * 10^4) (0.12 % of draws); a fixed draw makes every read refresh.
    monkeypatch.setattr(random, "random", lambda: 0.5)

    @cached_metadata(ttl=60, beta=1e6, namespace="refresh-follower")  # a 0.05 s load: every read draws
    async def hot(agent_id: str) -> str:
        await asyncio.sleep(delay[0])
        return f"v{int(delay[0] > 0.5) + 1}"

    async def scenario() -> None:
        assert await hot("k") == "v1"
        assert await hot("k") == "v1"  # (the listener's first subscription may have flushed L1)
        delay[0] = 1.0
        refresher = asyncio.get_running_loop().create_task(hot("k"))
        await asyncio.sleep(0.2)  # the refresh is under way
        started = time.monotonic()
        assert await hot("k") == "v1" and time.monotonic() - started < 0.5
        assert await refresher in ("v1", "v2")

    asyncio.run(scenario())


def test_partials_and_callable_objects_need_their_own_namespace(redis_mode: str) -> None:
    """Their default namespace was the wrapper's (async: every partial of a module shared one,
    serving each other's values) or their repr (sync: a memory address, another namespace in
    every process, and bound arguments, secrets included, in keys and logs)."""
    import asyncio
    import functools

    def fetch(agent_id: str, api_key: str) -> str:
        return f"{api_key[:2]}:{agent_id}"

    async def afetch(agent_id: str, tenant: str) -> str:
        return f"{tenant}:{agent_id}"

    class Loader:
        async def __call__(self, agent_id: str) -> str:
            return agent_id

    class Repo:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant
            self.client = "a field of the object"  # used to overwrite the cache's own `client`
            self.namespace = "its own"

        def get(self, agent_id: str) -> str:
            return f"{self.tenant}:{agent_id}"

        def __call__(self, agent_id: str) -> str:
            return self.get(agent_id)

    class Priced:  # two classmethod lambdas of one class shared Priced.<lambda>
        price = classmethod(lambda cls, item: f"price of {item}")

    # Lambdas: every one of a scope is <lambda> (two served each other's values: a reviewer).
    for target in (functools.partial(fetch, api_key="sk-secret"), functools.partial(afetch, tenant="A"),
                   Loader(), Repo("A").get, {"k": "v"}.get, Repo("A"), lambda agent_id: agent_id,
                   Priced.price):
        with pytest.raises(InvalidArgument, match="namespace.*required"):
            cached_metadata(target)
    a = cached_metadata(namespace="tenant-a")(functools.partial(afetch, tenant="A"))
    b = cached_metadata(namespace="tenant-b")(functools.partial(afetch, tenant="B"))
    assert asyncio.run(a("1")) == "A:1" and asyncio.run(b("1")) == "B:1"
    repo = cached_metadata(namespace="repo-b")(Repo("B"))
    assert repo.namespace == "repo-b" and repo("1") == "B:1"  # the object's fields clobber nothing

    class Traced:  # a decorator class: it carries the wrapped function's names
        def __init__(self, wrapped: Any) -> None:
            functools.update_wrapper(self, wrapped)
            self.wrapped = wrapped

        def __call__(self, agent_id: str) -> str:
            return self.wrapped(agent_id)  # type: ignore[no-any-return]

    def get_agent(agent_id: str) -> str:
        return agent_id

    assert cached_metadata(Traced(get_agent)).namespace.endswith("get_agent")
    assert cached_metadata(Repo.get).namespace.endswith("Repo.get")  # the class's function: self in the key

    class Base:
        name = "base"

        @classmethod
        def load(cls, agent_id: str) -> str:
            return f"{cls.name}:{agent_id}"

    class Users(Base):
        name = "users"

    class Groups(Base):
        name = "groups"

    users, groups = cached_metadata(Users.load), cached_metadata(Groups.load)
    assert users.namespace != groups.namespace  # one base method, two classes: two namespaces
    assert users("1") == "users:1" and groups("1") == "groups:1"


def test_an_invalidation_between_the_l2_read_and_an_early_refresh_is_not_undone(
        redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """XFetch fires on an L2 hit while another process holds the refresh lock, so the old value
    is kept in L1 for up to 250 ms without drawing again. An invalidation that reached this
    process after the GET (before the refresh's flight existed) must stop that: the next call
    loads the new value (it used to be served the old one for 250 ms)."""
    from mcp_redis.cache.redis import RedisBackend

    source = Source()

    @cached_metadata(ttl=60, beta=1e6, namespace="tests.early-race")
    def load(agent_id: str) -> Any:
        time.sleep(0.01)  # delta * beta = 10^4 s: the draw fires on a read of a 60 s entry...
        return source.load(agent_id)

    # ...unless the draw's random number is below 60 / 10^4 (a CI run drew one): a draw at 0.5
    # fires for certain.
    monkeypatch.setattr(random, "random", lambda: 0.5)

    listening(load)
    assert load("a1") == {"agent_id": "a1", "version": 0}
    load.cache_clear()  # L1 empty: the next call reads L2
    client = redis.Redis.from_url(redis_mode, decode_responses=True)
    value_key = next(k for k in client.scan_iter("mcp:cache:*") if "tests.early-race" in k and "#" not in k)
    client.set(value_key + "#refresh", "another process", px=5000)
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    real_get = RedisBackend.get

    def get_then_invalidated(self: Any, key: str) -> Any:
        raw = real_get(self, key)
        monkeypatch.setattr(RedisBackend, "get", real_get)
        load.invalidate("a1")  # the row changed and its writer invalidated, right after our read
        return raw

    real_claim = RedisBackend.claim
    claims: List[str] = []

    def claim(self: Any, key: str, token: str, px: int) -> bool:
        claims.append(key)
        return real_claim(self, key, token, px)  # type: ignore[no-any-return]

    monkeypatch.setattr(RedisBackend, "get", get_then_invalidated)
    monkeypatch.setattr(RedisBackend, "claim", claim)
    assert load("a1") == {"agent_id": "a1", "version": 0}  # started before the invalidation: may be old
    assert claims == [value_key + "#refresh"]  # the draw fired; the refresh was left to the lock's holder
    assert load("a1") == {"agent_id": "a1", "version": 1}  # after it: never


def test_a_lost_reply_to_the_fill_lock_does_not_make_the_call_wait_for_its_own_lock(
        redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SET NX ran but its reply was lost; the retry found the key this very call had set and
    waited the whole lock_ttl (8 s here) for itself."""
    from mcp_redis.cache.redis import RedisBackend
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url())
        real_claim = RedisBackend.claim
        lost: List[str] = []

        def claim_losing_its_reply(self: Any, key: str, token: str, px: int) -> bool:
            if key.endswith("#fill") and not lost:
                lost.append(key)
                proxy.reset_next_reply()
            return real_claim(self, key, token, px)  # type: ignore[no-any-return]

        monkeypatch.setattr(RedisBackend, "claim", claim_losing_its_reply)
        load = make(Source(), ttl=60, lock_ttl=8, namespace="tests.lost-claim")
        started = time.monotonic()
        assert load("a1") == {"agent_id": "a1", "version": 0}
        assert lost and time.monotonic() - started < 4  # not the 8 s lock_ttl
        assert load.cache_info().loader_calls == 1


def test_odd_ids_are_refused_before_anything_is_loaded(redis_mode: str) -> None:
    loads: List[Any] = []

    @cached_metadata(namespace="tests.odd-ids")
    def load(n: Any) -> Any:
        loads.append(n)
        return {"n": str(n)[:8]}

    huge = 10**1200  # JSON cannot write it under Python's default digit limit
    for call in (lambda: load(huge), lambda: load.invalidate(huge), lambda: load.set({}, huge),
                 lambda: load.get_many([huge])):
        with pytest.raises(InvalidArgument, match="too large an integer"):
            call()
    assert load(10**900) == {"n": "10000000"}  # large, but a key
    with pytest.raises(InvalidArgumentType, match="ids.*hashable"):
        load.get_many([["a", "b"]])
    with pytest.raises(InvalidArgumentType, match="ids.*hashable"):
        load.get_many([{"k": 1}], loader=lambda ids: {})
    assert loads == [10**900]  # the refused calls loaded nothing


def test_a_forked_childs_cache_info_counts_only_its_own_calls(redis_mode: str) -> None:
    import os

    load = make(Source())
    for _ in range(3):
        load("a1")
    before = load.cache_info()
    assert before.loader_calls >= 1 and before.l1_hits + before.l2_hits >= 1  # the parent's counts
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            info = load.cache_info()
            code = 0 if (info.l1_hits, info.misses, info.loader_calls) == (0, 0, 0) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
