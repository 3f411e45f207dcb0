"""PostgreSQL: a psycopg2 `ThreadedConnectionPool` and the library's schema.

PostgreSQL is the source of truth where data must not be lost (sessions) and
the shared fallback for rate limits and locks. Every query is parameterised.
Every table lives in the library's own schema (setting `pg_schema`, variable
``MCP_REDIS_PG_SCHEMA``, default ``mcp_redis``), never in a legacy server's
``core``/``audit``. The DDL runs only in `migrate()` (also ``mcp-redis
migrate``, and once per process on first use): idempotent, and a table of the
library's name with another shape is a `ConfigurationError`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union, cast

if TYPE_CHECKING:  # psycopg2 is imported on first use, so ``import mcp_redis`` does not load it
    import psycopg2
    import psycopg2.extensions
    import psycopg2.pool
    import psycopg2.sql

from .config import Settings, redact_url, scrub
from .errors import AuthenticationFailed, BackendUnavailable, ConfigurationError, PermissionDenied, PoolExhausted
from .metrics import METRICS
from .resilience import CircuitBreaker, Resilience

__all__ = ["Postgres", "get_postgres", "migrate", "SCHEMA", "SHAPES", "UPGRADES", "is_pg_transient", "pg_error"]

log = logging.getLogger("mcp_redis.postgres")

# Statements run in order by `migrate`, each idempotent; ``{schema}`` stands for
# the library's own schema (setting `pg_schema`, default ``mcp_redis``), filled
# in through ``psycopg2.sql.Identifier``. Features append to this list (and to
# `SHAPES`) at import time for the tables they own.
SCHEMA: List[str] = [
    "CREATE SCHEMA IF NOT EXISTS {schema}",
    """
    CREATE TABLE IF NOT EXISTS {schema}.sessions (
        session_key   TEXT PRIMARY KEY,            -- keys.encode_id(session key)
        agent_id      BYTEA NOT NULL,              -- UTF-8 (surrogatepass) bytes: NUL-safe, prefix = range
        expires_at    TIMESTAMPTZ NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
        redis_pending BOOLEAN NOT NULL DEFAULT false, -- written while Redis was down: replay it
        record        JSONB NOT NULL DEFAULT '{{}}'::jsonb  -- bound_at, bind_count, last_active, fields
    )
    """,
    # Tables created before session records: upgraded in place (UPGRADES).
    "ALTER TABLE {schema}.sessions ADD COLUMN IF NOT EXISTS record JSONB NOT NULL DEFAULT '{{}}'::jsonb",
    "CREATE INDEX IF NOT EXISTS sessions_agent_id_idx ON {schema}.sessions (agent_id)",
    "CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON {schema}.sessions (expires_at)",
    "CREATE INDEX IF NOT EXISTS sessions_redis_pending_idx ON {schema}.sessions (session_key) WHERE redis_pending",
    # Rate limits (mcp_redis.ratelimit.postgres.PostgresBackend): one row per
    # (name, key, algorithm, window); ids stored encoded (keys.encode_id).
    """
    CREATE TABLE IF NOT EXISTS {schema}.rate_limits (
        name        TEXT NOT NULL,
        rate_key    TEXT NOT NULL,
        algorithm   TEXT NOT NULL,
        window_us   BIGINT NOT NULL,
        state       JSONB NOT NULL,
        expires_at  TIMESTAMPTZ NOT NULL,
        updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (name, rate_key, algorithm, window_us)
    )
    """,
    "CREATE INDEX IF NOT EXISTS rate_limits_expires_at_idx ON {schema}.rate_limits (expires_at)",
]

# A comment in SCHEMA's statements (none of them has "--" inside a string).
_SQL_COMMENT = re.compile(r"--[^\n]*")

# The indexes SCHEMA creates (their names): part of a complete schema.
_INDEXES = frozenset(re.findall(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", "\n".join(SCHEMA)))

# table (in the library's schema) -> {column: PostgreSQL type (udt_name)}: what
# `migrate` checks an existing table against before creating anything, so a
# table of the same name with another shape is a ConfigurationError naming the
# table and the column, never a half-working schema.
SHAPES: Dict[str, Dict[str, str]] = {
    "sessions": {"session_key": "text", "agent_id": "bytea", "expires_at": "timestamptz",
                 "created_at": "timestamptz", "updated_at": "timestamptz", "redis_pending": "bool",
                 "record": "jsonb"},
    "rate_limits": {"name": "text", "rate_key": "text", "algorithm": "text", "window_us": "int8",
                    "state": "jsonb", "expires_at": "timestamptz", "updated_at": "timestamptz"},
}


# table -> columns a table of an older release may lack: `migrate` adds them (an
# ``ADD COLUMN IF NOT EXISTS`` in `SCHEMA`) instead of refusing the table; a
# column of that name with another type is still a ConfigurationError.
UPGRADES: Dict[str, frozenset[str]] = {"sessions": frozenset({"record"})}

# table -> its primary key's columns: the ``ON CONFLICT`` target of every upsert.
PRIMARY_KEYS: Dict[str, Tuple[str, ...]] = {"sessions": ("session_key",),
                                            "rate_limits": ("name", "rate_key", "algorithm", "window_us")}

# table -> columns of `SHAPES` no ``INSERT`` of the library names: left to their
# default, so one NOT NULL without a default makes every insert fail.
DEFAULTED: Dict[str, frozenset[str]] = {"sessions": frozenset({"created_at", "updated_at"}),
                                        "rate_limits": frozenset({"updated_at"})}

# pg_constraint.contype -> what `_check_shapes` calls it. The library's tables have a
# primary key and NOT NULL columns only (contype 'p', and 'n' since PostgreSQL 18).
_CONSTRAINT_KINDS = {"c": "CHECK", "f": "FOREIGN KEY", "u": "UNIQUE", "x": "EXCLUDE", "t": "constraint trigger"}


class _NotRaised(Exception):
    """Stands for psycopg2's errors before psycopg2 is loaded: nothing raises it."""


def pg_error() -> Type[Exception]:
    """``psycopg2.Error`` once PostgreSQL has been used, else a class nothing raises.

    For ``except`` clauses in modules that must not import psycopg2 at import
    time: before psycopg2 is loaded no psycopg2 error can exist.
    """
    module = sys.modules.get("psycopg2")
    if module is None:
        return _NotRaised
    error: Type[Exception] = module.Error
    return error


def is_pg_transient(exc: BaseException) -> bool:
    """Connection-level failures (server gone, network), not SQL errors."""
    if "psycopg2" not in sys.modules:
        return False
    import psycopg2
    import psycopg2.errors

    return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and not isinstance(
        exc, (BackendUnavailable, psycopg2.errors.LockNotAvailable)  # contention: see lock_wait_ms
    )


# libpq's words for a refusal only the operator can fix (the server answered).
_PG_AUTH_FAILURES = ("password authentication failed", "no password supplied", "does not exist",
                     "no pg_hba.conf entry", "authentication failed")


# libpq's words for a DSN option it cannot use (it answers before connecting): "invalid port
# number", "invalid sslmode value", "invalid integer value "x" for connection option "port"".
_PG_BAD_OPTION = re.compile(r"\binvalid [\w ]*?(?:number|value)\b|\binvalid connection option\b")


def pg_misconfiguration(exc: BaseException) -> Optional[ConfigurationError]:
    """The `ConfigurationError` a psycopg2 error stands for, or None (see
    `mcp_redis.resilience.redis_misconfiguration`): refused credentials, an
    unknown role or database, a missing privilege. Messages are scrubbed of
    the DSN before they get here."""
    if "psycopg2" not in sys.modules:  # no psycopg2 error can exist yet
        return None
    import psycopg2.errors

    if isinstance(exc, (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn)):
        # The server answered: the library's schema is missing or has another
        # shape. Falling back (or retrying) would hide it; only migrate fixes it.
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ConfigurationError(
            f"PostgreSQL schema: {said}; run `mcp-redis migrate` (it creates the library's tables in "
            "MCP_REDIS_PG_SCHEMA, default mcp_redis, and names any table of another shape)",
            variable="MCP_REDIS_PG_SCHEMA")
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else "permission denied"
        return PermissionDenied(
            f"DATABASE_URL: the PostgreSQL user lacks a privilege ({said}); grant what "
            "docs/security.md lists, or use another user in DATABASE_URL", variable="DATABASE_URL")
    if isinstance(exc, psycopg2.OperationalError) and not isinstance(exc, BackendUnavailable):
        said = " ".join(str(exc).split())
        if _PG_BAD_OPTION.search(said):
            return ConfigurationError(
                f"DATABASE_URL: libpq refused a connection option ({said}); fix DATABASE_URL",
                variable="DATABASE_URL")
        if any(words in said for words in _PG_AUTH_FAILURES):
            return AuthenticationFailed(
                f"DATABASE_URL: PostgreSQL refused the connection ({said}); fix the user, password "
                "or database name in DATABASE_URL", variable="DATABASE_URL")
    return None


def _connect_options(s: Settings) -> dict[str, Any]:
    """libpq options that bound every call by `postgres_timeout`.

    ``statement_timeout`` bounds a slow statement on the server; TCP keepalives
    and ``tcp_user_timeout`` notice a dead peer or a network that drops
    packets. (A peer that accepts bytes but never answers — a stopped server
    process — is not bounded by any libpq option; see docs/reliability.md.)
    """
    import psycopg2.extensions

    ms = max(1, int(s.postgres_timeout * 1000))
    dsn = psycopg2.extensions.parse_dsn(s.database_url or "")
    options = (dsn.get("options", "") + f" -c statement_timeout={ms}").strip()
    if "lock_timeout" not in _option_names(options):  # the URL's own setting wins
        options += f" -c lock_timeout={lock_wait_ms(s)}"
    out: dict[str, Any] = {
        "connect_timeout": s.postgres_connect_timeout,
        "application_name": dsn.get("application_name", "mcp_redis"),
        "options": options,
        "keepalives": 1,
        "keepalives_idle": max(1, min(30, int(s.postgres_timeout))),
        "keepalives_interval": 2,
        "keepalives_count": 2,
    }
    if psycopg2.extensions.libpq_version() >= 120000:
        out["tcp_user_timeout"] = ms
    return out


# A server setting in libpq's ``options``: ``-c name=value``, ``-cname=value`` or ``--name=value``
# (dashes in the name read as underscores, any case).
_OPTION_NAME = re.compile(r"(?:^|\s)(?:-c\s*|--)([A-Za-z0-9_.-]+)=")


def _option_names(options: str) -> set[str]:
    """The server settings libpq's `options` text sets, as PostgreSQL names them."""
    return {name.lower().replace("-", "_") for name in _OPTION_NAME.findall(options)}


def lock_wait_ms(s: Settings) -> int:
    """``lock_timeout`` of every pooled connection: half of `postgres_timeout`.

    A wait for a row or table another transaction holds then ends as
    ``LockNotAvailable`` well before ``statement_timeout``: contention, which
    `Postgres.connection` reports as `BackendUnavailable` without a retry or a
    breaker failure, never a ``QueryCanceled`` that reads as an outage (one locked
    session row, retried three times, opened the breaker for every caller).
    """
    return max(1, int(s.postgres_timeout * 500))


def _is_lock_wait(exc: BaseException) -> bool:
    import psycopg2.errors

    return isinstance(exc, psycopg2.errors.LockNotAvailable)


def _keep_idle_pool(maxconn: int, **kwargs: Any) -> psycopg2.pool.ThreadedConnectionPool:
    """A pool that starts with no connection and keeps up to `maxconn` idle.

    psycopg2's pool closes a returned connection once `minconn` are idle, so
    ``minconn=0`` would reconnect on every query, and ``minconn=maxconn`` would
    open them all up front. (Built here, not at import: psycopg2 loads lazily.)
    """
    import psycopg2.pool

    pool = psycopg2.pool.ThreadedConnectionPool(0, maxconn, **kwargs)
    pool.minconn = maxconn
    return pool


def _discard_idle(pool: psycopg2.pool.ThreadedConnectionPool) -> int:
    """Close every idle connection of `pool` (after one proved dead: a restart, a failover or
    `pg_terminate_backend` killed the others too, and each retry would draw one of them).

    psycopg2's pool has no such call: this takes its idle list under its lock (``_pool`` and
    ``_lock``, private attributes; tests/test_postgres.py fails if they change).
    """
    state: Any = pool
    with state._lock:
        idle, state._pool = state._pool, []
    for conn in idle:
        try:
            conn.close()
        except Exception:  # pragma: no cover - closing a dead socket
            pass
    return len(idle)


class Postgres:
    """A bounded, thread-safe pool of PostgreSQL connections with a policy.

    psycopg2's pool raises at once when exhausted; a semaphore in front of it
    makes callers wait up to `pool_timeout`, then get `BackendUnavailable`.
    """

    def __init__(self, s: Settings) -> None:
        if not s.database_url:
            raise ConfigurationError("database_url: not set")
        self.settings = s
        self.schema = s.pg_schema
        self._statements: Dict[str, psycopg2.sql.Composed] = {}
        self.url = redact_url(s.database_url)
        self._maxconn = s.postgres_max_connections
        self._slots = threading.BoundedSemaphore(self._maxconn)
        self._pool: Optional[psycopg2.pool.ThreadedConnectionPool] = None
        self._pool_lock = threading.Lock()
        self._migrated = False
        self.policy = Resilience(
            "postgres",
            attempts=s.retry_attempts,
            initial_backoff=s.retry_initial_backoff,
            max_backoff=s.retry_max_backoff,
            breaker=CircuitBreaker(
                "postgres",
                failure_threshold=s.breaker_failure_threshold,
                reset_timeout=s.breaker_reset_timeout,
            ),
            transient=is_pg_transient,
            misconfiguration=pg_misconfiguration,
        )

    def __repr__(self) -> str:
        return f"Postgres(url={self.url!r}, max={self._maxconn})"

    def _get_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
        pool = self._pool
        if pool is not None:
            return pool
        import psycopg2

        with self._pool_lock:
            if self._pool is None:
                malformed = False
                try:
                    self._pool = _keep_idle_pool(
                        self._maxconn,
                        dsn=self.settings.database_url,
                        **_connect_options(self.settings),
                    )
                except psycopg2.ProgrammingError:
                    malformed = True
                if malformed:
                    # Raised out here: psycopg2's error echoes the DSN, password included, and
                    # `from None` would still keep it as the new error's __context__.
                    raise ConfigurationError(f"DATABASE_URL (database_url): invalid DSN {self.url!r}",
                                             variable="DATABASE_URL")
            return cast("psycopg2.pool.ThreadedConnectionPool", self._pool)

    def _getconn(self) -> psycopg2.extensions.connection:
        import psycopg2

        refused = ""
        try:
            return self._get_pool().getconn()
        except psycopg2.OperationalError as exc:
            refused = scrub(str(exc), self.settings.database_url)
        # Raised out here: no __context__ holding the unscrubbed error.
        raise psycopg2.OperationalError(refused)

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        """A pooled connection in a transaction: committed on success, else rolled back."""
        import psycopg2.pool

        if not self._slots.acquire(timeout=self.settings.pool_timeout):
            METRICS.inc("pool_exhausted_total", backend="postgres")
            raise PoolExhausted(
                f"postgres pool exhausted: {self._maxconn} connections in use for {self.settings.pool_timeout}s"
            )
        conn = None
        broken = False
        contended: Optional[BaseException] = None
        try:
            conn = self._getconn()
            try:
                yield conn
                conn.commit()
            except BaseException as exc:
                broken = conn.closed != 0 or is_pg_transient(exc)
                if conn.closed and self._pool is not None:
                    _discard_idle(self._pool)  # they died with it: the retry takes a new one
                if not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg2.Error:
                        broken = True
                if not _is_lock_wait(exc):
                    raise
                contended = exc
        finally:
            if conn is not None and self._pool is not None:
                try:
                    self._pool.putconn(conn, close=broken)
                except psycopg2.pool.PoolError:  # pragma: no cover - pool closed meanwhile
                    pass
            self._slots.release()
        if contended is not None:  # the server answered: no retry, no breaker failure (see lock_wait_ms)
            METRICS.inc("postgres_lock_waits_total")
            raise BackendUnavailable(
                f"postgres busy: a row or table this call needs stayed locked by another transaction for "
                f"lock_timeout ({lock_wait_ms(self.settings) / 1000:g} s, half of MCP_REDIS_POSTGRES_TIMEOUT); "
                "the call changed nothing") from contended

    def sql(self, template: str) -> psycopg2.sql.Composed:
        """`template` with ``{schema}`` filled in as ``psycopg2.sql.Identifier(pg_schema)``.

        Composed once per template and pool (the templates are module constants).
        """
        statement = self._statements.get(template)
        if statement is None:
            import psycopg2.sql

            statement = psycopg2.sql.SQL(template).format(schema=psycopg2.sql.Identifier(self.schema))
            self._statements[template] = statement
        return statement

    def execute(self, sql: Union[str, psycopg2.sql.Composable], params: Sequence[Any] = (), *,
                fetch: str = "none") -> Any:
        """Run one parameterised statement under the policy.

        `sql` is a constant string, or a ``psycopg2.sql`` composition when an
        identifier (a table name) varies — never text formatted from values.
        `fetch`: ``"none"`` (returns rowcount), ``"one"`` or ``"all"``.
        """

        def run() -> Any:
            with self.connection() as conn, conn.cursor() as cur:
                cur.execute(sql, params)
                if fetch == "one":
                    return cur.fetchone()
                if fetch == "all":
                    return cur.fetchall()
                return cur.rowcount

        self.ensure_schema()
        return self.policy.call(run)

    def ensure_schema(self) -> None:
        """Run `migrate` once per process before the first statement (idempotent).

        The DDL itself lives only in `migrate`; this makes a fresh database work
        without a deploy step, and a table of another shape fail on first use
        with the same `ConfigurationError` that ``mcp-redis migrate`` raises.
        """
        if self._migrated:
            return
        self.policy.call(self._ensure)
        self._migrated = True

    def _ensure(self) -> None:
        """Only reads when the schema is complete (every table, column and index of `SCHEMA`), so
        a process's start takes no lock on the tables (``ALTER TABLE`` takes ACCESS EXCLUSIVE even
        when it changes nothing: a long reader of the table stalled every process behind the
        starting one) and needs no right beyond the DML ones docs/security.md lists; else the
        whole migration."""
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                "WHERE c.table_schema = %s AND c.table_name = ANY(%s)", (self.schema, sorted(SHAPES)))
            columns = {(table, column) for table, column in cur.fetchall()}
            cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (self.schema,))
            indexes = {name for (name,) in cur.fetchall()}
            missing = [f"{t}.{c}" for t, shape in SHAPES.items() for c in shape if (t, c) not in columns]
            missing += sorted(_INDEXES - indexes)
            if not missing:
                self._check_shapes(cur)  # the same ConfigurationError as migrate's, for another shape
                return
        import psycopg2.errors

        refused = False
        try:
            self._migrate()
        except psycopg2.errors.InsufficientPrivilege:
            refused = True
        if refused:  # out here: no __context__ (psycopg2's words are in the message below anyway)
            raise PermissionDenied(
                f"DATABASE_URL: the library's schema {self.schema} is incomplete or not readable by this user "
                f"(not found: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}), and the user may "
                "not create it: run `mcp-redis migrate` once as the schema's owner, and grant this user USAGE "
                "on the schema and SELECT, INSERT, UPDATE, DELETE on every table of docs/security.md",
                variable="DATABASE_URL")

    def migrate(self) -> List[str]:
        """Check existing tables against `SHAPES`, then run every `SCHEMA` statement.

        Returns the statements (schema filled in). Safe to run again. A table of
        the library's name in `pg_schema` with another shape raises
        `ConfigurationError` naming the table and the column; nothing is created.
        """
        done = self.policy.call(self._migrate)
        self._migrated = True
        return done

    def _migrate(self) -> List[str]:
        with self.connection() as conn, conn.cursor() as cur:
            # Serialise concurrent migrations across processes.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK_ID,))
            self._check_shapes(cur)
            for stmt in SCHEMA:
                cur.execute(self.sql(stmt))
            # One line each, as run: without the SQL comments, which would run to the statement's end.
            return [" ".join(_SQL_COMMENT.sub("", self.sql(s).as_string(conn)).split()) for s in SCHEMA]

    def _check_shapes(self, cur: Any) -> None:
        """Raise `ConfigurationError` if a table of `SHAPES` exists in the schema with another shape."""
        cur.execute(
            "SELECT c.table_name, c.column_name, c.udt_name, c.is_nullable = 'NO' AND c.column_default IS NULL "
            "FROM information_schema.columns c WHERE c.table_schema = %s AND c.table_name = ANY(%s)",
            (self.schema, sorted(SHAPES)),
        )
        found: Dict[str, Dict[str, str]] = {}
        required: Dict[str, List[str]] = {}  # NOT NULL without a default: every insert must write them
        for table, column, udt, needed in cur.fetchall():
            found.setdefault(table, {})[column] = udt
            if needed:
                required.setdefault(table, []).append(column)
        cur.execute(  # each table's primary key, its columns in order
            "SELECT t.relname, array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i "
            "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "WHERE i.indisprimary AND n.nspname = %s AND t.relname = ANY(%s) GROUP BY t.relname",
            (self.schema, sorted(SHAPES)),
        )
        keys = {table: tuple(columns) for table, columns in cur.fetchall()}
        cur.execute(  # constraints beyond the primary key and NOT NULL (UNIQUE ones: by their index, below)
            "SELECT t.relname, c.contype::text, c.conname::text, NULL FROM pg_constraint c "
            "JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = ANY(%s) AND c.contype NOT IN ('p', 'n', 'u') "
            # unique indexes, with their plain key columns: not INCLUDE ones, nor expressions, nor
            # columns compared another way than the key compares them (a collation or an operator
            # class of their own: a case-insensitive one took two session keys for one)
            "UNION ALL SELECT t.relname, 'u', i.relname::text, "
            "ARRAY(SELECT a.attname::text FROM unnest(x.indkey[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n) "
            "      JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "      JOIN pg_opclass o ON o.oid = x.indclass[k.n - 1] "
            "      WHERE x.indcollation[k.n - 1] = a.attcollation AND o.opcdefault) "
            "FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = ANY(%s) AND x.indisunique AND NOT x.indisprimary "
            "ORDER BY 1, 3",
            (self.schema, sorted(SHAPES), self.schema, sorted(SHAPES)),
        )
        rows = cur.fetchall()
        cur.execute(  # columns compared by a nondeterministic collation: "A" = "a" in every lookup and key
            "SELECT t.relname, a.attname::text, c.collname::text FROM pg_attribute a "
            "JOIN pg_class t ON t.oid = a.attrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE n.nspname = %s AND t.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped "
            "AND NOT c.collisdeterministic ORDER BY 1, 2",
            (self.schema, sorted(SHAPES)),
        )
        foreign: Dict[str, str] = {}
        for table, column, collation in cur.fetchall():
            foreign.setdefault(table, f"column {column!r} in the nondeterministic collation {collation!r}")
        for table, kind, name, columns in rows:
            if kind == "u" and set(PRIMARY_KEYS.get(table, ("?",))) <= set(columns or ()):
                # Unique on the primary key's columns, compared as the key compares them, and more
                # (REINDEX CONCURRENTLY's twin of the key, a covering index): it cannot refuse a
                # row the primary key takes.
                continue
            foreign.setdefault(table, f"{_CONSTRAINT_KINDS.get(kind, 'a constraint')} {name!r}")
        for table, columns in sorted(found.items()):
            problem = ""
            for column, udt in SHAPES[table].items():
                if column not in columns and column in UPGRADES.get(table, frozenset()):
                    continue
                if column not in columns:
                    problem = f"has no column {column!r} ({udt})"
                elif columns[column] != udt:
                    problem = f"column {column!r} is {columns[column]}, expected {udt}"
                if problem:
                    break
            extra = [c for c in required.get(table, [])
                     if c not in SHAPES[table] or c in DEFAULTED.get(table, frozenset())]
            if not problem and extra:
                problem = f"has a column the library does not write, NOT NULL without a default: {extra[0]!r}"
            if not problem and table in foreign:
                problem = (f"has {foreign[table]}, which the library does not make: it may refuse or merge the "
                           "library's rows")
            if not problem and table in PRIMARY_KEYS and keys.get(table) != PRIMARY_KEYS[table]:
                problem = (f"has primary key {keys.get(table) or 'none'}, expected "
                           f"({', '.join(PRIMARY_KEYS[table])})")
            if problem:
                raise ConfigurationError(
                    f"PostgreSQL table {self.schema}.{table} {problem}: it is not the library's table; "
                    "set MCP_REDIS_PG_SCHEMA to a schema of the library's own (default mcp_redis)",
                    variable="MCP_REDIS_PG_SCHEMA")

    def ping(self) -> float:
        """Round-trip one ``SELECT 1``; seconds."""
        import time

        start = time.perf_counter()
        self.policy.call(self._select_one, attempts=1)
        return time.perf_counter() - start

    def _select_one(self) -> None:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()

    def pool_stats(self) -> dict[str, int]:
        pool = self._pool
        if pool is None:
            return {"in_use": 0, "idle": 0, "max": self._maxconn}
        used = getattr(pool, "_used", {})
        idle = getattr(pool, "_pool", [])
        return {"in_use": len(used), "idle": len(idle), "max": self._maxconn}

    def close(self) -> None:
        import psycopg2.pool

        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.closeall()
            except psycopg2.pool.PoolError:  # pragma: no cover
                pass


_MIGRATE_LOCK_ID = 0x6D6370_7264  # "mcp" "rd": a fixed advisory-lock id for migrate


def get_postgres() -> Postgres:
    """Deprecated: the default client's `Postgres` (raises without DATABASE_URL).

    Use ``mcp_redis.default_client().postgres()``; nothing in the package calls this.
    """
    from .client import default_client

    pg: Postgres = default_client().postgres()
    return pg


def migrate() -> List[str]:
    """Create the library's PostgreSQL schema (idempotent); returns the statements run."""
    from .client import default_client

    return default_client().postgres().migrate()
