"""PostgreSQL pool and schema: idempotent migrations, bounded pool, no leaks."""

from __future__ import annotations

import threading
import time
from typing import Any, List

import psycopg2
import psycopg2.extensions
import pytest

import mcp_redis
from mcp_redis.errors import BackendUnavailable, ConfigurationError
from mcp_redis.postgres import get_postgres, migrate


def test_migrate_is_idempotent_and_creates_the_library_tables(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    first = migrate()
    second = migrate()
    assert first == second
    rows = get_postgres().execute(
        "SELECT to_regclass('mcp_redis.sessions')::text", fetch="one"
    )
    assert rows == ("mcp_redis.sessions",)
    # The statements returned (and printed by `mcp-redis migrate`) are the ones run, each one
    # line that runs as written (a comment ran to the statement's end: a reviewer).
    for statement in first:
        assert "--" not in statement
        get_postgres().execute(statement)


def test_concurrent_migrations_do_not_collide(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    errors: List[BaseException] = []

    def run() -> None:
        try:
            migrate()
        except BaseException as exc:  # pragma: no cover - the failure we look for
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_queries_are_parameterised_and_round_trip_hostile_text(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    hostile = "x'); DROP TABLE mcp_redis.sessions; --"
    assert get_postgres().execute("SELECT %s", (hostile,), fetch="one") == (hostile,)


def test_a_restart_that_killed_the_idle_connections_costs_no_failed_call(database_url: str, pg_database: Any) -> None:
    """After PostgreSQL dropped every pooled connection (restart, failover, pg_terminate_backend),
    each retry drew another dead one: calls failed on a healthy server and the breaker opened.
    The first dead one now takes the idle others with it, and the retry connects anew."""
    mcp_redis.configure(database_url=database_url, sessions="postgres", retry_attempts=2)
    store = mcp_redis.SessionStore()
    store.bind("warm", "agent-1")
    barrier = threading.Barrier(6)

    def warm() -> None:  # six callers at once leave six idle connections
        barrier.wait()
        for _ in range(10):
            store.get("warm")

    threads = [threading.Thread(target=warm) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pg = get_postgres()
    assert pg.pool_stats()["idle"] >= 2
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (pg_database.name,))
        assert cur.fetchone()[0] >= 2
    admin.close()
    for _ in range(4):
        assert store.get("warm") == "agent-1"
    assert pg.policy.breaker.state.value == "closed"


@pytest.mark.parametrize("mode", ["postgres", "write-through"])
def test_a_row_locked_by_another_transaction_fails_that_call_once_and_never_opens_the_breaker(
        database_url: str, pg_database: Any, redis_url: str, mode: str) -> None:
    """A statement timeout on one locked session row (an admin's transaction, the legacy
    server's writer) read as an outage: retried three times (3 x postgres_timeout), and the
    breaker opened for every caller of the process (a reviewer). A lock wait now ends at
    lock_timeout, half of postgres_timeout, as BackendUnavailable: no retry, no breaker failure."""
    from mcp_redis.metrics import METRICS

    if mode == "postgres":
        mcp_redis.configure(database_url=database_url, sessions="postgres", postgres_timeout=1.0,
                            breaker_failure_threshold=2)
    else:  # Redis in front: the bind's Redis write is undone
        mcp_redis.configure(redis_url=redis_url, database_url=database_url, postgres_timeout=1.0,
                            breaker_failure_threshold=2)
    store = mcp_redis.SessionStore()
    store.bind("hot", "agent-1")
    holder = psycopg2.connect(pg_database.dsn)
    waits = METRICS.counter("postgres_lock_waits_total")
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM mcp_redis.sessions FOR UPDATE")  # every row, held until rollback
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="locked by another transaction"):
                store.bind("hot", "agent-2")
            assert time.monotonic() - started < 0.9  # one wait of lock_timeout (0.5 s), not retried
    finally:
        holder.rollback()
        holder.close()
    assert get_postgres().policy.breaker.state.value == "closed"
    store.bind("cold", "agent-3")
    assert store.get("hot") == "agent-1" and store.get("cold") == "agent-3"
    assert store.sessions_for("agent-2") == []
    assert METRICS.counter("postgres_lock_waits_total") - waits == 3


@pytest.mark.parametrize("options,expected", [
    ("", "500ms"),
    ("-c deadlock_timeout=2s", "500ms"),  # another setting whose name holds "lock_timeout"
    ("-c lock_timeout=100", "100ms"), ("-clock_timeout=100", "100ms"),
    ("--lock-timeout=100", "100ms"), ("-c LOCK_TIMEOUT=100", "100ms"),
], ids=["none", "deadlock-timeout", "c", "c-joined", "dashes", "upper-case"])
def test_the_urls_own_lock_timeout_wins_and_only_its_own(database_url: str, options: str, expected: str) -> None:
    url = psycopg2.extensions.make_dsn(database_url, options=options) if options else database_url
    mcp_redis.configure(database_url=url, postgres_timeout=1.0)
    assert get_postgres().execute("SHOW lock_timeout", fetch="one") == (expected,)


def test_a_process_start_on_a_migrated_schema_runs_no_ddl(database_url: str, pg_database: Any) -> None:
    """Every process ran the whole migration on first use: CREATE needed rights beyond the DML
    ones docs/security.md lists (a DML-only user got PermissionDenied on every call), and
    ALTER TABLE took ACCESS EXCLUSIVE on sessions even when it changed nothing, so one long
    reader of the table stalled the starting process into a statement timeout (and every
    other process's session calls behind it)."""
    import uuid

    mcp_redis.configure(database_url=database_url)
    migrate()
    role = f"mcp_dml_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    reader = psycopg2.connect(pg_database.dsn)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN")
            cur.execute(f"GRANT USAGE ON SCHEMA mcp_redis TO {role}")
            cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA mcp_redis TO {role}")
        with reader.cursor() as cur:  # a long report holding ACCESS SHARE on sessions
            cur.execute("SELECT count(*) FROM mcp_redis.sessions")
        dml_url = psycopg2.extensions.make_dsn(database_url, user=role, password=None)
        mcp_redis.configure(database_url=dml_url, sessions="postgres", rate_limits="postgres",
                            postgres_timeout=2.0, retry_attempts=1)
        store = mcp_redis.SessionStore()
        store.bind("s1", "agent-1")
        assert store.get("s1") == "agent-1"
        assert mcp_redis.RateLimiter("dml", 5, 60).hit("k").allowed
        # Without one of the grants docs/security.md lists, the schema looks incomplete to this
        # user: the error names what it could not see and the fix (it was a bare "permission
        # denied for database").
        with admin.cursor() as cur:
            cur.execute(f"REVOKE ALL ON mcp_redis.agent_directory FROM {role}")
        mcp_redis.configure(database_url=dml_url, sessions="postgres", postgres_timeout=2.0, retry_attempts=1)
        with pytest.raises(mcp_redis.PermissionDenied, match="agent_directory.*mcp-redis migrate") as info:
            mcp_redis.SessionStore().get("s1")
        assert info.value.variable == "DATABASE_URL"
    finally:
        reader.close()
        mcp_redis.reset(configuration=True)
        with admin.cursor() as cur:
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")
        admin.close()


def test_exhausted_pool_waits_then_raises_backend_unavailable(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url, postgres_max_connections=1, pool_timeout=0.2)
    pg = get_postgres()
    with pg.connection():
        with pytest.raises(BackendUnavailable, match="pool exhausted"):
            with pg.connection():
                pass  # pragma: no cover
    assert pg.execute("SELECT 1", fetch="one") == (1,)


def test_unreachable_postgres_is_backend_unavailable_without_the_password() -> None:
    mcp_redis.configure(database_url="postgresql://u:s3cr3t-pw@127.0.0.1:1/db", postgres_connect_timeout=1)
    with pytest.raises(BackendUnavailable) as info:
        get_postgres().execute("SELECT 1")
    assert "s3cr3t-pw" not in str(info.value)
    assert "s3cr3t-pw" not in repr(get_postgres())


def test_sql_errors_propagate_unchanged(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    with pytest.raises(psycopg2.errors.DivisionByZero):
        get_postgres().execute("SELECT 1 / 0")


def test_a_missing_table_or_column_is_a_configuration_error_not_an_outage(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url)
    pg = get_postgres()
    with pytest.raises(ConfigurationError, match="no_such_table.*mcp-redis migrate") as info:
        pg.execute("SELECT * FROM no_such_table")
    assert isinstance(info.value.__cause__, psycopg2.errors.UndefinedTable)
    with pytest.raises(ConfigurationError, match="no_such_column"):
        pg.execute("SELECT no_such_column FROM pg_class")
    assert not isinstance(info.value, BackendUnavailable)
    assert pg.policy.breaker.state.value == "closed"  # an answer, not a failure


@pytest.mark.long
def test_every_pooled_connection_is_bounded_by_postgres_timeout(database_url: str) -> None:
    mcp_redis.configure(database_url=database_url + "?options=-c%20search_path%3Dcore", postgres_timeout=1.5)
    pg = get_postgres()
    assert pg.execute("SHOW statement_timeout", fetch="one") == ("1500ms",)
    assert pg.execute("SHOW search_path", fetch="one") == ("core",)  # the DSN's own options are kept
    with pytest.raises(BackendUnavailable) as info:
        pg.execute("SELECT pg_sleep(3)")
    assert isinstance(info.value.__cause__, psycopg2.errors.QueryCanceled)
