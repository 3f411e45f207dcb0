"""Session records beyond the contract: atomic updates across processes, the index sweep,
the PostgreSQL upgrade of tables from before records, ``last_active`` on sliding expiry."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Iterator, Optional

import psycopg2
import pytest

import mcp_redis
from mcp_redis import SessionStore
from mcp_redis.errors import ConfigurationError
from mcp_redis.postgres import migrate
from mcp_redis.sessions.records import pack, unpack
from mcp_redis.sessions.redis import SWEEP_BATCH, SWEEP_EVERY
from mcp_redis.testing import PostgresDatabase
from tests.sessions import workers_records
from tests.sessions.test_sessions import INDEX_KEY, binding_key


@pytest.fixture(params=["redis", "write_through"])
def shared_urls(request: pytest.FixtureRequest) -> Iterator[tuple]:  # type: ignore[type-arg]
    redis_url = request.getfixturevalue("redis_url")
    database_url: Optional[str] = None
    if request.param == "write_through":
        database_url = request.getfixturevalue("database_url")
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    yield redis_url, database_url


def test_concurrent_updates_from_threads_and_processes_all_land(shared_urls: tuple) -> None:  # type: ignore[type-arg]
    """Each writer merges fields of its own: a read-modify-write anywhere would drop some."""
    redis_url, database_url = shared_urls
    store = SessionStore()
    store.bind("shared", "agent-1", client_type="sse")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=workers_records.update_fields,
                         args=(redis_url, database_url, "shared", f"p{n}", 2, 15)) for n in range(2)]
    for p in procs:
        p.start()
    threads = [threading.Thread(target=lambda t=t: [store.update("shared", **{f"f_here_{t}_{i}": i})
                                                    for i in range(15)]) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    record = store.record("shared")
    assert record is not None
    expected = {f"f_{tag}_{t}_{i}": i for tag in ("p0", "p1", "here") for t in range(2) for i in range(15)}
    assert {k: v for k, v in record.items() if k.startswith("f_")} == expected
    assert record["client_type"] == "sse" and record["bound_agent_id"] == "agent-1" and record["bind_count"] == 1


def test_the_index_sweep_drops_entries_of_expired_bindings_nobody_asks_about(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    store = SessionStore()
    client = mcp_redis.default_client().redis("sessions").client
    for i in range(100):
        store.bind(f"dead-{i}", f"agent-{i % 7}", ttl=60)
    assert client.zcard(INDEX_KEY) == 100
    client.delete(*[binding_key(f"dead-{i}") for i in range(100)])  # as if they had expired
    binds = 320
    assert (binds // SWEEP_EVERY) * SWEEP_BATCH >= 100 + binds  # the cursor passes over every entry
    for i in range(binds):
        store.bind(f"live-{i}", f"agent-{i % 7}", ttl=60)
    assert client.zcard(INDEX_KEY) == binds  # only live entries remain
    assert store.sessions_for("agent-3") == sorted(f"live-{i}" for i in range(binds) if i % 7 == 3)


def test_sliding_expiry_keeps_last_active_through_the_throttled_refresh_only(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    store = SessionStore(sliding=True, refresh_interval=3600)
    store.bind("s1", "agent-1", ttl=600)
    client = mcp_redis.default_client().redis("sessions").client
    agent, data = unpack(client.get(binding_key("s1")))
    assert data is not None
    backdated = data._replace(bound_at=data.bound_at - 100, last_active=data.bound_at - 100)
    client.set(binding_key("s1"), pack(agent, backdated), keepttl=True)
    SessionStore(sliding=True, refresh_interval=0.001).get("s1")  # a refresh is due: last_active = now
    record = store.record("s1")
    assert record is not None and record["last_active"] - record["bound_at"] >= 100
    client.set(binding_key("s1"), pack(agent, backdated), keepttl=True)
    for _ in range(5):
        assert store.get("s1") == "agent-1"  # refreshed within the hour already: no write per read
    assert unpack(client.get(binding_key("s1")))[1] == backdated


def test_migrate_upgrades_a_sessions_table_from_before_records(pg_database: PostgresDatabase) -> None:
    conn = psycopg2.connect(pg_database.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS old_install CASCADE; CREATE SCHEMA old_install")
            cur.execute("""CREATE TABLE old_install.sessions (
                session_key TEXT PRIMARY KEY, agent_id BYTEA NOT NULL, expires_at TIMESTAMPTZ NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                redis_pending BOOLEAN NOT NULL DEFAULT false)""")
            cur.execute("INSERT INTO old_install.sessions (session_key, agent_id, expires_at, created_at) "
                        "VALUES ('old', 'agent-old', now() + interval '1 hour', '2026-01-01T00:00:00Z')")
        mcp_redis.configure(database_url=pg_database.url, pg_schema="old_install", sessions="postgres")
        migrate()
        migrate()  # idempotent
        record = SessionStore().record("old")
        assert record == {"bound_agent_id": "agent-old", "bound_at": 1767225600, "bind_count": 1,
                          "last_active": 1767225600}
        SessionStore().update("old", client_type="sse")
        assert SessionStore().record("old")["client_type"] == "sse"  # type: ignore[index]
        with conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE old_install.sessions ALTER COLUMN record TYPE TEXT")
        mcp_redis.configure(database_url=pg_database.url, pg_schema="old_install", sessions="postgres")
        with pytest.raises(ConfigurationError, match=r"old_install\.sessions column 'record' is text, expected jsonb"):
            migrate()
    finally:
        mcp_redis.reset()
        with conn, conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS old_install CASCADE")
        conn.close()


def test_a_binding_written_by_an_older_release_reads_as_a_record_without_fields(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    store = SessionStore()
    client = mcp_redis.default_client().redis("sessions").client
    client.set(binding_key("old"), "agent-old", px=60_000)  # the bare agent id of the earlier layout
    assert store.get("old") == "agent-old"
    assert store.record("old") == {"bound_agent_id": "agent-old", "bound_at": None, "bind_count": None,
                                   "last_active": None}
    updated = store.update("old", client_type="sse")
    assert updated is not None and updated["bound_agent_id"] == "agent-old" and updated["client_type"] == "sse"
    assert updated["bind_count"] == 1 and 0 < client.pttl(binding_key("old")) <= 60_000  # expiry kept
    assert store.unbind("old") is True and store.get("old") is None
    client.set(binding_key("old"), "agent-old", px=60_000)
    assert SessionStore(refresh_interval=0).touch("old") == "agent-old"  # a sliding touch's refresh ...
    assert store.record("old")["last_active"] is not None  # type: ignore[index]  # ... gives it a record


def test_a_touch_refreshes_rows_and_bindings_written_before_records_in_write_through(
        redis_url: str, database_url: str) -> None:
    """A row from before records (``{}``: bound at its ``created_at``, count 1) and a bare agent
    id in Redis (the refresh rewrites it into a record of its own) keep taking the touches."""
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = SessionStore(refresh_interval=0)  # every touch refreshes the row
    store.bind("old", "agent-old", ttl=60)
    store.bind("bare", "agent-old", ttl=60)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("UPDATE mcp_redis.sessions SET record = '{}', created_at = now() - interval '1 hour'")
    client = mcp_redis.default_client().redis("sessions").client
    client.delete(binding_key("old"))
    assert store.record("old")["bound_at"] is not None  # type: ignore[index]  # read repair: from created_at
    client.set(binding_key("bare"), "agent-old", px=60_000)  # the bare agent id of the earlier layout
    for ttl, more_than in ((600, 500), (1200, 1100), (30, 0)):  # twice longer, then shorter
        assert store.touch("old", ttl=ttl) == "agent-old" and store.touch("bare", ttl=ttl) == "agent-old"
        with conn.cursor() as cur:
            cur.execute("SELECT session_key, extract(epoch FROM expires_at - now()) BETWEEN %s AND %s "
                        "FROM mcp_redis.sessions ORDER BY session_key", (more_than, ttl))
            assert cur.fetchall() == [("bare", True), ("old", True)], ttl
    conn.close()
