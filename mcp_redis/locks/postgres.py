"""The PostgreSQL lock backend: session advisory locks, and the fallback for Redis.

``locks=postgres`` takes ``pg_advisory_lock`` on a pooled connection kept for
the whole hold; under ``lock_fallback=postgres`` the same lock stands in for
Redis when it is unreachable (`PostgresBackend.acquire_fallback`). Fencing
tokens live in ``<pg_schema>.lock_fences``; fallback episodes in
``<pg_schema>.lock_fallback_episodes`` (read by `GatedRedisBackend`). Every query is
parameterised.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Type

from ..errors import BackendUnavailable
from .base import Backend, Hold, LockKeys, ms

__all__ = ["PostgresBackend", "advisory_key"]

log = logging.getLogger("mcp_redis.locks")


def advisory_key(lock_key: str) -> int:
    """A stable signed 64-bit id for PostgreSQL advisory locks, from the lock's key."""
    digest = hashlib.blake2b(lock_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_FENCE_TABLE = """
    CREATE TABLE IF NOT EXISTS {schema}.lock_fences (
        lock_key TEXT PRIMARY KEY,
        fence    BIGINT NOT NULL
    )
"""
# A fallback episode of one lock name: since when PostgreSQL fallback holds
# of it may exist. Started by the first fallback hold, ended by the Redis
# side when it opens the name's gate (see GatedRedisBackend).
_EPISODE_TABLE = """
    CREATE TABLE IF NOT EXISTS {schema}.lock_fallback_episodes (
        lock_key TEXT PRIMARY KEY,
        since    TIMESTAMPTZ NOT NULL
    )
"""
# Never below PostgreSQL's clock in microseconds, and above every token
# handed out before: like Redis's max(last + 1, TIME), on every acquisition.
_NEXT_FENCE = (
    "INSERT INTO {schema}.lock_fences AS f (lock_key, fence) "
    "VALUES (%s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) "
    "ON CONFLICT (lock_key) DO UPDATE SET fence = GREATEST(f.fence + 1, EXCLUDED.fence) RETURNING fence"
)
# Seconds a fallback grant must still wait: the episode's start plus the settle time, minus now.
_JOIN_EPISODE = (
    "INSERT INTO {schema}.lock_fallback_episodes AS e (lock_key, since) VALUES (%s, clock_timestamp()) "
    "ON CONFLICT (lock_key) DO UPDATE SET since = e.since "
    "RETURNING extract(epoch FROM (e.since - clock_timestamp()))::float8 + %s"
)
_END_EPISODE = "DELETE FROM {schema}.lock_fallback_episodes WHERE lock_key = %s"
_LAST_FENCE = "SELECT fence FROM {schema}.lock_fences WHERE lock_key = %s"
_RECORD_FENCE = (
    "INSERT INTO {schema}.lock_fences AS f (lock_key, fence) VALUES (%s, %s) "
    "ON CONFLICT (lock_key) DO UPDATE SET fence = GREATEST(f.fence, EXCLUDED.fence)"
)


def _register_schema() -> None:
    from ..postgres import PRIMARY_KEYS, SCHEMA, SHAPES

    for table in (_FENCE_TABLE, _EPISODE_TABLE):
        if table not in SCHEMA:
            SCHEMA.append(table)
    SHAPES.setdefault("lock_fences", {"lock_key": "text", "fence": "int8"})
    SHAPES.setdefault("lock_fallback_episodes", {"lock_key": "text", "since": "timestamptz"})
    PRIMARY_KEYS.setdefault("lock_fences", ("lock_key",))  # ON CONFLICT (lock_key)
    PRIMARY_KEYS.setdefault("lock_fallback_episodes", ("lock_key",))


_register_schema()

# How often (s) a waiter for a PostgreSQL advisory lock re-checks its deadline
# at most; each wait is also kept under the statement_timeout (postgres_timeout).
_PG_WAIT_SLICE = 1.0


@dataclass
class _PgHandle:
    context: Any  # the Postgres.connection() context manager kept open
    connection: Any
    guard: threading.Lock = field(default_factory=threading.Lock)


class PostgresBackend(Backend):
    """Session advisory locks on a pooled connection kept for the whole hold.

    A wait is lock contention, not a backend failure: it is cut into slices
    (``lock_timeout``) each shorter than the connection's statement_timeout,
    so it honours `deadline` (None: forever) and never trips the breaker.
    """

    name = "postgres"
    session_check_every: Optional[float] = 1.0
    unbounded_calls = True

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        return self._acquire(keys, token, lease, deadline, settle=None)

    def acquire_fallback(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float]) -> Optional[Hold]:
        """Acquire in place of Redis: also wait out every Redis hold that may still exist.

        A process that cannot reach Redis cannot see its holds. So the first
        fallback grant of a name in an episode waits two leases after the
        episode began (holding the advisory lock, so no Redis gate can open
        meanwhile): one for the name's gate (TTL one lease), one for a Redis
        hold granted just before the gate closed. Later fallback grants of the
        episode wait no more.
        """
        return self._acquire(keys, token, lease, deadline, settle=2 * lease)

    def _acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                 settle: Optional[float]) -> Optional[Hold]:
        pg = self.client.postgres()
        pg.ensure_schema()
        lock_id = advisory_key(keys.lock)
        # Each slice of a wait ends before the statement_timeout would cut it.
        slice_cap = max(0.001, min(_PG_WAIT_SLICE, pg.settings.postgres_timeout / 2))

        def attempt() -> Optional[Hold]:
            context = pg.connection()
            conn = context.__enter__()
            got = False
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    got = _wait_advisory(cur, lock_id, deadline, slice_cap)
                    if got and settle is not None:
                        cur.execute(pg.sql(_JOIN_EPISODE), (keys.lock, settle))
                        row = cur.fetchone()
                        pause = float(row[0]) if row else 0.0
                        if pause > 0:
                            if deadline is not None and time.monotonic() + pause > deadline:
                                got = False
                                cur.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
                            else:
                                time.sleep(pause)
                    if got:
                        cur.execute(pg.sql(_NEXT_FENCE), (keys.lock,))
                        row = cur.fetchone()
            except BaseException as exc:
                if got:  # never pool a session that may still hold the lock
                    _close_quietly(conn)
                _give_back(context, conn, exc)
                raise
            if not got:
                _give_back(context, conn, None)
                return None
            fence = int(row[0]) if row else 0
            return Hold(self, keys, token, fence, lease, float("inf"), _PgHandle(context, conn))

        return pg.policy.call(attempt, attempts=1)

    def release(self, hold: Hold) -> bool:
        handle: _PgHandle = hold.handle
        with handle.guard:
            conn = handle.connection
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(hold.keys.lock),))
                    row = cur.fetchone()
            except Exception as exc:  # the session died, and its lock with it
                log.warning("lock: postgres session of a held lock was lost: %s", type(exc).__name__)
                _give_back(handle.context, conn, exc)
                return False
            _give_back(handle.context, conn, None)
        return bool(row and row[0])

    def extend(self, hold: Hold, seconds: float, replace: bool) -> bool:
        """No lease to lengthen: whether the hold's session still holds the lock (the watchdog asks
        every `session_check_every` seconds). A session that died (PostgreSQL restarted, the
        connection killed) took the lock with it: False. A check that failed on a live session
        raises (unknown; the watchdog asks again)."""
        handle: _PgHandle = hold.handle
        with handle.guard:
            # Under the guard: a release sets `released` before it takes the guard to give the
            # connection back, so a check never uses a connection the pool has lent to another.
            if hold.released or hold.is_lost:
                return False
            failed = ""
            try:
                with handle.connection.cursor() as cur:
                    return _holds_advisory(cur, advisory_key(hold.keys.lock))
            except Exception as exc:
                if handle.connection.closed:
                    return False
                failed = type(exc).__name__
        # A live session that could not answer (a cancelled or timed-out check): still held, unknown.
        raise BackendUnavailable(f"postgres: could not check the lock's session ({failed})")

    def owned(self, hold: Hold) -> bool:
        handle: _PgHandle = hold.handle
        if hold.is_lost:
            return False
        with handle.guard:
            try:
                with handle.connection.cursor() as cur:
                    return _holds_advisory(cur, advisory_key(hold.keys.lock))
            except Exception:
                return False

    def locked(self, keys: LockKeys) -> bool:
        row = self.client.postgres().execute(
            "SELECT NOT pg_try_advisory_xact_lock(%s)", (advisory_key(keys.lock),), fetch="one"
        )
        return bool(row and row[0])


def _give_back(context: Any, conn: Any, exc: Optional[BaseException]) -> None:
    """Return a held connection to the pool as it came (not autocommit); broken if `exc` says so."""
    try:
        if not conn.closed:
            conn.autocommit = False
    except Exception:  # noqa: S110 - a dead connection: the pool discards it below
        pass
    if exc is None:
        context.__exit__(None, None, None)
    else:
        context.__exit__(type(exc), exc, exc.__traceback__)


def _close_quietly(conn: Any) -> None:
    """Close `conn` (the pool then discards it, and PostgreSQL frees its session locks)."""
    try:
        conn.close()
    except Exception:  # noqa: S110 - already dead
        pass


def _lock_not_available() -> Type[BaseException]:
    import psycopg2.errors

    error: Type[BaseException] = psycopg2.errors.LockNotAvailable
    return error


def _holds_advisory(cur: Any, lock_id: int) -> bool:
    """True when this session holds the session advisory lock `lock_id`."""
    cur.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
        "AND granted AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = (%s::bigint & x'ffffffffffffffff'::bigint)",
        (lock_id,),
    )
    row = cur.fetchone()
    return bool(row and row[0])


def _wait_advisory(cur: Any, lock_id: int, deadline: Optional[float], slice_cap: float) -> bool:
    """Take the session advisory lock `lock_id` by `deadline` (monotonic; None: forever).

    One try first (the uncontended path); then waits of at most `slice_cap`
    seconds each (``lock_timeout``): PostgreSQL wakes a waiter as soon as the
    lock is free, and no wait runs into the statement_timeout.
    """
    cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,))
    row = cur.fetchone()
    if row and row[0]:
        return True
    got = False
    try:
        while not got:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            wait = slice_cap if remaining is None else min(slice_cap, remaining)
            cur.execute("SELECT set_config('lock_timeout', %s, false)", (str(ms(wait)),))
            try:
                cur.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
                got = True
            except _lock_not_available():
                # The timeout can fire as the lock is granted: PostgreSQL then
                # raises *and* keeps the (session) lock. Ours, then.
                got = _holds_advisory(cur, lock_id)
    finally:
        try:
            cur.execute("RESET lock_timeout")
        except Exception:  # noqa: S110 - a dead connection: the pool discards it
            pass
    return got


