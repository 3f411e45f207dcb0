"""Specification of `mcp_redis.SessionStore`: bindings shared by every process,
Redis in front of PostgreSQL, with real redis-server and PostgreSQL processes."""

from __future__ import annotations

import gc
import math
import multiprocessing
import threading
from typing import Any, List
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

import mcp_redis
from mcp_redis import (
    BackendUnavailable,
    FeatureDisabled,
    InvalidArgument,
    InvalidArgumentType,
    SessionStore,
)
from mcp_redis.keys import encode_id
from mcp_redis.metrics import METRICS
from mcp_redis.sessions import PostgresBackend
from mcp_redis.sessions.records import agent_of, as_dict, unpack
from mcp_redis.sessions.redis import from_index_id
from mcp_redis.testing import PostgresDatabase, RedisServer, wait_for
from mcp_redis.testing.faultproxy import FaultProxy
from tests import workers_sessions

ODD_IDS = ["nul\x00inside", "lone\ud800surrogate", "new\nline *?[glob]", "ключ:{tag}", "~tilde"]


def binding_key(session_key: str) -> str:
    return "mcp:session:" + encode_id(session_key)


INDEX_KEY = "mcp:session_index:{all}"


def indexed_sessions(client: Any, agent_id: str) -> List[str]:
    """The session keys the Redis session index lists for `agent_id` (white-box, unverified)."""
    head = agent_id.encode("utf-8", "surrogatepass") + b"\x00"
    members = client.zrangebylex(INDEX_KEY, b"[" + head, b"(" + head[:-1] + b"\x01")
    found = []
    for member in members:
        agent, _, encoded = (member if isinstance(member, str) else member.decode()).rpartition("\x00")
        if agent == agent_id:
            found.append(from_index_id(encoded))
    return found


def pg_rows(pg: PostgresDatabase, where: str = "true") -> List[tuple]:
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT session_key, agent_id, expires_at > now(), redis_pending FROM mcp_redis.sessions WHERE {where}")
            return list(cur.fetchall())
    finally:
        conn.close()


def pg_exec(pg: PostgresDatabase, sql: str, params: tuple = ()) -> None:
    conn = psycopg2.connect(pg.dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


@pytest.fixture
def write_through(redis_url: str, database_url: str) -> SessionStore:
    """Redis mode with DATABASE_URL: PostgreSQL is the source of truth."""
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    return SessionStore()


@pytest.fixture
def redis_only(redis_mode: str) -> SessionStore:
    return SessionStore()


@pytest.fixture
def own_redis(redis_factory: Any) -> RedisServer:
    """A redis-server this test may stop and restart (empty) on the same port."""
    return redis_factory()


# -- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ttl, error", [
    (0, InvalidArgument), (-1, InvalidArgument), (math.nan, InvalidArgument), (math.inf, InvalidArgument),
    (1e12, InvalidArgument),
    (True, InvalidArgumentType), ("10", InvalidArgumentType), ([1], InvalidArgumentType),
])
def test_bad_ttl_is_refused_naming_ttl_before_anything_is_written(redis_only: SessionStore, redis_url: str,
                                                                  ttl: object, error: type) -> None:
    with pytest.raises(error, match="ttl") as info:
        redis_only.bind("s1", "agent-1", ttl=ttl)  # type: ignore[arg-type]
    assert info.value.argument == "ttl"  # type: ignore[attr-defined]
    assert isinstance(info.value, ValueError if error is InvalidArgument else TypeError)
    with pytest.raises(error):
        SessionStore(ttl=ttl)  # type: ignore[arg-type]
    import redis

    assert redis.Redis.from_url(redis_url).dbsize() == 0


@pytest.mark.parametrize("bad, error", [(None, InvalidArgumentType), ("", InvalidArgument),
                                        ("x" * 1025, InvalidArgument), (b"bytes", InvalidArgumentType)])
def test_bad_identifiers_are_refused_naming_the_argument(bad: object, error: type) -> None:
    mcp_redis.configure(sessions="local")
    store = SessionStore()
    with pytest.raises(error, match="session_key"):
        store.bind(bad, "agent")  # type: ignore[arg-type]
    with pytest.raises(error, match="agent_id"):
        store.bind("s", bad)  # type: ignore[arg-type]
    with pytest.raises(error, match="session_key"):
        store.get(bad)  # type: ignore[arg-type]
    with pytest.raises(error, match="prefix"):
        store.resolve_agent_prefix(bad)  # type: ignore[arg-type]
    assert store.get("s") is None


def test_off_mode_raises_feature_disabled() -> None:
    mcp_redis.configure(sessions="off")
    store = SessionStore()
    for call in (lambda: store.bind("s", "a"), lambda: store.get("s"), lambda: store.unbind("s"),
                 lambda: store.touch("s"), lambda: store.sessions_for("a")):
        with pytest.raises(FeatureDisabled):
            call()


# -- Redis layout ---------------------------------------------------------------------------------------
def test_every_key_written_has_a_ttl_and_the_prefix(redis_only: SessionStore, redis_url: str) -> None:
    for sid in ODD_IDS + ["plain"]:
        redis_only.bind(sid, "agent-" + sid, ttl=30)
    redis_only.bind("plain", "other")
    redis_only.touch("plain")
    redis_only.sessions_for("other")
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = client.keys("*")
    assert len(keys) > len(ODD_IDS)
    for key in keys:
        assert key.startswith(b"mcp:")
        assert 0 < client.pttl(key) <= 2 * 3600 * 1000, key  # the index: twice the longest ttl


def test_concurrent_rebinds_leave_the_session_in_exactly_its_agents_index(redis_only: SessionStore,
                                                                         redis_url: str) -> None:
    agents = ["a0", "a1", "a2", "a3"]
    errors: List[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                redis_only.bind("contended", agents[(n + i) % 4])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = redis_only.get("contended")
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for agent in agents:
        members = indexed_sessions(client, agent)
        assert ("contended" in members) == (agent == final), (agent, final, members)


def test_touch_slides_redis_expiry_and_refreshes_postgres_at_most_once_per_interval(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    store = SessionStore(refresh_interval=60)
    store.bind("s1", "agent-1", ttl=10)
    assert client.pttl(binding_key("s1")) <= 10_000
    METRICS.clear()
    for _ in range(5):
        assert store.touch("s1", ttl=100) == "agent-1"
    assert 90_000 < client.pttl(binding_key("s1")) <= 100_000
    assert METRICS.counter("session_touch_refresh_total") == 1
    conn = psycopg2.connect(pg_database.dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT extract(epoch FROM expires_at - now()) FROM mcp_redis.sessions")
        assert 90 < cur.fetchone()[0] <= 100
    conn.close()
    sliding = SessionStore(sliding=True, refresh_interval=0)
    client.pexpire(binding_key("s1"), 5_000)
    assert sliding.get("s1") == "agent-1"
    assert client.pttl(binding_key("s1")) > 5_000


def test_redis_only_mode_fails_loudly_while_redis_is_down(own_redis: RedisServer) -> None:
    mcp_redis.configure(redis_url=own_redis.url)
    store = SessionStore()
    store.bind("s1", "agent-1")
    own_redis.stop()
    with pytest.raises(BackendUnavailable):
        store.bind("s2", "agent-2")
    with pytest.raises(BackendUnavailable):
        store.get("s1")


# -- write-through: PostgreSQL is the source of truth ----------------------------------------
def test_binding_made_by_process_a_is_read_by_b_and_survives_an_empty_redis_restart(
        own_redis: RedisServer, database_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=workers_sessions.bind_once,
                         args=(own_redis.url, database_url, "sess\x00A", "agent\ud800A"))
    writer.start()
    requests, replies = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=workers_sessions.reader_loop, args=(own_redis.url, database_url, requests, replies))
    reader.start()
    try:
        writer.join(60)
        assert writer.exitcode == 0
        assert replies.get(timeout=60) == "ready"
        requests.put(("get", "sess\x00A"))
        assert replies.get(timeout=30) == ("ok", "agent\ud800A")

        own_redis.restart()  # empty: nothing is persisted
        client = own_redis.client(encoding_errors="surrogatepass")
        assert client.get(binding_key("sess\x00A")) is None
        requests.put(("get", "sess\x00A"))
        assert replies.get(timeout=30) == ("ok", "agent\ud800A")  # from PostgreSQL
        assert agent_of(client.get(binding_key("sess\x00A"))) == "agent\ud800A"  # and Redis holds it again
        assert 0 < client.pttl(binding_key("sess\x00A")) <= 3600_000
    finally:
        requests.put(None)
        reader.join(30)
        if reader.is_alive():
            reader.kill()


def test_a_thousand_bindings_made_while_redis_is_down_are_all_in_redis_after_it_returns(
        own_redis: RedisServer, database_url: str, pg_database: PostgresDatabase) -> None:
    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    store = SessionStore()
    store.bind("warm-up", "agent-0")
    own_redis.stop()
    n = 1000

    def bind_range(start: int) -> None:
        for i in range(start, n, 4):
            store.bind(f"down-{i}", f"agent-{i % 10}", ttl=600)

    threads = [threading.Thread(target=bind_range, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("down-7") == "agent-7"  # served by PostgreSQL meanwhile
    own_redis.start()
    client = own_redis.client()
    keys = [binding_key(f"down-{i}") for i in range(n)]
    wait_for(lambda: client.exists(*keys) == n, timeout=30, what="the replay of 1,000 bindings")
    values = [agent_of(v) for v in client.mget(keys)]
    assert values == [f"agent-{i % 10}" for i in range(n)]  # 0 lost, none wrong
    assert all(0 < client.pttl(k) <= 600_000 for k in keys[:50])
    assert len(indexed_sessions(client, "agent-3")) == n // 10
    wait_for(lambda: not pg_rows(pg_database, "redis_pending"), timeout=10, what="pending flags cleared")
    assert METRICS.counter("session_replayed_total") >= n


def test_pending_rows_of_a_process_that_died_are_replayed_by_another(
        own_redis: RedisServer, database_url: str) -> None:
    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    store = SessionStore()
    own_redis.stop()
    for i in range(20):
        store.bind(f"orphan-{i}", "agent-x")
    mcp_redis.reset()  # this process's replayer is gone, as if it had died
    own_redis.start()
    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    assert mcp_redis.sessions.replay_pending() == 20
    client = own_redis.client()
    assert [agent_of(v) for v in client.mget([binding_key(f"orphan-{i}") for i in range(20)])] == ["agent-x"] * 20


def test_unbind_while_redis_is_unreachable_is_forgotten_by_redis_when_it_returns(
        own_redis: RedisServer, database_url: str) -> None:
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url)
        store = SessionStore()
        store.bind("gone", "agent-1")
        store.bind("moved", "agent-1")
        client = own_redis.client()
        assert agent_of(client.get(binding_key("gone"))) == "agent-1"
        proxy.drop()  # Redis keeps its data but this process cannot reach it
        assert store.unbind("gone") is True
        store.bind("moved", "agent-2")
        assert store.get("gone") is None and store.get("moved") == "agent-2"  # PostgreSQL answers
        assert agent_of(client.get(binding_key("gone"))) == "agent-1"  # stale, until replay
        proxy.pass_through()
        wait_for(lambda: client.get(binding_key("gone")) is None and agent_of(client.get(binding_key("moved"))) == "agent-2",
                 timeout=20, what="the replay of an unbind and a rebind")
        assert store.get("gone") is None
        assert store.sessions_for("agent-1") == []


def test_changes_made_by_a_process_cut_off_from_redis_reach_the_others_at_their_next_sweep(
        own_redis: RedisServer, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the writer's link is down (one host partitioned): the others
    # still read Redis, where the old bindings are. Their sweepers replay the
    # writer's pending rows from PostgreSQL while it is still cut off.
    monkeypatch.setattr(mcp_redis.sessions.replay, "SWEEP_EVERY", 0.5)
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        writer_client = mcp_redis.Client(redis_url=proxy.url(), database_url=database_url)
        reader_client = mcp_redis.Client(redis_url=own_redis.url, database_url=database_url)
        try:
            writer, reader = SessionStore(client=writer_client), SessionStore(client=reader_client)
            writer.bind("rebound", "agent-old")
            writer.bind("unbound", "agent-old")
            assert reader.get("rebound") == reader.get("unbound") == "agent-old"
            proxy.drop()
            writer.bind("rebound", "agent-new")
            assert writer.unbind("unbound") is True
            assert writer.get("rebound") == "agent-new"  # from PostgreSQL
            wait_for(lambda: reader.get("rebound") == "agent-new" and reader.get("unbound") is None,
                     timeout=10, what="the reader's sweep to replay the cut-off writer's rows")
        finally:
            writer_client.close()
            reader_client.close()


def test_a_client_dropped_without_close_takes_its_sweeper_with_it(own_redis: RedisServer, database_url: str) -> None:
    def sweepers() -> int:
        return sum(t.name == "mcp_redis-session-sweep" and t.is_alive() for t in threading.enumerate())

    before = sweepers()
    clients = [mcp_redis.Client(redis_url=own_redis.url, database_url=database_url) for _ in range(5)]
    for i, client in enumerate(clients):
        SessionStore(client=client).bind(f"dropped-{i}", "agent-1")
    assert sweepers() == before + 5, "each write-through client sweeps"
    del client
    clients.clear()  # never closed
    gc.collect()
    wait_for(lambda: sweepers() == before, timeout=5, what="the dropped clients' sweepers to end")


def test_read_repair_restores_the_remaining_ttl(write_through: SessionStore, redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    write_through.bind("s1", "agent-1", ttl=100)
    client.flushall()
    assert write_through.get("s1") == "agent-1"
    assert 90_000 < client.pttl(binding_key("s1")) <= 100_000
    assert METRICS.counter("session_read_repair_total", result="hit") == 1


def test_expired_postgres_row_is_not_served_nor_repaired(write_through: SessionStore, redis_url: str,
                                                        pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    write_through.bind("old", "agent-old", ttl=100)
    pg_exec(pg_database, "UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second'")
    client.flushall()
    assert write_through.get("old") is None
    assert write_through.touch("old") is None
    assert client.exists(binding_key("old")) == 0
    assert write_through.sessions_for("agent-old") == []


def test_expired_postgres_row_is_not_served_while_redis_is_down(own_redis: RedisServer, database_url: str,
                                                                pg_database: PostgresDatabase) -> None:
    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    store = SessionStore()
    store.bind("old", "agent-old", ttl=100)
    store.bind("live", "agent-live", ttl=100)
    pg_exec(pg_database, "UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second' WHERE session_key = 'old'")
    own_redis.stop()
    assert store.get("old") is None
    assert store.get("live") == "agent-live"


def test_postgres_stores_odd_identifiers_safely(write_through: SessionStore, pg_database: PostgresDatabase,
                                                redis_url: str) -> None:
    import redis

    for sid in ODD_IDS:
        write_through.bind(sid, sid + "\x00agent")
    rows = pg_rows(pg_database)
    assert sorted(r[0] for r in rows) == sorted(encode_id(s) for s in ODD_IDS)
    redis.Redis.from_url(redis_url).flushall()
    for sid in ODD_IDS:
        assert write_through.get(sid) == sid + "\x00agent"  # decoded from PostgreSQL


def test_cleanup_expired_deletes_only_expired_rows(write_through: SessionStore, pg_database: PostgresDatabase,
                                                   redis_url: str) -> None:
    write_through.bind("a", "agent", ttl=100)
    write_through.bind("b", "agent", ttl=100)
    pg_exec(pg_database, "UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second' WHERE session_key = 'a'")
    # Ended in Redis too (a row whose binding Redis still has live is kept: tests/sessions/test_sources.py).
    import redis

    redis.Redis.from_url(redis_url).delete(binding_key("a"))
    assert mcp_redis.sessions.cleanup_expired() == 1
    assert [r[0] for r in pg_rows(pg_database)] == ["b"]
    assert write_through.cleanup_expired() == 0


def test_store_replay_and_cleanup_act_on_the_stores_own_client_not_the_default_one(
        redis_url: str, database_url: str, pg_database: PostgresDatabase) -> None:
    mcp_redis.configure(sessions="local")  # the default client has no PostgreSQL at all
    with mcp_redis.Client(redis_url=redis_url, database_url=database_url) as client:
        store = SessionStore(client=client)
        client.postgres().ensure_schema()
        pg_exec(pg_database, "INSERT INTO mcp_redis.sessions (session_key, agent_id, expires_at, redis_pending) "
                             "VALUES ('pending', 'agent-p'::bytea, now() + interval '1 hour', true), "
                             "('expired', 'agent-e'::bytea, now() - interval '1 second', false)")
        assert store.replay_pending() == 1
        import redis

        assert agent_of(redis.Redis.from_url(redis_url, decode_responses=True).get(binding_key("pending"))) == "agent-p"
        assert store.cleanup_expired() == 1
        assert [r[0] for r in pg_rows(pg_database)] == ["pending"]


def test_local_mode_keeps_bindings_in_process_and_writes_no_redis_keys(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, sessions="local")
    store = SessionStore()
    store.bind("s1", "agent-1")
    assert store.get("s1") == "agent-1"
    import redis

    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_index_queries_fall_back_to_redis_while_postgres_is_down(redis_url: str, database_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("s1", "agent-pg-down")
    mcp_redis.configure(database_url="postgresql://postgres@127.0.0.1:1/nowhere")  # nothing listens there
    assert store.get("s1") == "agent-pg-down"  # Redis hit: PostgreSQL not needed
    assert store.sessions_for("agent-pg-down") == ["s1"]
    assert store.resolve_agent_prefix("agent-pg") == "agent-pg-down"
    with pytest.raises(BackendUnavailable):
        store.bind("s2", "agent-pg-down")  # the source of truth is down: no silent Redis-only write
    with pytest.raises(BackendUnavailable):
        store.update("s1", client_type="sse")  # nor a Redis-only record change
    record = store.record("s1")  # a Redis hit: PostgreSQL not needed
    assert record is not None and record["bound_agent_id"] == "agent-pg-down" and "client_type" not in record


def test_concurrent_write_through_binds_leave_redis_agreeing_with_postgres(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    def worker(n: int) -> None:
        for i in range(15):
            write_through.bind("contended", f"agent-{(n + i) % 4}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import redis

    value = redis.Redis.from_url(redis_url, decode_responses=True).get(binding_key("contended"))
    [(_, agent_bytes, live, pending)] = pg_rows(pg_database)
    assert live and not pending
    in_redis, data = unpack(value)
    assert in_redis == bytes(agent_bytes).decode()  # both tiers end on the same last writer
    assert write_through.record("contended") == as_dict(in_redis, data)
    assert data is not None and data.bind_count == 60  # the source counted every bind, Redis holds its record


def test_hung_redis_is_bypassed_for_postgres_and_caught_up_when_it_answers(
        own_redis: RedisServer, database_url: str) -> None:
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url, socket_timeout=0.2)
        store = SessionStore()
        store.bind("before", "agent-1")
        proxy.blackhole()  # connections accepted, never answered
        assert store.get("before") == "agent-1"  # one attempt times out, PostgreSQL answers
        store.bind("during", "agent-2")
        assert store.get("during") == "agent-2"
        proxy.pass_through()
        client = own_redis.client()
        wait_for(lambda: agent_of(client.get(binding_key("during"))) == "agent-2", timeout=20,
                 what="the binding made while Redis hung")
        assert store.get("before") == "agent-1"


def test_the_replayer_is_a_daemon_thread_that_stops_on_reset(own_redis: RedisServer, database_url: str) -> None:
    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    own_redis.stop()
    SessionStore().bind("s1", "agent-1")

    def replayers() -> List[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "mcp_redis-session-replay"]

    assert replayers() and all(t.daemon for t in replayers())
    mcp_redis.reset()
    wait_for(lambda: not replayers(), timeout=10, what="the replayer to stop")


# -- sliding expiry against the source of truth ---------------------------------------------------
def pg_seconds_left(pg: PostgresDatabase, session_key: str) -> float:
    """How long PostgreSQL's row for `session_key` has left (negative: expired; -inf: no row)."""
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT extract(epoch FROM expires_at - clock_timestamp()) FROM mcp_redis.sessions "
                        "WHERE session_key = %s", (encode_id(session_key),))
            row = cur.fetchone()
            return -math.inf if row is None else float(row[0])
    finally:
        conn.close()


def pg_clock_after(pg: PostgresDatabase, seconds: float) -> Any:
    """PostgreSQL's clock `seconds` from now: a deadline to wait for on the server's own clock."""
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp() + %s * interval '1 second'", (seconds,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def pg_clock_passed(pg: PostgresDatabase, deadline: Any) -> bool:
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp() > %s", (deadline,))
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def test_touch_with_a_shorter_ttl_is_never_read_repaired_back_from_postgres(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    write_through.bind("s1", "agent-1", ttl=600)
    assert write_through.touch("s1", ttl=600) == "agent-1"  # PostgreSQL refreshed: the next touch is throttled
    assert write_through.touch("s1", ttl=1) == "agent-1"
    wait_for(lambda: client.exists(binding_key("s1")) == 0, timeout=10, what="the binding to expire in Redis")
    assert write_through.get("s1") is None
    assert write_through.touch("s1") is None
    assert client.exists(binding_key("s1")) == 0


def test_touch_with_a_shorter_ttl_is_never_read_repaired_back_after_redis_lost_its_data(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    write_through.bind("s1", "agent-1", ttl=600)
    assert write_through.touch("s1", ttl=600) == "agent-1"
    assert write_through.touch("s1", ttl=1) == "agent-1"
    deadline = pg_clock_after(pg_database, 1.0)  # the binding must be dead by then
    client.flushdb()
    wait_for(lambda: pg_clock_passed(pg_database, deadline), timeout=10, what="1 s on PostgreSQL's clock")
    assert write_through.get("s1") is None  # the Redis miss reads PostgreSQL: expired there too
    assert client.exists(binding_key("s1")) == 0


@pytest.mark.parametrize("lowered_by", ["a shorter touch", "a new bind", "another process's shorter touch"])
def test_postgres_expiry_lags_redis_by_less_than_the_refresh_interval_after_it_was_lowered(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase, lowered_by: str) -> None:
    """A touch skips PostgreSQL's rewrite only while what it would leave behind lags by less
    than `refresh_interval`: not after a shorter touch or a new bind (by any process) lowered
    PostgreSQL's expiry below what this process last wrote there."""
    import redis

    client = redis.Redis.from_url(redis_url)
    store = SessionStore(refresh_interval=150)
    store.bind("s1", "agent-1", ttl=600)
    assert store.touch("s1", ttl=600) == "agent-1"  # the rewrite: PostgreSQL at now + 600
    if lowered_by == "a shorter touch":
        assert store.touch("s1", ttl=2) == "agent-1"
    elif lowered_by == "a new bind":
        assert store.unbind("s1")
        store.bind("s1", "agent-1", ttl=2)
    else:
        other = mcp_redis.Client(redis_url=redis_url, database_url=pg_database.url)
        try:
            assert SessionStore(client=other).touch("s1", ttl=2) == "agent-1"  # another client, another throttle
        finally:
            other.close()
    assert pg_seconds_left(pg_database, "s1") <= 2
    assert store.touch("s1", ttl=600) == "agent-1"
    assert client.pttl(binding_key("s1")) > 590_000
    assert pg_seconds_left(pg_database, "s1") > 590  # was 2: a lag of the whole ttl
    assert store.sessions_for("agent-1") == ["s1"]


def test_a_touch_with_a_longer_ttl_than_the_last_rewrite_rewrites_postgres_and_the_index(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    store = SessionStore(refresh_interval=150)
    store.bind("s1", "agent-1", ttl=60)
    assert store.touch("s1", ttl=60) == "agent-1"  # the rewrite: PostgreSQL at now + 60
    assert store.touch("s1", ttl=6000) == "agent-1"  # skipped, it would lag by 5940 s
    assert pg_seconds_left(pg_database, "s1") > 5990
    assert client.pttl(INDEX_KEY) > 6_000_000  # the index outlives the binding


def test_redis_only_a_touch_with_a_longer_ttl_keeps_the_index_alive_as_long_as_the_binding(
        redis_only: SessionStore, redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    store = SessionStore(refresh_interval=150)
    store.bind("s1", "agent-1", ttl=1)
    assert store.touch("s1", ttl=1) == "agent-1"  # the index refreshed for a 1 s binding
    assert store.touch("s1", ttl=600) == "agent-1"
    assert client.pttl(binding_key("s1")) > 590_000
    assert client.pttl(INDEX_KEY) > 590_000  # was 2 s: the index went first, sessions_for missed it
    assert store.sessions_for("agent-1") == ["s1"]


def test_a_refresh_that_could_not_read_redis_is_made_by_the_next_touch(
        redis_server: RedisServer, database_url: str, pg_database: PostgresDatabase) -> None:
    """The refresh reads what Redis has left with the row locked; when that read fails it leaves
    PostgreSQL's expiry as it was, and the next touch must try again (it was counted as done:
    PostgreSQL lagged by up to twice the interval, expired while Redis served the binding)."""
    import redis

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url, socket_timeout=0.5,
                            retry_attempts=1, breaker_failure_threshold=100)
        store = SessionStore(refresh_interval=150)
        store.bind("s1", "agent-1", ttl=60)
        assert store.touch("s1", ttl=60) == "agent-1"  # every script loaded (none sent in full below)
        store.bind("s1", "agent-1", ttl=60)
        proxy.swallow_requests(b"PTTL")  # the refresh's read of the binding's time left goes unanswered
        assert store.touch("s1", ttl=600) == "agent-1"
        assert pg_seconds_left(pg_database, "s1") < 61  # left as it was
        assert METRICS.counter("session_refresh_missed_total") == 1
        proxy.swallow_requests(None)
        assert store.touch("s1", ttl=600) == "agent-1"  # tries again
        assert pg_seconds_left(pg_database, "s1") > 590
        assert redis.Redis(port=redis_server.port).pttl(binding_key("s1")) > 590_000


def test_a_refresh_that_waited_on_the_row_lock_writes_redis_expiry_not_one_early_by_the_wait(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    mcp_redis.configure(redis_url=redis_url, database_url=pg_database.url, postgres_timeout=6)
    store = SessionStore(refresh_interval=150)
    store.bind("s1", "agent-1", ttl=600)
    locked, let_go = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        conn = psycopg2.connect(pg_database.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT 1 FROM mcp_redis.sessions WHERE session_key = %s FOR UPDATE",
                            (encode_id("s1"),))
                locked.set()
                let_go.wait(10)
        finally:
            conn.close()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    assert locked.wait(10)
    threading.Timer(1.5, let_go.set).start()
    assert store.touch("s1", ttl=600) == "agent-1"  # due: waits 1.5 s for the row
    holder.join(10)
    redis_left = redis.Redis.from_url(redis_url).pttl(binding_key("s1")) / 1000
    assert abs(redis_left - pg_seconds_left(pg_database, "s1")) < 0.5  # was 1.5 s early


def _pg_expires_ms(pg: PostgresDatabase, session_key: str) -> int:
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn.cursor() as cur:  # (PostgreSQL and Redis on this machine's clock)
            cur.execute("SELECT floor(extract(epoch FROM expires_at) * 1000)::bigint FROM mcp_redis.sessions "
                        "WHERE session_key = %s", (encode_id(session_key),))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_a_refresh_over_a_slow_link_never_sets_postgres_expiry_past_redis(
        redis_server: RedisServer, database_url: str, pg_database: PostgresDatabase) -> None:
    """The refresh caps PostgreSQL's expiry at what Redis has left, read with the row locked. Added
    to the time of the write after the read (`clock_timestamp()` there), the cap ran past Redis's
    expiry by the read's trip, and `get` read the binding back from PostgreSQL after Redis had
    let it go. It counts from the touch's own write, made before the read."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url)
        store = SessionStore(refresh_interval=150)
        store.bind("s1", "agent-1", ttl=60)
        proxy.add_latency(0.3)
        assert store.touch("s1", ttl=600) == "agent-1"  # due: capped at Redis's time left
        proxy.add_latency(0)
    redis_expires_ms = redis_server.client().pexpiretime(binding_key("s1"))
    pg_expires_ms = _pg_expires_ms(pg_database, "s1")
    assert pg_expires_ms <= redis_expires_ms, pg_expires_ms - redis_expires_ms  # was 300 ms past it


def test_cleanup_catching_a_row_up_over_a_slow_link_never_sets_postgres_expiry_past_redis(
        redis_server: RedisServer, database_url: str, pg_database: PostgresDatabase) -> None:
    """A row past its expiry whose binding Redis still has catches up with Redis's time left.
    Counted from the UPDATE's now(), after Redis's answer came back, it ran past Redis's expiry by
    that trip (a reviewer: 805 ms over a slow link, and `get` read the binding back from
    PostgreSQL after Redis let it go); it counts from a time read before Redis was asked."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url)
        store = SessionStore()
        store.bind("s1", "agent-1", ttl=60)
        pg_exec(pg_database, "UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second'")
        proxy.add_latency(0.3)
        mcp_redis.sessions.cleanup_expired()
        proxy.add_latency(0)
    redis_expires_ms = redis_server.client().pexpiretime(binding_key("s1"))
    pg_expires_ms = _pg_expires_ms(pg_database, "s1")
    assert redis_expires_ms - 2_000 < pg_expires_ms <= redis_expires_ms, pg_expires_ms - redis_expires_ms


def test_redis_only_a_rebind_with_a_shorter_ttl_then_a_longer_touch_refreshes_the_index(
        redis_only: SessionStore, redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    store = SessionStore(refresh_interval=150)
    store.bind("s1", "agent-1", ttl=1)
    assert store.touch("s1", ttl=600) == "agent-1"
    assert store.unbind("s1")  # the index's last member: the index goes
    store.bind("s1", "agent-1", ttl=1)  # ... and comes back for a 1 s binding
    assert store.touch("s1", ttl=600) == "agent-1"
    assert client.pttl(INDEX_KEY) > 590_000  # was 2 s
    assert store.sessions_for("agent-1") == ["s1"]


def test_a_longer_touch_from_a_sliding_get_keeps_working_and_a_shorter_one_reaches_postgres(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    sliding = SessionStore(sliding=True, ttl=600)
    write_through.bind("s1", "agent-1", ttl=60)
    assert sliding.get("s1") == "agent-1"
    assert 590_000 < client.pttl(binding_key("s1")) <= 600_000
    assert 590 < pg_seconds_left(pg_database, "s1") <= 600
    assert write_through.touch("s1", ttl=30) == "agent-1"
    assert client.pttl(binding_key("s1")) <= 30_000
    assert pg_seconds_left(pg_database, "s1") <= 30


def test_sliding_reads_and_touch_keep_working_from_redis_while_postgres_is_down(
        redis_url: str, database_url: str, pg_database: PostgresDatabase) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    pg_url = urlsplit(database_url)
    with FaultProxy(pg_url.hostname or "127.0.0.1", pg_url.port or 5432) as proxy:
        through_proxy = urlunsplit(pg_url._replace(netloc=f"{pg_url.username}@127.0.0.1:{proxy.port}"))
        mcp_redis.configure(redis_url=redis_url, database_url=through_proxy, postgres_timeout=1,
                            breaker_reset_timeout=0.2)
        store = SessionStore(sliding=True, ttl=60)
        store.bind("s1", "agent-1", ttl=2)
        proxy.drop()  # PostgreSQL unreachable for the store (the machine's server keeps running)

        assert store.get("s1") == "agent-1"  # sliding: Redis extended, PostgreSQL's refresh missed
        assert store.touch("s1") == "agent-1"
        assert client.pttl(binding_key("s1")) > 50_000
        assert METRICS.counter("session_refresh_missed_total") == 2  # each touch tried PostgreSQL again
        assert SessionStore().get("s1") == "agent-1"
        with pytest.raises(BackendUnavailable):
            store.bind("s2", "agent-2")  # the source of truth is down: no silent Redis-only write
        with pytest.raises(BackendUnavailable):
            store.touch("s1", ttl=1)  # a shorter expiry needs the source of truth, like bind
        assert client.pttl(binding_key("s1")) > 50_000  # ... and changed nothing
        assert client.exists(binding_key("s2")) == 0

        wait_for(lambda: pg_seconds_left(pg_database, "s1") < 0, timeout=10,
                 what="PostgreSQL's row to expire while it is unreachable")
        proxy.pass_through()
        wait_for(lambda: store.get("s1") == "agent-1" and pg_seconds_left(pg_database, "s1") > 50, timeout=20,
                 what="PostgreSQL's expiry to catch up on a touch after it returns")
        client.flushdb()
        assert SessionStore().get("s1") == "agent-1"  # read repair from the caught-up row


def test_a_late_postgres_refresh_never_lengthens_past_a_shorter_touch_made_meanwhile(
        write_through: SessionStore, redis_url: str, pg_database: PostgresDatabase,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Touch A extends Redis; touch B (a shorter ttl) completes before A's PostgreSQL refresh lands."""
    import redis

    client = redis.Redis.from_url(redis_url)
    write_through.bind("s1", "agent-1", ttl=600)
    refresh = PostgresBackend.extend
    interleaved: List[str] = []

    def b_first_then_a(self: Any, *args: Any, **kwargs: Any) -> None:
        if not interleaved:
            interleaved.append("b")
            assert write_through.touch("s1", ttl=1) == "agent-1"  # B: PostgreSQL then Redis
        refresh(self, *args, **kwargs)  # A's refresh, late

    monkeypatch.setattr(PostgresBackend, "extend", b_first_then_a)
    assert write_through.touch("s1", ttl=600) == "agent-1"  # A: Redis extended, then the late refresh
    assert interleaved == ["b"]
    assert pg_seconds_left(pg_database, "s1") <= 1
    wait_for(lambda: client.exists(binding_key("s1")) == 0, timeout=10, what="the binding to expire in Redis")
    assert write_through.get("s1") is None


def test_the_refresh_throttle_reads_no_slow_reply_as_a_lowered_expiry_and_every_real_lowering_as_one() -> None:
    """What the binding had left before a touch, against the expiry this client's last rewrite
    gave it: a rewrite whose reply came 0.2 s after it was sent, then a touch answered at once,
    read as "lowered by another process" and rewrote again within the interval (a reviewer: 8
    rewrites in 6 s at a 1 s interval over a jittery link). A real lowering still rewrites."""
    import time

    from mcp_redis.sessions.redis import RefreshThrottle

    throttle = RefreshThrottle()
    sent = time.monotonic() - 0.2  # the rewrite's touch: sent 0.2 s ago, answered now
    assert throttle.due("s1", "agent-1", 1.0, 60.0, left=None, sent=sent)
    # The next touch, answered at once: Redis's expiry is still the one that touch gave it.
    left = (sent + 60.0) - time.monotonic()
    assert not throttle.due("s1", "agent-1", 1.0, 60.0, left=left, sent=time.monotonic())
    # Another process shortened it to 2 s since: the next extending touch rewrites.
    assert throttle.due("s1", "agent-1", 1.0, 60.0, left=2.0, sent=time.monotonic())
