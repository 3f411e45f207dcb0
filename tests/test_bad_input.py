"""Hostile input at every public entry point (hypothesis).

The specification: a bad argument — wrong type, empty or over-long id,
non-JSON-serialisable value, zero/negative/NaN/infinite/bool number — raises
only a documented error, `InvalidArgument` (a ValueError) or
`InvalidArgumentType` (a TypeError) whose ``.argument`` names the parameter,
and nothing reaches Redis or PostgreSQL: Redis's write counter
(``rdb_changes_since_last_save``), its PUBLISH/XADD call counts and the row
counts of every library table are unchanged.

Valid but strange ids (globs, NUL, newlines, lone surrogates, 1,024
characters) are accepted, round-trip, and never write outside the prefix.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import psycopg2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mcp_redis
from mcp_redis.errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from mcp_redis.keys import MAX_ID_LENGTH
from mcp_redis.testing import PostgresDatabase, RedisServer, wait_for
from mcp_redis.validation import MAX_JSON_DEPTH

EXAMPLES = settings(
    max_examples=25,
    report_multiple_bugs=False,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Argument checks run before anything reaches a server: CI's Valkey pass leaves the module to the
# Redis pass (its Witness still proves, on a real server, that nothing was written).
pytestmark = pytest.mark.long

DOCUMENTED = (InvalidArgument, InvalidArgumentType)
TRIED: Dict[str, int] = {}  # entry point -> bad inputs tried (printed after the module, with -s)

# -- strategies ---------------------------------------------------------------------------


class Opaque:
    """Neither JSON-serialisable nor a str."""

    def __repr__(self) -> str:
        return "Opaque()"


not_a_str = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=8),
    st.lists(st.text(max_size=3), max_size=2),
    st.tuples(st.text(max_size=2)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.builds(Opaque),
)
too_long = st.integers(MAX_ID_LENGTH + 1, 4 * MAX_ID_LENGTH).flatmap(
    lambda n: st.sampled_from(["x" * n, "é" * n, "*" * n, "\x00" * n])
)
bad_id = st.one_of(not_a_str, st.just(""), too_long, st.just("k" * 100_000))

wrong_number_type = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(), max_size=1),
    st.builds(Opaque), st.complex_numbers(max_magnitude=10),
)
not_positive = st.one_of(
    st.integers(max_value=0),
    st.floats(max_value=0.0, allow_nan=False),
)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
# For counts (limits, costs): also non-integral floats.
bad_count = st.one_of(wrong_number_type.filter(lambda v: v is not None), not_positive, non_finite,
                      st.floats(min_value=0.01, max_value=1e6).filter(lambda f: not float(f).is_integer()))
# For durations (windows, TTLs, leases): seconds > 0, finite.
bad_seconds = st.one_of(wrong_number_type.filter(lambda v: v is not None), not_positive, non_finite)
# For waits where None (forever) and 0 (try once) are valid.
bad_wait = st.one_of(wrong_number_type.filter(lambda v: v is not None), st.integers(max_value=-1),
                     st.floats(max_value=-1e-9, allow_nan=False), st.just(math.nan), st.just(-math.inf))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=5))
unserialisable_leaf = st.one_of(
    st.builds(Opaque), st.binary(min_size=1, max_size=4), st.sets(st.integers(), min_size=1, max_size=2),
    st.frozensets(st.integers(), max_size=1), st.complex_numbers(max_magnitude=1),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


def _nest(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Dict[str, Any]]:
    return st.fixed_dictionaries({"bad": st.one_of(leaf, st.lists(leaf, min_size=1, max_size=2),
                                                   st.dictionaries(st.text(max_size=3), leaf, min_size=1, max_size=2))},
                                 optional={"ok": json_leaf})


def _circular() -> Dict[str, Any]:
    d: Dict[str, Any] = {"a": 1}
    d["self"] = d
    return d


unserialisable_dict = st.one_of(
    _nest(unserialisable_leaf),
    st.builds(_circular),
    st.dictionaries(st.tuples(st.integers()), json_leaf, min_size=1, max_size=2),  # non-str keys
)
not_a_dict = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(json_leaf, max_size=2),
                       st.tuples(json_leaf), st.builds(Opaque))

# Valid ids that try to escape their key: globs, separators, control chars,
# lone surrogates, the maximum length.
hostile_id = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), min_size=1, max_size=40),
    st.text(alphabet="*?[]\\:{}#~ \n\r\t\x00/%", min_size=1, max_size=12),
    st.just("x" * MAX_ID_LENGTH),
    st.just("\udc80\ud800"),
)


# -- the witness: nothing written ---------------------------------------------------------


class Witness:
    """Redis's write counter and publish/xadd counts, and every library table's rows."""

    def __init__(self, server: RedisServer, pg: Optional[PostgresDatabase]) -> None:
        self.redis = server.client()
        self.pg = pg
        self.before = self.snapshot()

    def snapshot(self) -> Tuple[Any, ...]:
        dirty = self.redis.info("persistence")["rdb_changes_since_last_save"]
        stats = self.redis.info("commandstats")
        sent = tuple(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("publish", "spublish", "xadd"))
        return (dirty, sent, self.pg_rows())

    def pg_rows(self) -> Tuple[Tuple[str, int], ...]:
        if self.pg is None:
            return ()
        conn = psycopg2.connect(self.pg.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'"
                )
                tables = cur.fetchall()
                rows = []
                for schema, table in sorted(tables):
                    cur.execute(
                        psycopg2.sql.SQL("SELECT count(*) FROM {}.{}").format(
                            psycopg2.sql.Identifier(schema), psycopg2.sql.Identifier(table)
                        )
                    )
                    rows.append((f"{schema}.{table}", cur.fetchone()[0]))
                return tuple(rows)
        finally:
            conn.close()

    def unchanged(self) -> None:
        after = self.snapshot()
        assert after[0] == self.before[0], f"Redis written by bad input: {after[0] - self.before[0]} changes"
        assert after[1] == self.before[1], f"published by bad input: {self.before[1]} -> {after[1]}"
        assert after[2] == self.before[2], f"PostgreSQL written by bad input: {self.before[2]} -> {after[2]}"


def rejected(entry: str, fn: Callable[[], Any], *names: str) -> None:
    """`fn()` must raise a documented argument error naming one of `names`."""
    TRIED[entry] = TRIED.get(entry, 0) + 1
    try:
        fn()
    except DOCUMENTED as exc:
        assert exc.argument in names, f"{entry}: {exc!r} names {exc.argument!r}, expected one of {names}"
        assert "Opaque()" not in str(exc) or exc.argument in str(exc)
        return
    except BaseException as exc:
        raise AssertionError(f"{entry}: undocumented {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{entry}: bad input accepted")


@pytest.fixture(scope="module", autouse=True)
def report_bad_inputs_tried() -> Iterator[None]:
    """After the module: how many bad inputs each entry point was given
    (``pytest tests/test_bad_input.py -s`` shows it; docs/reliability.md quotes it)."""
    yield
    total = sum(TRIED.values())
    if total:
        print(f"\nbad inputs tried: {total} across {len(TRIED)} entry points")
        for entry, n in sorted(TRIED.items()):
            print(f"  {entry}: {n}")


@pytest.fixture
def witness(redis_url: str, redis_server: RedisServer, database_url: str,
            pg_database: PostgresDatabase) -> Iterator[Witness]:
    """The library on Redis with PostgreSQL configured; proves nothing was written."""
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    from mcp_redis.postgres import get_postgres

    get_postgres().ensure_schema()  # tables exist, so the row counts mean something
    w = Witness(redis_server, pg_database)
    yield w
    w.unchanged()


def _enter(cm: Any) -> None:
    with cm:
        raise AssertionError("entered with a bad argument")


# -- locks ----------------------------------------------------------------------------------


@EXAMPLES
@given(agent_id=bad_id)
def test_agent_lock_rejects_bad_ids(witness: Witness, agent_id: Any) -> None:
    agent_lock = mcp_redis.agent_lock
    rejected("agent_lock(agent_id)", lambda: _enter(agent_lock(agent_id)), "agent_id")
    witness.unchanged()


@EXAMPLES
@given(timeout=bad_seconds)
def test_agent_lock_rejects_bad_leases(witness: Witness, timeout: Any) -> None:
    agent_lock = mcp_redis.agent_lock
    rejected("agent_lock(timeout)", lambda: _enter(agent_lock("a1", timeout=timeout)), "timeout")
    witness.unchanged()


@EXAMPLES
@given(blocking_timeout=bad_wait)
def test_agent_lock_rejects_bad_waits(witness: Witness, blocking_timeout: Any) -> None:
    agent_lock = mcp_redis.agent_lock
    rejected("agent_lock(blocking_timeout)",
             lambda: _enter(agent_lock("a1", blocking_timeout=blocking_timeout)), "blocking_timeout")
    witness.unchanged()


@EXAMPLES
@given(name=bad_id, timeout=st.one_of(st.none(), bad_seconds))
def test_lock_rejects_bad_names_and_leases(witness: Witness, name: Any, timeout: Any) -> None:
    lock = mcp_redis.lock
    rejected("lock(name, timeout)", lambda: lock(name, timeout=timeout).acquire(blocking=False), "name", "timeout")
    rejected("lock(timeout)", lambda: lock("ok", timeout=timeout if timeout is not None else -1).acquire(
        blocking=False), "timeout")
    witness.unchanged()


@EXAMPLES
@given(blocking_timeout=bad_wait)
def test_lock_acquire_rejects_bad_waits(witness: Witness, blocking_timeout: Any) -> None:
    lock = mcp_redis.lock
    rejected("lock.acquire(blocking_timeout)", lambda: lock("ok", timeout=5).acquire(blocking_timeout=blocking_timeout),
             "blocking_timeout")
    witness.unchanged()


@pytest.mark.parametrize("algorithm,limit,window", [("sliding_window", 10**15 + 1, 60), ("fixed_window", 10**19, 60),
                                                    ("gcra", 10**15 + 1, 60), ("gcra", 1_000_001, 1)])
def test_rate_limits_beyond_exact_arithmetic_are_refused(witness: Witness, algorithm: str, limit: int,
                                                          window: int) -> None:
    # Past 10^15 Lua's doubles lose units (remaining stuck, or 0 while
    # admitting); GCRA's state is a time in whole microseconds, so it needs
    # at most one unit a microsecond (it consumed nothing per hit above that).
    def hit() -> Any:
        return mcp_redis.RateLimiter("huge", limit, window, algorithm=algorithm).hit("k")
    rejected("RateLimiter(limit) exact", hit, "limit")
    witness.unchanged()


@pytest.mark.parametrize("bad", [{"blocking_timeout": float("nan")}, {"blocking_timeout": -5}, {"token": 123},
                                 {"token": b"\xff\xfe"}], ids=["nan-wait", "negative-wait", "int-token", "non-utf8"])
def test_a_held_reentrant_lock_rejects_bad_acquire_arguments_and_keeps_its_count(
        redis_url: str, redis_server: RedisServer, bad: Dict[str, Any]) -> None:
    # The re-entry shortcut comes after the checks: a nested acquire with a
    # bad argument raises, and the hold's count is unchanged (released once).
    mcp_redis.configure(redis_url=redis_url)
    lk = mcp_redis.agent_lock("nested-bad", timeout=5)  # reentrant
    with lk:
        rejected("lock.acquire(held, reentrant)", lambda: lk.acquire(**bad), *bad)
    assert not redis_server.client().exists(lk.key), "the one release freed it"
    rejected("lock.acquire(free)", lambda: lk.acquire(**bad), *bad)
    assert not redis_server.client().exists(lk.key)


@EXAMPLES
@given(agent_id=bad_id, timeout=st.one_of(st.just(1.0), bad_wait))
def test_compat_state_lock_manager_rejects_bad_input(witness: Witness, agent_id: Any, timeout: Any) -> None:
    from mcp_redis.compat import StateLockManager

    manager = StateLockManager(lock_dir=mcp_redis.settings().lock_dir)
    rejected("StateLockManager.acquire_agent_lock", lambda: _enter(manager.acquire_agent_lock(
        agent_id, timeout=timeout)), "agent_id", "timeout", "blocking_timeout")
    witness.unchanged()


# -- rate limits ----------------------------------------------------------------------------


@EXAMPLES
@given(name=bad_id)
def test_rate_limiter_rejects_bad_names(witness: Witness, name: Any) -> None:
    RateLimiter = mcp_redis.RateLimiter
    rate_limited = mcp_redis.rate_limited
    rejected("RateLimiter(name)", lambda: RateLimiter(name, 5, 60), "name")
    rejected("rate_limited(name)", lambda: rate_limited(name, limit=5, window=60), "name")
    witness.unchanged()


@EXAMPLES
@given(limit=bad_count)
def test_rate_limiter_rejects_bad_limits(witness: Witness, limit: Any) -> None:
    RateLimiter = mcp_redis.RateLimiter
    rate_limited = mcp_redis.rate_limited
    rejected("RateLimiter(limit)", lambda: RateLimiter("n", limit, 60).hit("k"), "limit")
    rejected("rate_limited(limit)", lambda: rate_limited("n", limit=limit, window=60), "limit")
    witness.unchanged()


@EXAMPLES
@given(window=bad_seconds)
def test_rate_limiter_rejects_bad_windows(witness: Witness, window: Any) -> None:
    RateLimiter = mcp_redis.RateLimiter
    rate_limited = mcp_redis.rate_limited
    rejected("RateLimiter(window)", lambda: RateLimiter("n", 5, window).hit("k"), "window")
    rejected("rate_limited(window)", lambda: rate_limited("n", limit=5, window=window), "window")
    witness.unchanged()


@EXAMPLES
@given(key=bad_id, cost=st.one_of(st.just(1), bad_count))
def test_rate_limiter_verbs_reject_bad_keys_and_costs(witness: Witness, key: Any, cost: Any) -> None:
    RateLimiter = mcp_redis.RateLimiter
    limiter = RateLimiter("verbs", 5, 60)
    rejected("RateLimiter.hit", lambda: limiter.hit(key, cost), "key", "cost")
    rejected("RateLimiter.peek", lambda: limiter.peek(key), "key")
    rejected("RateLimiter.reset", lambda: limiter.reset(key), "key")
    witness.unchanged()


@EXAMPLES
@given(agent_id=bad_id)
def test_rate_limited_function_rejects_bad_key_values_without_calling(witness: Witness, agent_id: Any) -> None:
    rate_limited = mcp_redis.rate_limited
    called = []

    @rate_limited("deco", limit=5, window=60, key="agent_id")
    def act(agent_id: Any) -> None:
        called.append(agent_id)

    rejected("@rate_limited call(key value)", lambda: act(agent_id), "key", "agent_id")
    assert called == []
    witness.unchanged()


@EXAMPLES
@given(key=st.one_of(st.integers(), st.none(), st.builds(Opaque), st.lists(st.text(max_size=2), max_size=1)))
def test_rate_limited_rejects_bad_key_arguments(witness: Witness, key: Any) -> None:
    rate_limited = mcp_redis.rate_limited
    rejected("rate_limited(key)", lambda: rate_limited("deco", limit=5, window=60, key=key)(lambda agent_id: None),
             "key")
    witness.unchanged()


# -- sessions -------------------------------------------------------------------------------


@EXAMPLES
@given(session_key=bad_id, agent_id=bad_id)
def test_session_store_rejects_bad_ids(witness: Witness, session_key: Any, agent_id: Any) -> None:
    store = mcp_redis.SessionStore()
    rejected("SessionStore.bind(session_key)", lambda: store.bind(session_key, "agent"), "session_key")
    rejected("SessionStore.bind(agent_id)", lambda: store.bind("session", agent_id), "agent_id")
    rejected("SessionStore.get", lambda: store.get(session_key), "session_key")
    rejected("SessionStore.unbind", lambda: store.unbind(session_key), "session_key")
    rejected("SessionStore.touch", lambda: store.touch(session_key), "session_key")
    witness.unchanged()


@EXAMPLES
@given(ttl=bad_seconds)
def test_session_store_rejects_bad_ttls(witness: Witness, ttl: Any) -> None:
    SessionStore = mcp_redis.SessionStore
    rejected("SessionStore.bind(ttl)", lambda: SessionStore().bind("s", "a", ttl=ttl), "ttl")
    rejected("SessionStore(ttl)", lambda: SessionStore(ttl=ttl), "ttl")
    witness.unchanged()


# -- events ---------------------------------------------------------------------------------


@EXAMPLES
@given(channel=bad_id)
def test_event_bus_rejects_bad_channels(witness: Witness, channel: Any) -> None:
    bus = mcp_redis.EventBus()
    rejected("EventBus.publish(channel)", lambda: bus.publish(channel, {"a": 1}), "channel")
    rejected("EventBus.subscribe(channel)", lambda: bus.subscribe(channel, lambda e: None), "channel")
    witness.unchanged()


@EXAMPLES
@given(event=st.one_of(unserialisable_dict, not_a_dict))
def test_event_bus_rejects_non_json_events(witness: Witness, event: Any) -> None:
    bus = mcp_redis.EventBus()
    rejected("EventBus.publish(event)", lambda: bus.publish("ch", event), "event")
    witness.unchanged()


@EXAMPLES
@given(handler=st.one_of(st.none(), st.integers(), st.text(max_size=3)), timeout=st.one_of(st.just(1.0), bad_seconds))
def test_event_bus_rejects_bad_handlers_and_timeouts(witness: Witness, handler: Any, timeout: Any) -> None:
    bus = mcp_redis.EventBus()
    rejected("EventBus.subscribe(handler, timeout)", lambda: bus.subscribe("ch", handler, timeout=timeout),
             "handler", "timeout")
    if timeout not in (math.inf,):  # inf: reported bug, see test_huge_durations_are_rejected_or_bounded
        rejected("EventBus.subscribe(timeout)", lambda: bus.subscribe("ch", lambda e: None, timeout=timeout
                                                                       if timeout != 1.0 else -1), "timeout")
    assert threading.active_count() < 50
    witness.unchanged()


@EXAMPLES
@given(name=bad_id, event=st.one_of(unserialisable_dict, not_a_dict))
def test_event_stream_rejects_bad_names_and_events(witness: Witness, name: Any, event: Any) -> None:
    EventStream = mcp_redis.EventStream
    rejected("EventStream(name)", lambda: EventStream(name), "name")
    rejected("EventStream.add(event)", lambda: EventStream("s").add(event), "event")
    witness.unchanged()


# -- metadata cache ---------------------------------------------------------------------------


@EXAMPLES
@given(ttl=bad_seconds)
def test_cached_metadata_rejects_bad_ttls(witness: Witness, ttl: Any) -> None:
    cached_metadata = mcp_redis.cached_metadata
    rejected("cached_metadata(ttl)", lambda: cached_metadata(ttl=ttl)(lambda agent_id: {}), "ttl")
    witness.unchanged()


@EXAMPLES
@given(agent_id=bad_id)
def test_cached_metadata_rejects_bad_ids_without_loading(witness: Witness, agent_id: Any) -> None:
    cached_metadata = mcp_redis.cached_metadata
    loaded = []

    @cached_metadata(ttl=60)
    def load(agent_id: Any) -> Dict[str, Any]:
        loaded.append(agent_id)
        return {}

    rejected("cached_metadata call(agent_id)", lambda: load(agent_id), "agent_id")
    rejected("cached_metadata.invalidate", lambda: load.invalidate(agent_id), "agent_id")
    assert loaded == []
    witness.unchanged()


@EXAMPLES
@given(value=st.one_of(unserialisable_dict, st.builds(Opaque), st.sets(st.integers(), max_size=2)))
def test_cached_metadata_never_writes_a_non_json_value(witness: Witness, value: Any) -> None:
    """A loader returning a non-JSON value: a documented error or the value itself, nothing left in Redis.

    The miss leaves its load's guard marker before calling the loader (and
    takes it away after): Redis's key set, not its write counter, is compared.
    """
    cached_metadata = mcp_redis.cached_metadata
    keys_before = sorted(witness.redis.keys("*"))
    witness.before = (witness.before[0] + 2,) + witness.before[1:]  # the marker's SET and DEL

    @cached_metadata(ttl=60)
    def load(agent_id: str) -> Any:
        return value

    TRIED["cached_metadata(non-JSON value)"] = TRIED.get("cached_metadata(non-JSON value)", 0) + 1
    try:
        assert load("agent") is value
    except DOCUMENTED:
        pass
    assert sorted(witness.redis.keys("*")) == keys_before, "nothing left behind"
    witness.unchanged()


# -- the RedisBackend facade ------------------------------------------------------------------


@EXAMPLES
@given(key=bad_id, ttl=bad_seconds, limit=bad_count, window=bad_seconds)
def test_redis_backend_rejects_bad_input(witness: Witness, key: Any, ttl: Any, limit: Any, window: Any) -> None:
    backend = mcp_redis.RedisBackend()
    rejected("RedisBackend.get_session", lambda: backend.get_session(key), "session_key", "key")
    rejected("RedisBackend.set_session(key)", lambda: backend.set_session(key, "a"), "session_key", "key")
    rejected("RedisBackend.set_session(ttl)", lambda: backend.set_session("s", "a", ttl=ttl), "ttl")
    rejected("RedisBackend.check_rate_limit(key)", lambda: backend.check_rate_limit(key, 5, 60), "key")
    rejected("RedisBackend.check_rate_limit(limit)", lambda: backend.check_rate_limit("k", limit, 60), "limit")
    rejected("RedisBackend.check_rate_limit(window)", lambda: backend.check_rate_limit("k", 5, window), "window")
    rejected("RedisBackend.cache_get", lambda: backend.cache_get(key), "key")
    rejected("RedisBackend.cache_set(ttl)", lambda: backend.cache_set("k", {}, ttl=ttl), "ttl")
    witness.unchanged()


@EXAMPLES
@given(key=bad_id, timeout=bad_seconds)
def test_redis_backend_acquire_lock_rejects_bad_input(witness: Witness, key: Any, timeout: Any) -> None:
    backend = mcp_redis.RedisBackend()
    rejected("RedisBackend.acquire_lock(key)", lambda: _enter(backend.acquire_lock(key)), "key")
    rejected("RedisBackend.acquire_lock(timeout)", lambda: _enter(backend.acquire_lock("k", timeout=timeout)),
             "timeout")
    witness.unchanged()


@EXAMPLES
@given(value=st.one_of(unserialisable_dict, st.builds(Opaque)))
def test_redis_backend_cache_set_rejects_non_json(witness: Witness, value: Any) -> None:
    backend = mcp_redis.RedisBackend()
    rejected("RedisBackend.cache_set(value)", lambda: backend.cache_set("k", value), "value")
    witness.unchanged()


# -- configuration ----------------------------------------------------------------------------


@EXAMPLES
@given(name=st.sampled_from(["session_ttl", "metadata_ttl", "lock_timeout", "rate_limit_window", "socket_timeout",
                             "socket_connect_timeout", "pool_timeout", "max_connections", "retry_attempts",
                             "postgres_timeout", "postgres_connect_timeout", "breaker_reset_timeout"]),
       value=st.one_of(bad_seconds, st.just(math.nan)))
def test_configure_rejects_bad_settings_and_keeps_the_old_ones(witness: Witness, name: str, value: Any) -> None:
    before = mcp_redis.settings()
    TRIED["configure(...)"] = TRIED.get("configure(...)", 0) + 1
    with pytest.raises(ConfigurationError) as info:
        mcp_redis.configure(**{name: value})
    assert name in str(info.value)
    assert mcp_redis.settings() == before
    witness.unchanged()


def test_configure_rejects_unknown_keys_and_bad_prefixes(witness: Witness) -> None:
    for bad in ({"no_such_setting": 1}, {"key_prefix": ""}, {"key_prefix": "*"}, {"key_prefix": "a{b}"},
                {"key_prefix": 5}, {"redis_url": "http://x"}, {"redis_url": 5}):
        with pytest.raises(ConfigurationError):
            mcp_redis.configure(**bad)  # type: ignore[arg-type]
    witness.unchanged()


# -- huge but finite numbers: a documented error or a bounded value, never a raw backend error -----

TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000
HUGE = [1e15, 1e300, 2**63, 10**30, 10**400]


def _huge_calls(check: Callable[[], None] = lambda: None) -> Dict[str, Callable[[Any], Any]]:
    def _hold_briefly(cm: Any) -> None:
        with cm:
            time.sleep(0.3)  # long enough for a renewal thread to schedule its first renewal
            check()

    return {
        "SessionStore.bind(ttl)": lambda v: mcp_redis.SessionStore().bind("huge", "a", ttl=v),
        "SessionStore.touch(ttl)": lambda v: mcp_redis.SessionStore().touch("huge", ttl=v),
        "SessionStore(refresh_interval)": lambda v: mcp_redis.SessionStore(refresh_interval=v).bind("huge", "a"),
        "RedisBackend.cache_set(ttl)": lambda v: mcp_redis.RedisBackend().cache_set("huge", {"a": 1}, ttl=v),
        "agent_lock(timeout)": lambda v: _hold_briefly(mcp_redis.agent_lock("huge", timeout=v, blocking_timeout=0)),
        "lock(timeout)": lambda v: _hold_briefly(mcp_redis.lock("huge2", timeout=v, blocking_timeout=0)),
        "RateLimiter(window)": lambda v: mcp_redis.RateLimiter("huge", 5, v).hit("k"),
        "cached_metadata(ttl)": lambda v: mcp_redis.cached_metadata(ttl=v)(lambda agent_id: {"a": 1})("huge"),
        "EventBus.subscribe(timeout)": lambda v: mcp_redis.EventBus().subscribe("huge", lambda e: None,
                                                                                 timeout=v).close(),
        "EventStream(ttl)": lambda v: mcp_redis.EventStream("huge", ttl=v).add({"a": 1}),
    }




def test_a_lease_never_runs_past_ten_years_however_many_extends_add_to_it(redis_url: str) -> None:
    import redis

    mcp_redis.configure(redis_url=redis_url)
    ten_years = TEN_YEARS_MS / 1000
    lock = mcp_redis.lock("ten-years", timeout=ten_years)
    assert lock.acquire()
    assert lock.extend(ten_years) and lock.extend(ten_years)  # each adds ten years to what is left
    assert 0 < redis.Redis.from_url(redis_url).pttl(lock.key) <= TEN_YEARS_MS  # was 30 years
    lock.release()


@pytest.mark.parametrize("value", HUGE, ids=[repr(v)[:8] for v in HUGE])
@pytest.mark.parametrize("entry", sorted(_huge_calls()))
def test_huge_durations_are_rejected_or_bounded(witness: Witness,
                                                entry: str, value: Any) -> None:
    """Too large for Redis's integer expiry (or a thread's wait): refused up front, or capped —
    never a raw backend error, a dead background thread or a key that outlives ten years."""
    died: list = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_value)
    TRIED[entry + " huge"] = TRIED.get(entry + " huge", 0) + 1
    client = witness.redis

    def bounded_ttls() -> None:
        for key in client.scan_iter(count=1000):
            pttl = client.pttl(key)
            if key.endswith("#fence"):
                continue  # lock fencing counters are documented never to expire
            assert 0 < pttl <= TEN_YEARS_MS, f"{entry}: {key!r} expires in {pttl} ms"

    try:
        try:
            _huge_calls(bounded_ttls)[entry](value)
        except DOCUMENTED as exc:
            assert exc.argument in ("ttl", "timeout", "window", "blocking_timeout", "refresh_interval"), repr(exc)
            witness.unchanged()
            return
        except Exception as exc:
            raise AssertionError(f"{entry}: undocumented {type(exc).__name__} for {value!r}: {exc}") from None
        time.sleep(0.2)
        assert not died, f"{entry}: a background thread died: {died[0]!r}"
        bounded_ttls()
    finally:
        threading.excepthook = previous
        # Whatever an accepted call wrote is judged above; start the next case clean.
        client.flushall()
        witness.before = witness.snapshot()


# -- every duration through the one validator, with a bound each use can honour ---------------------

TWENTY_YEARS = 20 * 365 * 24 * 3600
THIRTY_DAYS = 30 * 24 * 3600


@pytest.mark.parametrize("ttl", [TWENTY_YEARS, 1e17, 10**400])
def test_redis_backend_cache_set_refuses_ttls_past_ten_years(witness: Witness, ttl: Any) -> None:
    backend = mcp_redis.RedisBackend()
    rejected("RedisBackend.cache_set(ttl) past ten years", lambda: backend.cache_set("k", {"a": 1}, ttl=ttl), "ttl")
    witness.unchanged()


@pytest.mark.parametrize("kwargs", [{"refresh_interval": 1e12}, {"refresh_interval": TWENTY_YEARS},
                                    {"ttl": 60, "refresh_interval": 61}])
def test_session_store_refuses_refresh_intervals_longer_than_the_ttl_they_refresh(
        witness: Witness, kwargs: Dict[str, Any]) -> None:
    SessionStore = mcp_redis.SessionStore
    rejected("SessionStore(refresh_interval) too long", lambda: SessionStore(**kwargs).bind("s", "a"),
             "refresh_interval")
    witness.unchanged()


@pytest.mark.parametrize("sleep", [math.nan, -1, "0.1", 1e300])
def test_lock_refuses_bad_sleeps(witness: Witness, sleep: Any) -> None:
    rejected("lock(sleep)", lambda: mcp_redis.lock("k", sleep=sleep).acquire(blocking=False), "sleep")
    witness.unchanged()


@pytest.mark.parametrize("kwargs, argument", [
    ({"claim_interval": math.nan}, "claim_interval"), ({"claim_interval": "1"}, "claim_interval"),
    ({"claim_interval": 1e300}, "claim_interval"), ({"claim_interval": -1}, "claim_interval"),
    ({"min_idle_ms": 10**30}, "min_idle_ms"),
])
def test_event_stream_refuses_bad_claim_durations(witness: Witness, kwargs: Dict[str, Any], argument: str) -> None:
    EventStream = mcp_redis.EventStream
    rejected("EventStream(claim durations)", lambda: EventStream("s", group="g", **kwargs).claim(), argument)
    witness.unchanged()


@pytest.mark.parametrize("name, value", [
    ("socket_timeout", 1e12), ("socket_connect_timeout", 1e12), ("pool_timeout", 1e12),
    ("postgres_timeout", THIRTY_DAYS), ("postgres_connect_timeout", 10**12), ("breaker_reset_timeout", 1e12),
    ("retry_initial_backoff", 1e12), ("retry_max_backoff", 1e12), ("health_check_interval", 10**12),
    ("session_ttl", 10**400), ("rate_limit_window", 0.0001),
])
def test_configure_refuses_durations_that_no_use_of_them_can_honour(witness: Witness, name: str, value: Any) -> None:
    before = mcp_redis.settings()
    with pytest.raises(ConfigurationError, match=f"^{name}: "):
        mcp_redis.configure(**{name: value})
    assert mcp_redis.settings() == before
    witness.unchanged()


@pytest.mark.parametrize("var, name, raw", [
    ("MCP_REDIS_SOCKET_TIMEOUT", "socket_timeout", "1e12"),
    ("MCP_REDIS_CONNECT_TIMEOUT", "socket_connect_timeout", "1e12"),
    ("MCP_REDIS_POOL_TIMEOUT", "pool_timeout", "86400"),
    ("MCP_REDIS_POSTGRES_TIMEOUT", "postgres_timeout", str(THIRTY_DAYS)),
    ("MCP_REDIS_BREAKER_RESET_TIMEOUT", "breaker_reset_timeout", "1e12"),
    ("REDIS_SESSION_TTL", "session_ttl", str(TWENTY_YEARS)),
    ("REDIS_METADATA_TTL", "metadata_ttl", "0"),
    ("REDIS_LOCK_TIMEOUT", "lock_timeout", "1e17"),
    ("REDIS_RATE_LIMIT_WINDOW", "rate_limit_window", "inf"),
])
def test_duration_environment_variables_are_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, var: str, name: str, raw: str) -> None:
    monkeypatch.setenv(var, raw)
    mcp_redis.reset(configuration=True)
    with pytest.raises(ConfigurationError, match=rf"^{var} \({name}, seconds\): ") as raised:
        mcp_redis.settings()
    assert raised.value.variable == var


def test_the_largest_accepted_timeouts_are_honoured_by_every_feature(redis_url: str, database_url: str) -> None:
    """At each bound the clients still work: sockets, waits and PostgreSQL's statement_timeout take it."""
    from mcp_redis.validation import MAX_NETWORK_SECONDS, MAX_STATEMENT_SECONDS

    mcp_redis.configure(redis_url=redis_url, database_url=database_url, socket_timeout=MAX_NETWORK_SECONDS,
                        socket_connect_timeout=MAX_NETWORK_SECONDS, pool_timeout=MAX_NETWORK_SECONDS,
                        postgres_timeout=MAX_STATEMENT_SECONDS, postgres_connect_timeout=int(MAX_NETWORK_SECONDS),
                        breaker_reset_timeout=MAX_NETWORK_SECONDS, retry_max_backoff=MAX_NETWORK_SECONDS)
    store = mcp_redis.SessionStore()
    store.bind("s", "agent", ttl=60)  # PostgreSQL first: statement_timeout and tcp_user_timeout accepted
    assert store.get("s") == "agent"
    assert mcp_redis.RateLimiter("bounds", 5, 60).hit("k").allowed
    with mcp_redis.agent_lock("bounds", timeout=5, blocking_timeout=1):
        pass
    backend = mcp_redis.RedisBackend()
    backend.cache_set("k", {"a": 1}, ttl=10 * 365 * 24 * 3600)  # exactly ten years: accepted
    assert backend.cache_get("k") == {"a": 1}


# -- valid but hostile ids: accepted, round-trip, never outside the prefix -------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(session_key=hostile_id, agent_id=hostile_id)
def test_hostile_ids_round_trip_inside_the_prefix(redis_url: str, redis_server: RedisServer,
                                                  session_key: str, agent_id: str) -> None:
    SessionStore = mcp_redis.SessionStore
    assume(len(session_key) <= MAX_ID_LENGTH and len(agent_id) <= MAX_ID_LENGTH)
    mcp_redis.configure(redis_url=redis_url)
    store = SessionStore()
    store.bind(session_key, agent_id, ttl=60)
    assert store.get(session_key) == agent_id
    assert mcp_redis.RateLimiter("hostile", 1000, 60).hit(agent_id).allowed
    with mcp_redis.agent_lock(agent_id, timeout=5, blocking_timeout=1):
        pass
    outside = [k for k in redis_server.client().scan_iter(count=1000) if not k.startswith("mcp:")]
    assert outside == [], f"keys outside the prefix: {outside[:3]}"
    assert store.unbind(session_key) is True
    assert store.get(session_key) is None


def _nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 900, 5000])
def test_values_nested_deeper_than_the_json_bound_are_refused_naming_the_argument(witness: Witness,
                                                                                   levels: int) -> None:
    """Past MAX_JSON_DEPTH (and past where json raises RecursionError): an argument error, nothing
    written. (Accepted near Python's recursion limit, a value would fail to decode in the library's
    own listener and consumer threads, which run deeper, and be dropped there.)"""
    deep = _nested(levels)
    event = {"a": deep[0]}
    bus, stream, store = mcp_redis.EventBus(), mcp_redis.EventStream("s"), mcp_redis.SessionStore()
    rejected("EventBus.publish(deep event)", lambda: bus.publish("ch", event), "event")
    rejected("EventStream.add(deep event)", lambda: stream.add(event), "event")
    rejected("SessionStore.bind(deep field)", lambda: store.bind("s", "a", note=deep), "note")
    rejected("RedisBackend.cache_set(deep value)", lambda: mcp_redis.RedisBackend().cache_set("k", deep), "value")

    @mcp_redis.cached_metadata(ttl=60)
    def load(agent_id: str) -> Any:
        return deep

    rejected("cached_metadata.set(deep value)", lambda: load.set(deep, "agent"), "value")
    witness.unchanged()
    store.bind("s", "a", note=1)
    witness.before = witness.snapshot()
    rejected("SessionStore.update(deep field)", lambda: store.update("s", note=deep), "note")
    assert store.record("s")["note"] == 1


def test_values_nested_to_the_json_bound_are_accepted_and_delivered(redis_url: str) -> None:
    """At MAX_JSON_DEPTH a value goes through every feature, decoded in the library's own threads."""
    mcp_redis.configure(redis_url=redis_url)
    deepest = _nested(MAX_JSON_DEPTH)
    event = {"a": deepest[0]}  # the dict is one level: MAX_JSON_DEPTH in all
    got: List[Any] = []
    bus = mcp_redis.EventBus()
    sub = bus.subscribe("deep", got.append)
    try:
        bus.publish("deep", event)
        stream = mcp_redis.EventStream("deep", group="g")
        stream.add(event)
        handled: List[Any] = []
        consumer = stream.run_in_thread(handled.append, block_ms=50)
        wait_for(lambda: got == [event] and handled == [event], what="the deepest event delivered")
        consumer.close()
    finally:
        sub.close()
    store = mcp_redis.SessionStore()
    store.bind("s", "a", note=deepest)
    assert store.record("s")["note"] == deepest

    @mcp_redis.cached_metadata(ttl=60)
    def load(agent_id: str) -> Any:
        return deepest

    load.set(deepest, "x")
    load.cache_clear()
    assert load("x") == deepest and load.cache_info().l2_hits == 1


def test_redis_backend_cache_get_of_a_value_it_never_wrote_is_a_miss(redis_url: str) -> None:
    """A foreign writer's value under the key (not JSON, or nested past json's recursion limit)."""
    import redis

    mcp_redis.configure(redis_url=redis_url)
    backend = mcp_redis.RedisBackend()
    backend.cache_set("k", {"a": 1})
    raw = redis.Redis.from_url(redis_url)
    key = next(k for k in raw.keys("*") if raw.get(k) == b'{"a":1}')
    # 300 levels: every Python's json decodes it, but the library never writes it (MAX_JSON_DEPTH);
    # 5,000: past the recursion limit of json before Python 3.13, decoded by 3.13's.
    for foreign in (b"not json", b"[" * 300 + b"]" * 300, b"[" * 5000 + b"]" * 5000):
        raw.set(key, foreign, ex=60)
        assert backend.cache_get("k") is None
