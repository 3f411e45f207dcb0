"""The library inside the legacy server's own database (issue 16).

The legacy server (CIRWEL/unitares) already has ``core.sessions`` and
``audit.rate_limits`` with other columns. The library keeps to its own schema
(``MCP_REDIS_PG_SCHEMA``, default ``mcp_redis``): ``mcp-redis migrate`` leaves
``core`` and ``audit`` exactly as they were, and sessions, rate limits and
locks answer from the backend asked for, never with a raw psycopg2 error.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Iterator, List, Tuple

import psycopg2
import pytest

import mcp_redis
from mcp_redis import RateLimiter, SessionStore
from mcp_redis.errors import ConfigurationError
from mcp_redis.postgres import migrate
from mcp_redis.testing import PostgresDatabase, free_port
from tests.test_cli import run_cli

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "legacy_unitares.sql")
AGENT = "0f8e2a4c-6b1d-4e3f-9a7c-5d2b8e1f4a60"

_ROWS = """
INSERT INTO core.agents (id, api_key, label) VALUES (%(agent)s, 'legacy-raw-key', 'Legacy agent');
INSERT INTO core.identities (identity_id, agent_id, api_key_hash, metadata)
    VALUES (7, %(agent)s, '$2b$12$hash', '{"tags": ["legacy"]}');
INSERT INTO core.sessions (session_id, identity_id, expires_at, client_type, client_info)
    VALUES ('legacy-session', 7, now() + interval '24 hours', 'sse', '{"ua": "legacy"}');
INSERT INTO audit.rate_limits (agent_id, timestamp) VALUES (%(agent)s, '2026-01-01T00:00:00Z');
"""


@pytest.fixture(scope="module")
def legacy_db() -> Iterator[PostgresDatabase]:
    """A throwaway database holding the legacy tables (one row in each)."""
    db = PostgresDatabase(prefix="mcp_redis_legacy")
    if not db.available():
        pytest.skip(f"PostgreSQL not usable: {db.error}")
    db.create()
    try:
        conn = psycopg2.connect(db.dsn)
        try:
            with conn, conn.cursor() as cur:
                with open(FIXTURE, encoding="utf-8") as f:
                    cur.execute(f.read())
                cur.execute(_ROWS, {"agent": AGENT})
        finally:
            conn.close()
        yield db
    finally:
        db.drop()


def _schema_dump(db: PostgresDatabase) -> str:
    out = subprocess.run(["pg_dump", "--schema-only", "-n", "core", "-n", "audit", db.url],
                         capture_output=True, text=True, check=True, timeout=60)
    # pg_dump's \restrict/\unrestrict lines carry a random token per run.
    return "\n".join(line for line in out.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


def _legacy_rows(db: PostgresDatabase) -> List[Tuple[Any, ...]]:
    conn = psycopg2.connect(db.dsn)
    try:
        with conn, conn.cursor() as cur:
            rows: List[Tuple[Any, ...]] = []
            for table in ("core.agents", "core.identities", "core.sessions", "audit.rate_limits"):
                cur.execute(f"SELECT to_jsonb(t)::text FROM {table} t ORDER BY 1")  # fixed names only
                rows.extend((table, r[0]) for r in cur.fetchall())
            return rows
    finally:
        conn.close()


def test_migrate_in_the_legacy_database_leaves_core_and_audit_unchanged(legacy_db: PostgresDatabase) -> None:
    schema, rows = _schema_dump(legacy_db), _legacy_rows(legacy_db)
    for _ in range(2):  # idempotent
        done = run_cli("migrate", env={"DATABASE_URL": legacy_db.url})
        assert done.returncode == 0, done.stderr
    assert _schema_dump(legacy_db) == schema
    assert _legacy_rows(legacy_db) == rows
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('mcp_redis.sessions')::text, to_regclass('mcp_redis.rate_limits')::text, "
                        "to_regclass('mcp_redis.lock_fences')::text, "
                        "to_regclass('mcp_redis.lock_fallback_episodes')::text")
            assert cur.fetchone() == ("mcp_redis.sessions", "mcp_redis.rate_limits", "mcp_redis.lock_fences",
                                      "mcp_redis.lock_fallback_episodes")
    finally:
        conn.close()


def test_sessions_in_the_legacy_database_answer_from_postgres_and_redis(
        legacy_db: PostgresDatabase, redis_url: str) -> None:
    rows = _legacy_rows(legacy_db)
    mcp_redis.configure(database_url=legacy_db.url, sessions="postgres")
    store = SessionStore()
    store.bind("legacy-db-pg", AGENT)
    assert store.get("legacy-db-pg") == AGENT
    assert store.sessions_for(AGENT) == ["legacy-db-pg"]
    assert store.unbind("legacy-db-pg")
    mcp_redis.configure(database_url=legacy_db.url, redis_url=redis_url)  # write-through
    store.bind("legacy-db-wt", AGENT)
    assert store.get("legacy-db-wt") == AGENT
    assert store.unbind("legacy-db-wt")
    assert _legacy_rows(legacy_db) == rows


def test_rate_limits_in_the_legacy_database_answer_from_postgres(
        legacy_db: PostgresDatabase, redis_factory: Any) -> None:
    rows = _legacy_rows(legacy_db)
    mcp_redis.configure(database_url=legacy_db.url, rate_limits="postgres")
    limiter = RateLimiter("legacy-db", 1, 60)
    first = limiter.hit("pg-mode")
    assert first.allowed and first.backend == "postgres"
    refused = limiter.hit("pg-mode")
    assert not refused.allowed and refused.backend == "postgres"  # the table answered, not a fallback

    server = redis_factory()
    url = server.url
    server.kill()
    mcp_redis.configure(redis_url=url, database_url=legacy_db.url, rate_limit_fallback="postgres",
                        retry_attempts=1, breaker_reset_timeout=30, socket_connect_timeout=0.2)
    fallback = RateLimiter("legacy-db", 1, 60)
    assert fallback.hit("fallback").backend == "postgres"
    assert not fallback.hit("fallback").allowed
    assert _legacy_rows(legacy_db) == rows


def test_locks_fall_back_to_postgres_in_the_legacy_database(legacy_db: PostgresDatabase) -> None:
    rows = _legacy_rows(legacy_db)
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_attempts=1,
                        database_url=legacy_db.url, lock_fallback="postgres")
    with mcp_redis.agent_lock("legacy-db", timeout=0.5) as held:
        assert held.backend == "postgres" and held.owned()
        assert held.fencing_token is not None
    assert _legacy_rows(legacy_db) == rows


def test_a_table_of_another_shape_in_the_schema_is_a_configuration_error_naming_table_and_column(
        legacy_db: PostgresDatabase) -> None:
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE SCHEMA IF NOT EXISTS shared_app")
            cur.execute("CREATE TABLE IF NOT EXISTS shared_app.sessions "
                        "(session_id TEXT PRIMARY KEY, expires_at TIMESTAMPTZ NOT NULL)")
    finally:
        conn.close()
    mcp_redis.configure(database_url=legacy_db.url, pg_schema="shared_app", sessions="postgres")
    with pytest.raises(ConfigurationError, match=r"shared_app\.sessions has no column 'session_key'"):
        migrate()
    with pytest.raises(ConfigurationError, match=r"shared_app\.sessions"):  # first use: the same error
        SessionStore().bind("s", AGENT)
    cli = run_cli("migrate", env={"DATABASE_URL": legacy_db.url, "MCP_REDIS_PG_SCHEMA": "shared_app"})
    assert cli.returncode == 2 and "shared_app.sessions" in cli.stderr and "session_key" in cli.stderr
    assert "Traceback" not in cli.stderr


@pytest.mark.parametrize("extra,problem", [
    ("", r"has primary key none, expected \(session_key\)"),  # the right columns, no key: ON CONFLICT fails
    (", PRIMARY KEY (session_key), tenant TEXT NOT NULL", r"NOT NULL without a default: 'tenant'"),
], ids=["no-primary-key", "extra-not-null-column"])
def test_a_table_with_the_right_columns_but_not_the_librarys_shape_is_refused(
        legacy_db: PostgresDatabase, extra: str, problem: str) -> None:
    # Before, migrate passed (exit 0) and every bind failed with a raw psycopg2
    # error, whose DETAIL line quoted the whole row (session key, agent, fields).
    schema = "odd_" + ("nopk" if not extra else "extra")
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {schema}.sessions (session_key TEXT NOT NULL, "
                        "agent_id BYTEA NOT NULL, expires_at TIMESTAMPTZ NOT NULL, created_at TIMESTAMPTZ NOT NULL "
                        "DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), redis_pending BOOLEAN NOT NULL "
                        f"DEFAULT false, record JSONB NOT NULL DEFAULT '{{}}'::jsonb{extra})")
    finally:
        conn.close()
    mcp_redis.configure(database_url=legacy_db.url, pg_schema=schema, sessions="postgres")
    with pytest.raises(ConfigurationError, match=problem):
        migrate()
    with pytest.raises(ConfigurationError, match=problem):
        SessionStore().bind("s", AGENT, note="private-note")
    cli = run_cli("migrate", env={"DATABASE_URL": legacy_db.url, "MCP_REDIS_PG_SCHEMA": schema})
    assert cli.returncode == 2 and "private-note" not in cli.stderr


@pytest.mark.parametrize("alter,problem", [
    ("ALTER COLUMN created_at DROP DEFAULT", r"NOT NULL without a default: 'created_at'"),
    ("ADD CONSTRAINT short_keys CHECK (length(session_key) < 8)", r"has CHECK 'short_keys'"),
    ("ADD CONSTRAINT one_per_agent UNIQUE (agent_id)", r"has UNIQUE 'one_per_agent'"),
    ("ADD CONSTRAINT known_agent FOREIGN KEY (session_key) REFERENCES core.sessions (session_id)",
     r"has FOREIGN KEY 'known_agent'"),
    # On the key's column, but comparing it another way: two session keys became one (a reviewer).
    ("ADD CONSTRAINT keys_by_pattern EXCLUDE USING btree (session_key text_pattern_ops WITH =)",
     r"has EXCLUDE 'keys_by_pattern'"),
    ("INDEX keys_ignoring_case ON sessions (session_key COLLATE ci)", r"has UNIQUE 'keys_ignoring_case'"),
    ("ALTER COLUMN session_key TYPE TEXT COLLATE public.ci",
     r"has column 'session_key' in the nondeterministic collation 'ci'"),
    ("INDEX keys_by_pattern_ops ON sessions (session_key text_pattern_ops)", r"has UNIQUE 'keys_by_pattern_ops'"),
], ids=["column-left-to-its-default-has-none", "check", "unique", "foreign-key", "exclude", "collation",
        "key-collation", "operator-class"])
def test_a_library_table_changed_so_it_refuses_the_librarys_rows_is_refused_at_first_use(
        legacy_db: PostgresDatabase, alter: str, problem: str) -> None:
    # Before, the complete schema passed the first-use check and migrate, and
    # every bind failed with a raw psycopg2 error quoting the row.
    schema = "altered_" + alter.split()[1 if alter.startswith("INDEX ") else 2].lower().replace("_", "")
    mcp_redis.configure(database_url=legacy_db.url, pg_schema=schema, sessions="postgres")
    migrate()
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("CREATE COLLATION IF NOT EXISTS public.ci "
                        "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
            if alter.startswith("INDEX "):  # a unique index of the admin's own
                cur.execute(f"CREATE UNIQUE {alter.replace(' ON sessions', f' ON {schema}.sessions')}"
                            .replace("COLLATE ci", "COLLATE public.ci"))
            else:
                cur.execute(f"ALTER TABLE {schema}.sessions {alter}")
    finally:
        conn.close()
    mcp_redis.configure(database_url=legacy_db.url, pg_schema=schema, sessions="postgres")  # a new process
    with pytest.raises(ConfigurationError, match=problem):
        SessionStore().bind("s", AGENT, note="private-note")
    with pytest.raises(ConfigurationError, match=problem):
        migrate()
    cli = run_cli("migrate", env={"DATABASE_URL": legacy_db.url, "MCP_REDIS_PG_SCHEMA": schema})
    assert cli.returncode == 2 and f"{schema}.sessions" in cli.stderr and "private-note" not in cli.stderr


def test_harmless_changes_to_a_library_table_are_accepted(legacy_db: PostgresDatabase) -> None:
    # A unique index on the primary key's columns and more cannot refuse a row the key takes:
    # REINDEX CONCURRENTLY's twin of the key (left behind when it fails), a covering index.
    # Refused at first use, they stopped every process start (a reviewer).
    schema = "harmless"
    mcp_redis.configure(database_url=legacy_db.url, pg_schema=schema, sessions="postgres", locks="postgres")
    migrate()
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE UNIQUE INDEX sessions_pkey_ccnew ON {schema}.sessions (session_key)")
            cur.execute(f"CREATE UNIQUE INDEX sessions_covering ON {schema}.sessions (session_key) INCLUDE (agent_id)")
            cur.execute(f"CREATE UNIQUE INDEX fences_twin ON {schema}.lock_fences (lock_key)")
            cur.execute(f"CREATE INDEX sessions_by_update ON {schema}.sessions (updated_at)")
            cur.execute(f"ALTER TABLE {schema}.sessions ADD COLUMN note TEXT")
    finally:
        conn.close()
    mcp_redis.configure(database_url=legacy_db.url, pg_schema=schema, sessions="postgres", locks="postgres")
    store = SessionStore()
    store.bind("s", AGENT)
    assert store.get("s") == AGENT
    with mcp_redis.agent_lock("harmless", timeout=5) as held:
        assert held.fencing_token is not None
    assert migrate()
    cli = run_cli("migrate", env={"DATABASE_URL": legacy_db.url, "MCP_REDIS_PG_SCHEMA": schema})
    assert cli.returncode == 0, cli.stderr


@pytest.mark.parametrize("name", ["core", "audit", "public", "pg_temp", "Mixed", "a-b", "x; DROP", ""])
def test_pg_schema_refuses_legacy_and_non_identifier_names(name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^pg_schema: "):
        mcp_redis.configure(pg_schema=name)


def test_pg_schema_is_read_from_its_variable_and_known_to_the_unknown_variable_warning() -> None:
    from mcp_redis.config import Settings, warn_unknown_variables

    env = {"MCP_REDIS_PG_SCHEMA": "legacy_lib"}
    assert Settings.from_env(env).pg_schema == "legacy_lib"
    assert warn_unknown_variables(env) == []
    with pytest.raises(ConfigurationError, match="MCP_REDIS_PG_SCHEMA"):
        Settings.from_env({"MCP_REDIS_PG_SCHEMA": "core"})


def test_a_schema_problem_at_a_call_site_is_a_configuration_error_never_the_local_fallback(
        legacy_db: PostgresDatabase, caplog: pytest.LogCaptureFixture) -> None:
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("DROP SCHEMA IF EXISTS dropped_col CASCADE")
    finally:
        conn.close()
    mcp_redis.configure(database_url=legacy_db.url, pg_schema="dropped_col", rate_limits="postgres")
    migrate()
    conn = psycopg2.connect(legacy_db.dsn)
    try:
        with conn, conn.cursor() as cur:  # the table changed under a running process
            cur.execute("ALTER TABLE dropped_col.rate_limits DROP COLUMN state")
    finally:
        conn.close()
    with pytest.raises(ConfigurationError, match="state"):
        RateLimiter("legacy-db", 5, 60).hit("k")
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
