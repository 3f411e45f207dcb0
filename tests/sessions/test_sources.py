"""Write-through over each source of truth: the library's table and the legacy adapter.

The Redis-facing guarantees of write-through (read repair after Redis lost
its data, no binding lost through an outage, unbinds replayed) hold whatever
`Source` stands behind Redis: parametrised over ``table`` (`PostgresBackend`,
``mcp_redis.sessions``) and ``legacy`` (``examples/legacy_sessions.py`` over
the legacy server's ``core.sessions`` + ``core.identities``).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import psycopg2
import pytest

import mcp_redis
from mcp_redis import SessionStore
from mcp_redis.errors import ConfigurationError, InvalidArgument
from mcp_redis.metrics import METRICS
from mcp_redis.sessions import use_source
from mcp_redis.sessions.records import agent_of, unpack, unpack_fields
from mcp_redis.testing import PostgresDatabase, RedisServer, wait_for
from mcp_redis.testing.faultproxy import FaultProxy
from tests.sessions import legacy
from tests.sessions.test_sessions import binding_key

LEGACY = legacy.load_example()


@pytest.fixture
def own_redis(redis_factory: Any) -> RedisServer:
    """A redis-server this test may stop and restart (empty) on the same port."""
    server: RedisServer = redis_factory()
    return server


@pytest.fixture(params=["table", "legacy"])
def configure(request: pytest.FixtureRequest, database_url: str,
              pg_database: PostgresDatabase) -> Callable[[str], None]:
    """``configure(redis_url)``: write-through with this test's source of truth."""
    if request.param == "legacy":
        legacy.install(pg_database.dsn)

    def run(redis_url: str) -> None:
        mcp_redis.configure(redis_url=redis_url, database_url=database_url)
        if request.param == "legacy":
            use_source(LEGACY.LegacySessionsSource.factory(register=legacy.register))

    return run


def test_read_repair_after_flushdb_restores_the_binding_and_its_remaining_ttl(
        configure: Callable[[str], None], redis_url: str) -> None:
    import redis

    configure(redis_url)
    store = SessionStore()
    store.bind("s1", "agent-1", ttl=100, client_type="sse", client_info={"ua": "x"}, turns=1)
    store.update("s1", turns=2)
    before = store.record("s1")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    assert store.record("s1") == before  # the record, repaired from the source with the binding
    client.flushdb()
    assert store.get("s1") == "agent-1"
    assert agent_of(client.get(binding_key("s1"))) == "agent-1"
    assert 90_000 < client.pttl(binding_key("s1")) <= 100_000
    assert METRICS.counter("session_read_repair_total", result="hit") == 2  # record(), then get()
    assert store.sessions_for("agent-1") == ["s1"]


def test_update_keeps_the_longer_expiry_that_touches_gave_the_binding_in_redis(
        configure: Callable[[str], None], redis_url: str) -> None:
    """Touches slide Redis's expiry; the source's follows only at the throttled refresh.
    An update hands Redis the source's record but must not cut Redis's expiry back to the source's."""
    import redis

    configure(redis_url)
    store = SessionStore(ttl=7200, refresh_interval=3600)
    store.bind("s1", "agent-1", ttl=600)
    store.touch("s1", ttl=3000)  # the source follows (its first refresh)
    store.touch("s1", ttl=6000)  # throttled: the source stays at ~3000 s
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.pttl(binding_key("s1")) > 5_900_000
    assert store.update("s1", client_type="sse") is not None
    assert client.pttl(binding_key("s1")) > 5_900_000
    assert store.record("s1")["client_type"] == "sse"


def test_update_of_a_binding_live_in_redis_but_expired_in_postgres_applies_and_postgres_catches_up(
        redis_url: str, database_url: str) -> None:
    import redis

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("live", "agent-1", ttl=60, turns=1)
    store.bind("gone", "agent-2", ttl=60, turns=1)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(binding_key("gone"))  # ended in Redis (as by its TTL), not yet in PostgreSQL
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:  # PostgreSQL's expiry behind Redis's (its refresh is throttled)
        cur.execute("UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second'")
    assert store.update("live", turns=2) is not None
    assert store.record("live")["turns"] == 2
    assert 50_000 < client.pttl(binding_key("live")) <= 60_000
    assert store.update("gone", turns=2) is None  # live nowhere: not bound, nothing changed
    with conn.cursor() as cur:
        cur.execute("SELECT session_key, extract(epoch FROM expires_at - now()), record -> 'fields' -> 'turns' "
                    "FROM mcp_redis.sessions ORDER BY session_key")
        rows = {key: (float(left), turns) for key, left, turns in cur.fetchall()}
    conn.close()
    live_key = next(k for k in rows if rows[k][1] == 2)
    assert 50 < rows[live_key][0] <= 60  # caught up with Redis's expiry
    assert [v for k, v in rows.items() if k != live_key][0][1] == 1  # the other row untouched
    assert client.get(binding_key("gone")) is None


def _expire_in_postgres(database_url: str, pending: bool = False) -> None:
    """Put every row past its expiry (as a throttled refresh leaves it behind Redis's)."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("UPDATE mcp_redis.sessions SET expires_at = now() - interval '1 second', redis_pending = %s",
                    (pending,))
    conn.close()


def _pg_row(database_url: str) -> Any:
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT expires_at > now(), redis_pending, record -> 'fields' FROM mcp_redis.sessions")
        row = cur.fetchone()
    conn.close()
    return row


def test_an_expired_row_with_changes_redis_has_not_taken_does_not_catch_up_with_redis(
        redis_url: str, database_url: str) -> None:
    """A pending row is newer than Redis's binding (e.g. a shorter touch made while Redis was
    unreachable): Redis's longer expiry must not bring it back."""
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("s", "agent-1", ttl=600, turns=1)
    _expire_in_postgres(database_url, pending=True)
    assert store.update("s", turns=2) is None
    assert _pg_row(database_url) == (False, True, {"turns": 1})


def test_an_update_whose_redis_reply_is_lost_ends_the_same_in_both_stores(
        own_redis: RedisServer, database_url: str) -> None:
    """The row past its expiry, Redis's binding live, the first reply of the update cut: what
    the caller is told is what both stores end with."""

    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url)
        store = SessionStore()
        store.bind("s", "agent-1", ttl=600, turns=1)
        _expire_in_postgres(database_url)
        proxy.reset_next_reply()
        result = store.update("s", turns=2)
        store.replay_pending()
        redis_record = store.record("s")
    expected = 1 if result is None else 2
    assert redis_record is not None and redis_record["turns"] == expected, result
    assert _pg_row(database_url)[2] == {"turns": expected}


def test_cleanup_keeps_a_row_whose_binding_redis_still_has_live_and_it_catches_up(
        own_redis: RedisServer, database_url: str) -> None:
    """Touches slide Redis's expiry ahead of the row's: the cron cleanup must not delete the row of
    a session Redis still serves (it would vanish from sessions_for, refuse updates, and be lost
    with Redis's data)."""
    import redis

    mcp_redis.configure(redis_url=own_redis.url, database_url=database_url)
    store = SessionStore()
    store.bind("live", "agent-1", ttl=600)
    store.bind("gone", "agent-2", ttl=600)
    store.bind("moved", "agent-3", ttl=600)
    raw = redis.Redis(port=own_redis.port)
    raw.delete(binding_key("gone"))  # ended in Redis
    store.bind("moved", "agent-4", ttl=600)
    _expire_in_postgres(database_url)  # every row past its expiry; "moved" Redis names agent-4 now...
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:  # ... and its row, the agent before (as Redis ahead of a lost write)
        cur.execute("UPDATE mcp_redis.sessions SET agent_id = 'agent-3' WHERE agent_id = 'agent-4'")
    assert store.cleanup_expired() == 2
    with conn.cursor() as cur:
        cur.execute("SELECT agent_id, extract(epoch FROM expires_at - now()) FROM mcp_redis.sessions")
        rows = cur.fetchall()
    assert [bytes(agent).decode() for agent, _ in rows] == ["agent-1"] and 590 < float(rows[0][1]) <= 600
    assert store.sessions_for("agent-1") == ["live"] and store.update("live", turns=1) is not None
    # Redis down: nothing is deleted, the caller is told.
    _expire_in_postgres(database_url)
    own_redis.stop()
    with pytest.raises(mcp_redis.BackendUnavailable):
        store.cleanup_expired()
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mcp_redis.sessions")
        assert cur.fetchone()[0] == 1
    conn.close()


def test_cleanup_leaves_a_row_rebound_between_asking_redis_and_deleting(
        redis_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis is asked with no row locked: a row rebound to another agent meanwhile (and, after a
    stall, past its expiry again) is neither deleted nor given the old agent's expiry."""
    import redis

    from mcp_redis.sessions.redis import RedisTier

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("gone", "agent-a", ttl=600)
    store.bind("live", "agent-a", ttl=600)
    raw = redis.Redis.from_url(redis_url)
    raw.delete(binding_key("gone"))
    _expire_in_postgres(database_url)
    original = RedisTier.live_lefts

    def then_rebind(self: Any, bindings: Any) -> Any:
        lefts = original(self, bindings)  # gone: 0, live: ~600 s, for agent-a
        store.bind("gone", "agent-b", ttl=600)
        store.bind("live", "agent-b", ttl=5)
        _expire_in_postgres(database_url)  # as after a stall longer than those rows' expiry
        return lefts

    monkeypatch.setattr(RedisTier, "live_lefts", then_rebind)
    assert store.cleanup_expired() == 0
    monkeypatch.undo()
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT session_key, agent_id, expires_at > now() FROM mcp_redis.sessions ORDER BY 1")
        rows = [(key, bytes(agent).decode(), live) for key, agent, live in cur.fetchall()]
    conn.close()
    assert [(agent, live) for _, agent, live in rows] == [("agent-b", False), ("agent-b", False)]
    assert store.get("gone") == "agent-b"


def test_an_expired_row_never_takes_its_expiry_from_another_bind_of_its_agent_in_redis(
        redis_url: str, database_url: str) -> None:
    """A bind of the same agent that Redis holds but the row does not (a write in flight, whose
    COMMIT may yet fail): neither cleanup nor update brings the expired row back on its expiry."""
    import redis

    from mcp_redis.sessions.records import RecordData, pack

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore()
    store.bind("a", "agent-a", ttl=600, x=1)
    store.bind("b", "agent-a", ttl=600, x=1)
    record = store.record("a")
    _expire_in_postgres(database_url)
    raw = redis.Redis.from_url(redis_url)
    for key in ("a", "b"):  # what a new bind of agent-a leaves in Redis before its COMMIT
        newer = RecordData(record["bound_at"] + 5, 1, record["bound_at"] + 5, '')
        raw.set(binding_key(key), pack("agent-a", newer), px=600_000)
    assert store.update("a", x=2) is None
    assert store.cleanup_expired() == 2  # both rows end: expired, and not that bind's
    assert _pg_row(database_url) is None


def test_a_touch_never_brings_back_an_expired_row_from_another_bind_of_its_agent_in_redis(
        redis_url: str, database_url: str) -> None:
    """A touch rewrites the row only for the bind Redis holds (same agent, `bound_at`,
    `bind_count`). Redis holding a newer bind of the same agent than the expired row (a rebind in
    flight, whose COMMIT then fails and whose Redis write is forgotten) must not give the old row
    its expiry: neither an extending touch's refresh nor a shortening touch."""
    import redis

    from mcp_redis.sessions.records import RecordData, pack

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore(refresh_interval=0)  # every touch refreshes the row
    store.bind("a", "agent-a", ttl=600)
    store.bind("b", "agent-a", ttl=600)
    record = store.record("a")
    _expire_in_postgres(database_url)
    raw = redis.Redis.from_url(redis_url)
    newer = RecordData(record["bound_at"] + 5, 1, record["bound_at"] + 5, "")
    for key in ("a", "b"):  # what a rebind of agent-a leaves in Redis before its COMMIT
        raw.set(binding_key(key), pack("agent-a", newer), px=600_000)
    assert store.touch("a", ttl=1200) == "agent-a"  # extends Redis; the refresh must skip the row
    assert store.touch("b", ttl=60) == "agent-a"  # shorter: the row first, then Redis
    raw.delete(binding_key("a"), binding_key("b"))  # the COMMIT failed: Redis forgets that bind
    assert (store.get("a"), store.get("b")) == (None, None)  # read repair finds both rows expired
    conn = psycopg2.connect(database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mcp_redis.sessions WHERE expires_at > now()")
        assert cur.fetchone()[0] == 0
    conn.close()


def test_a_touch_reaches_a_live_row_of_a_newer_bind_of_its_agent_that_redis_has_not_taken(
        redis_url: str, database_url: str) -> None:
    """A rebind of the same agent made while Redis was unreachable is the committed binding
    (its row pending, Redis still holding the earlier bind): touches extend and shorten it."""
    import redis

    from mcp_redis.sessions.records import RecordData, pack

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore(refresh_interval=0)
    store.bind("a", "agent-a", ttl=600)
    record = store.record("a")
    store.bind("a", "agent-a", ttl=600)  # the row: bind_count 2
    older = RecordData(record["bound_at"], 1, record["bound_at"], "")
    redis.Redis.from_url(redis_url).set(binding_key("a"), pack("agent-a", older), px=600_000)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    for ttl, more_than in ((1200, 1100), (5, 0)):
        assert store.touch("a", ttl=ttl) == "agent-a"
        with conn.cursor() as cur:
            cur.execute("SELECT extract(epoch FROM expires_at - now()) BETWEEN %s AND %s, record ->> 'bind_count' "
                        "FROM mcp_redis.sessions", (more_than, ttl))
            assert cur.fetchone() == (True, "2"), ttl
    conn.close()


def test_expired_rows_against_an_older_bind_or_a_bare_agent_id_in_redis(redis_url: str, database_url: str) -> None:
    """Two rows past their expiry while Redis still serves their agent. A binding from before
    records (a bare agent id in Redis, left bare by the touches' refreshes: it is never a write
    in flight) catches up on a touch, an update and a cleanup, as any other. A rebind made while
    Redis was unreachable (its row pending, Redis holding the earlier bind) has ended: a touch of
    the earlier bind does not bring it back, and replay ends the session (the safe side)."""
    import redis

    from mcp_redis.sessions.records import RecordData, pack

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore(refresh_interval=0)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    store.bind("rebound", "agent-a", ttl=60)
    first = store.record("rebound")
    store.bind("rebound", "agent-a", ttl=60)  # bind_count 2 in the row ...
    older = RecordData(first["bound_at"], 1, first["bound_at"], "")
    raw.set(binding_key("rebound"), pack("agent-a", older), px=60_000)  # ... and Redis never took it
    store.bind("old", "agent-a", ttl=60)
    raw.set(binding_key("old"), "agent-a", px=60_000)  # the layout before records
    store.bind("old-rebound", "agent-a", ttl=60)  # a rebind Redis never took, over a bare value
    raw.set(binding_key("old-rebound"), "agent-a", px=60_000)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True

    def expire(key: str) -> None:
        with conn.cursor() as cur:
            cur.execute("UPDATE mcp_redis.sessions SET expires_at = now() - interval '200 milliseconds' "
                        "WHERE session_key = %s", (key,))

    def live(key: str) -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT expires_at > now() FROM mcp_redis.sessions WHERE session_key = %s", (key,))
            row = cur.fetchone()
        return bool(row and row[0])

    with conn.cursor() as cur:
        cur.execute("UPDATE mcp_redis.sessions SET redis_pending = true WHERE session_key LIKE '%rebound'")
        cur.execute("UPDATE mcp_redis.sessions SET record = '{}', created_at = now() - interval '1 hour' "
                    "WHERE session_key = 'old'")
    assert store.touch("old", ttl=60) == "agent-a"  # a refresh: the bare value stays bare
    assert raw.get(binding_key("old")) == "agent-a"
    for key in ("rebound", "old", "old-rebound"):
        expire(key)
        assert store.touch(key, ttl=600) == "agent-a"  # Redis had it live
    assert live("old") and not live("rebound") and not live("old-rebound")
    expire("old")
    assert store.update("old", x=1) is not None and live("old")  # caught up, then updated
    expire("old")
    assert store.cleanup_expired() == 0 and live("old")  # caught up; "rebound" was replayed: ended
    conn.close()
    raw.flushdb()
    assert (store.get("old"), store.get("rebound"), store.get("old-rebound")) == ("agent-a", None, None)


def test_no_binding_is_lost_through_a_redis_outage(configure: Callable[[str], None], own_redis: RedisServer) -> None:
    configure(own_redis.url)
    store = SessionStore()
    store.bind("warm-up", "agent-0")
    own_redis.stop()
    n = 200

    def bind_range(start: int) -> None:
        for i in range(start, n, 4):
            store.bind(f"down-{i}", f"agent-{i % 10}", ttl=600, client_type="sse", n=i)

    threads = [threading.Thread(target=bind_range, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("down-7") == "agent-7"  # the source answers meanwhile
    own_redis.start()
    client = own_redis.client()
    keys = [binding_key(f"down-{i}") for i in range(n)]
    wait_for(lambda: client.exists(*keys) == n, timeout=30, what="the replay of the bindings")
    assert [agent_of(v) for v in client.mget(keys)] == [f"agent-{i % 10}" for i in range(n)]  # 0 lost, none wrong
    assert sorted(store.sessions_for("agent-3")) == sorted(f"down-{i}" for i in range(3, n, 10))
    replayed = unpack(client.get(binding_key("down-7")))[1]  # the record came back with the binding
    assert replayed is not None and unpack_fields(replayed.fields) == {"client_type": "sse", "n": 7}


def test_an_unbind_made_while_redis_is_unreachable_reaches_redis_when_it_returns(
        configure: Callable[[str], None], own_redis: RedisServer) -> None:
    with FaultProxy("127.0.0.1", own_redis.port) as proxy:
        configure(proxy.url())
        store = SessionStore()
        store.bind("gone", "agent-1")
        client = own_redis.client()
        proxy.drop()
        assert store.unbind("gone") is True
        assert store.get("gone") is None  # the source answers
        assert agent_of(client.get(binding_key("gone"))) == "agent-1"  # stale, until replay
        proxy.pass_through()
        wait_for(lambda: client.get(binding_key("gone")) is None, timeout=20, what="the replay of an unbind")
        assert store.sessions_for("agent-1") == []


def test_pending_bindings_of_a_process_that_died_are_replayed_by_another(
        configure: Callable[[str], None], own_redis: RedisServer) -> None:
    configure(own_redis.url)
    store = SessionStore()
    own_redis.stop()
    for i in range(20):
        store.bind(f"orphan-{i}", "agent-x")
    mcp_redis.reset()  # this process's replayer is gone, as if it had died
    own_redis.start()
    configure(own_redis.url)
    assert mcp_redis.sessions.replay_pending() == 20
    values = own_redis.client().mget([binding_key(f"orphan-{i}") for i in range(20)])
    assert [agent_of(v) for v in values] == ["agent-x"] * 20


# -- the legacy adapter only ---------------------------------------------------------------------
@pytest.fixture
def legacy_store(redis_url: str, database_url: str, pg_database: PostgresDatabase) -> SessionStore:
    """Write-through over the legacy tables, registering no agent by itself (production use)."""
    legacy.install(pg_database.dsn)
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    use_source(LEGACY.LegacySessionsSource.factory())
    return SessionStore()


def _legacy_sql(pg: PostgresDatabase, statement: str, params: tuple = ()) -> Any:  # type: ignore[type-arg]
    conn = psycopg2.connect(pg.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def test_legacy_adapter_refuses_an_agent_the_legacy_server_never_registered(
        legacy_store: SessionStore, pg_database: PostgresDatabase, redis_url: str) -> None:
    with pytest.raises(InvalidArgument, match="agent_id") as info:
        legacy_store.bind("s1", "never-registered")
    assert info.value.argument == "agent_id"
    assert _legacy_sql(pg_database, "SELECT count(*) FROM core.sessions") == [(0,)]
    assert _legacy_sql(pg_database, "SELECT count(*) FROM core.agents") == [(0,)]
    assert legacy_store.get("s1") is None
    with pytest.raises(InvalidArgument, match="agent_id"):
        legacy_store.bind("s1", "nul\x00inside")  # legacy agent ids are TEXT


def test_legacy_adapter_serves_the_servers_own_rows_and_ends_them_as_the_server_does(
        legacy_store: SessionStore, pg_database: PostgresDatabase) -> None:
    agent = "0f8e2a4c-6b1d-4e3f-9a7c-5d2b8e1f4a60"
    _legacy_sql(pg_database, "INSERT INTO core.agents (id, api_key) VALUES (%s, 'k')", (agent,))
    _legacy_sql(pg_database, "INSERT INTO core.identities (identity_id, agent_id, api_key_hash) VALUES (41, %s, 'h')",
                (agent,))
    _legacy_sql(pg_database, "INSERT INTO core.sessions (session_id, identity_id, expires_at, client_type) "
                "VALUES ('server-made', 41, now() + interval '24 hours', 'sse')")
    assert legacy_store.get("server-made") == agent  # read repair from the server's row
    assert legacy_store.sessions_for(agent) == ["server-made"]
    legacy_store.bind("library-made", agent)
    assert _legacy_sql(pg_database, "SELECT identity_id, is_active, client_type FROM core.sessions "
                       "WHERE session_id = 'library-made'") == [(41, True, None)]
    assert legacy_store.unbind("server-made") is True
    assert _legacy_sql(pg_database, "SELECT is_active, client_type FROM core.sessions "
                       "WHERE session_id = 'server-made'") == [(False, "sse")]  # ended, not deleted
    assert legacy_store.get("server-made") is None


def test_use_source_after_the_first_sessions_call_is_refused(legacy_store: SessionStore) -> None:
    legacy_store.get("anything")
    with pytest.raises(ConfigurationError, match="use_source"):
        use_source(None)


def test_legacy_adapter_keeps_the_record_in_the_servers_columns(
        legacy_store: SessionStore, pg_database: PostgresDatabase, redis_url: str) -> None:
    agent = "0f8e2a4c-6b1d-4e3f-9a7c-5d2b8e1f4a60"
    _legacy_sql(pg_database, "INSERT INTO core.agents (id, api_key) VALUES (%s, 'k')", (agent,))
    _legacy_sql(pg_database, "INSERT INTO core.identities (identity_id, agent_id, api_key_hash) VALUES (41, %s, 'h')",
                (agent,))
    _legacy_sql(pg_database, "INSERT INTO core.sessions (session_id, identity_id, expires_at, client_type, client_info, "
                "metadata) VALUES ('server-made', 41, now() + interval '24 hours', 'sse', '{\"ua\": \"s\"}', "
                "'{\"purpose\": \"chat\"}')")
    record = legacy_store.record("server-made")  # the server's own row, as a record
    assert record is not None and record["bound_agent_id"] == agent
    assert (record["client_type"], record["client_info"], record["purpose"]) == ("sse", {"ua": "s"}, "chat")
    legacy_store.bind("lib-made", agent, client_type="stdio", client_info={"name": "claude"}, hops=2)
    legacy_store.update("lib-made", hops=3)
    assert _legacy_sql(pg_database, "SELECT client_type, client_info, metadata ->> 'hops', "
                       "metadata ->> 'mcp_redis_bind_count' FROM core.sessions WHERE session_id = 'lib-made'") == [
        ("stdio", {"name": "claude"}, "3", "1")]
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    again = legacy_store.record("lib-made")  # read repair from the columns
    assert again is not None and (again["client_type"], again["client_info"], again["hops"]) == (
        "stdio", {"name": "claude"}, 3)
    with pytest.raises(InvalidArgument, match="client_type"):
        legacy_store.update("lib-made", client_type=7)  # the column is TEXT


def test_legacy_adapter_refuses_its_own_metadata_keys_as_fields_and_reads_only_record_fields_from_rows(
        legacy_store: SessionStore, pg_database: PostgresDatabase, redis_url: str) -> None:
    """The adapter's metadata keys are not caller fields (they would forge `bind_count` or the
    replay flag); a row's metadata key no record field can be (a control character) or a secret
    (the server's `api_key`) stays out of the record and out of Redis, as does a metadata key
    named as a column (it would hide the column); a bind count another writer left odd is no
    error; a client's session id that merely looks encoded (no key addresses it) is not listed."""
    import redis

    raw = redis.Redis.from_url(redis_url)
    agent = "0f8e2a4c-6b1d-4e3f-9a7c-5d2b8e1f4a60"
    _legacy_sql(pg_database, "INSERT INTO core.agents (id, api_key) VALUES (%s, 'k')", (agent,))
    _legacy_sql(pg_database, "INSERT INTO core.identities (identity_id, agent_id, api_key_hash) VALUES (41, %s, 'h')",
                (agent,))
    legacy_store.bind("lib-made", agent, hops=1)
    for bad in ({"mcp_redis_bind_count": 999}, {"mcp_redis_pending": True}):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            legacy_store.update("lib-made", **bad)
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            legacy_store.bind("lib-made", agent, **bad)
    record = legacy_store.record("lib-made")
    assert record is not None and record["bind_count"] == 1 and record["hops"] == 1
    assert _legacy_sql(pg_database, "SELECT metadata FROM core.sessions WHERE session_id = 'lib-made'") == [
        ({"hops": 1, "mcp_redis_bind_count": 1},)]
    _legacy_sql(pg_database, "INSERT INTO core.sessions (session_id, identity_id, expires_at, client_type, metadata) "
                "VALUES ('server-made', 41, now() + interval '24 hours', 'sse', %s), "
                "('~client-chose-this', 41, now() + interval '24 hours', NULL, '{}'), "
                "('~', 41, now() + interval '24 hours', NULL, '{}'), "  # encode_id(''): no key at all
                "('~aGVsbG8', 41, now() + interval '24 hours', NULL, '{}')",  # looks like encode_id('hello')
                (json.dumps({"api_key": "sk-live-SECRET123", "bad\u001ename": 1, "purpose": "chat",
                             "client_type": "from-metadata", "mcp_redis_bind_count": 5.5}),))
    # Ids no session key of the store addresses are not listed (nor listed as another key).
    assert legacy_store.sessions_for(agent) == ["lib-made", "server-made"]
    record = legacy_store.record("server-made")  # read repair from the server's row
    assert record is not None and record["purpose"] == "chat" and record["client_type"] == "sse"
    assert "api_key" not in record and not [k for k in record if "\x1e" in k]
    legacy_store.bind("server-made", agent)  # its odd bind count (another writer's) is no error
    assert legacy_store.record("server-made")["bind_count"] == 1  # type: ignore[index]
    _legacy_sql(pg_database, "UPDATE core.sessions SET metadata = %s WHERE session_id = 'server-made'",
                (json.dumps({"api_key": "sk-live-SECRET123", "bad\u001ename": 1, "client_info": {"ua": "m"}}),))
    raw.flushdb()
    updated = legacy_store.update("server-made", client_info={"ua": "new"}, hops=2)  # no error on the odd keys
    assert updated is not None and updated["client_info"] == {"ua": "new"} and updated["hops"] == 2
    assert not [k for k in raw.scan_iter("*") if b"SECRET" in (raw.dump(k) or b"")]
    assert _legacy_sql(pg_database, "SELECT metadata ->> 'api_key' FROM core.sessions "
                       "WHERE session_id = 'server-made'") == [("sk-live-SECRET123",)]  # the row keeps it
    for odd in ('"x"', "5", "[1, 2]"):  # JSONB another writer may leave as metadata
        _legacy_sql(pg_database, "UPDATE core.sessions SET metadata = %s::jsonb WHERE session_id = 'server-made'",
                    (odd,))
        raw.flushdb()
        odd_record = legacy_store.record("server-made")
        assert odd_record is not None and odd_record["bind_count"] == 1 and "purpose" not in odd_record


def test_prefix_resolution_after_unbind_ttl_and_flushdb_with_either_source(
        configure: Callable[[str], None], redis_url: str) -> None:
    from mcp_redis.sessions import AgentDirectory

    configure(redis_url)
    agent = "7c1d9e2f-3a4b-4c5d-8e6f-0a1b2c3d4e5f"
    store, directory = SessionStore(), AgentDirectory()
    directory.register(agent)
    store.bind("s1", agent, client_type="sse")
    assert store.resolve_agent_prefix("7c1d9e") == agent  # a live binding: any prefix
    assert store.unbind("s1")
    assert store.resolve_agent_prefix(agent[:12]) == agent  # the directory: unbound
    assert store.resolve_agent_prefix("agent-" + agent[:12]) == agent
    store.bind("s2", agent, ttl=0.05)
    time.sleep(0.15)  # expiry is a deadline: 0.1 s past it
    assert store.get("s2") is None and store.resolve_agent_prefix(agent[:12]) == agent  # expired
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    assert store.resolve_agent_prefix("agent-" + agent[:12]) == agent  # rebuilt from PostgreSQL
