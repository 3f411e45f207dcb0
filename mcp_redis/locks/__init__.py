"""Distributed locks: `agent_lock` and `lock`, one story from acquire to release.

A lock is a lease owned by a value unique to one acquire call: a fresh
random nonce (after the caller's `token`, when one is given: a token is a
dedupe id, not an identity, so two holders passing the same token are still
two holders), held by one (process, thread). In Redis every operation is one
Lua script (one round trip); a retry of one call after a lost reply is
recognised by that value (acquire) or by a short-lived per-call record
(release, additive extend), so it never grants, releases or extends twice.
Acquire also INCRs a per-name fencing counter, and a failed try joins a FIFO
of waiters in the same script, so no release can slip by unseen. Release
hands the lock to the longest waiter (reserving it for a moment so a
releaser that loops cannot barge in) and wakes it through its own signal
list (BLPOP): no polling. Every wait is capped at the lock's remaining
lease, so a holder that crashed is noticed when its lease ends.

Backends, per ``client.mode("locks")`` (the lock's client, else the default one):

* ``redis``: the above. When Redis is unreachable, ``settings.lock_fallback``
  decides: ``none`` fails closed (`BackendUnavailable`), ``postgres`` takes a
  PostgreSQL advisory lock, ``local`` a host-local file lock (unsafe across
  hosts; logged and counted). Under ``postgres`` the two tiers exclude each
  other: Redis grants pass a per-name gate that PostgreSQL vouches for, and a
  fallback grant waits out the Redis leases that may still run
  (`_GatedRedisBackend`, `_PostgresBackend.acquire_fallback`).
* ``postgres``: ``pg_advisory_lock`` on a connection kept for the hold; waits
  are contention, never a backend failure.
* ``local``: ``fcntl.flock`` on a file in ``settings.lock_dir``; the kernel
  frees a crashed holder's lock, so a lock file left behind never blocks, and
  a forked child closes its copies so it never keeps its parent's lock.
* ``off``: a no-op lock that always enters (logged once as unsafe).

Every backend's fencing tokens are ``max(previous + 1, clock in µs)``, so the
tokens of one name keep rising across backends and fallback episodes.

`agent_lock` renews its lease from one shared watchdog thread per process and
is reentrant per thread (a hold already lost is never re-entered). After
``os.fork()`` the child holds nothing: it can neither release nor renew its
parent's locks. Ownership is per thread, so every acquire from a thread that
is running an asyncio event loop is refused (`BlockingCallInEventLoop`):
coroutines sharing the thread would all "own" the lock.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from asyncio.events import _get_running_loop
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Deque, Dict, List, Optional, Set, Tuple, Type, TypeVar, Union

import redis.exceptions as rex

from .client import Client, default_client, resolve
from .config import LockFallback, Mode, Settings, on_reset
from .connections import RedisConnection, on_fork
from .errors import (
    BackendUnavailable,
    BlockingCallInEventLoop,
    ConfigurationError,
    InvalidArgument,
    InvalidArgumentType,
    LockNotOwned,
    LockNotReplicated,
    LockTimeout,
)
from .keys import KeySpace, validate_id
from .metrics import METRICS
from .validation import optional_seconds
from .validation import seconds as check_seconds

__all__ = [
    "DistributedLock",
    "AgentLock",
    "agent_lock",
    "lock",
    "AGENT_LOCK_BLOCKING_TIMEOUT",
    "HANDOFF_GRACE",
    "advisory_key",
    "held_locks",
]

log = logging.getLogger("mcp_redis.locks")
T = TypeVar("T")

#: Default longest wait of `agent_lock` (seconds): the legacy manager's 5 s.
AGENT_LOCK_BLOCKING_TIMEOUT = 5.0
#: How long (s) a lock released to a waiter stays reserved for it; a waiter
#: that died while queued delays the next holder by at most this.
HANDOFF_GRACE = 1.0
# The longest single BLPOP (s); also bounded by half the socket timeout.
_MAX_WAIT_SLICE = 1.0
# Redis's default cron period (hz 10): how late an idle server may time out a BLPOP.
_SERVER_TICK = 0.1
_RESERVED = "r:"
_TICKET = re.compile(r"[0-9a-f]{24}")
#: Hex digits of the per-call nonce that ends every Redis holder's value (the
#: release script reads them back to name its record: keep the two in step).
_NONCE_HEX = 32


# -- Redis calls -----------------------------------------------------------------
# -- one acquisition --------------------------------------------------------------
_pid = os.getpid()  # this process's id, refreshed in a forked child
_generation = 0  # bumped by reset()/configure(): older holds are never re-entered
_event_lock = threading.Lock()


@dataclass(eq=False)
class _Hold:
    """One acquisition: who holds it, how, and whether its lease was lost."""

    backend: _Backend
    keys: _Keys
    token: str
    fence: int
    lease: float
    expires_at: float  # monotonic; meaningful for the redis backend
    handle: Any = None  # backend-specific: RedisConnection, pg connection, fd
    pid: int = field(default_factory=lambda: _pid)
    generation: int = field(default_factory=lambda: _generation)
    count: int = 1
    is_lost: bool = False
    released: bool = False
    next_renewal: float = 0.0
    misconfiguration_logged: bool = False  # a refused renewal is logged once per hold
    client: Optional[Client] = None  # whose connections the hold uses (renewals, the gate)
    _event: Optional[threading.Event] = None  # made on demand: most holds never need one

    def mark_lost(self) -> None:
        with _event_lock:
            self.is_lost = True
            if self._event is not None:
                self._event.set()

    def lost_event(self) -> threading.Event:
        with _event_lock:
            if self._event is None:
                self._event = threading.Event()
                if self.is_lost:
                    self._event.set()
            return self._event


@dataclass(frozen=True)
class _Keys:
    lock: str
    fence: str
    queue: str
    signal_base: str  # space.key(namespace, *ids, tag=True, suffix="w")
    prefix: str

    def signal(self, ticket: str) -> str:
        """A waiter's signal list: ``space.key(ns, *ids, tag=True, suffix="w" + ticket)``."""
        return self.signal_base + ticket


_KEYS_CACHE: Dict[Tuple[str, str, Tuple[str, ...]], _Keys] = {}
_KEYS_CACHE_MAX = 1024


def _keys_for(prefix: str, namespace: str, ids: Tuple[str, ...]) -> _Keys:
    """The keys of one lock (memoised: `agent_lock` builds a new object per call)."""
    cache_key = (prefix, namespace, ids)
    keys = _KEYS_CACHE.get(cache_key)
    if keys is None:
        space = KeySpace(prefix)
        keys = _Keys(
            space.key(namespace, *ids, tag=True),
            space.key(namespace, *ids, tag=True, suffix="fence"),
            space.key(namespace, *ids, tag=True, suffix="queue"),
            space.key(namespace, *ids, tag=True, suffix="w"),
            prefix,
        )
        if len(_KEYS_CACHE) >= _KEYS_CACHE_MAX:
            _KEYS_CACHE.clear()
        _KEYS_CACHE[cache_key] = keys
    return keys


class _Backend:
    """How one kind of store takes, keeps and gives back a lock."""

    name = "?"
    leased = False  # does the hold expire unless renewed?

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        """A hold, or None when not acquired before `deadline` (monotonic; None = forever).

        `token` is this acquire call's value, unique per call (it ends with a
        fresh nonce): the holder's identity, never shared by two holders.
        """
        raise NotImplementedError

    def release(self, hold: _Hold) -> bool:
        """Give the lock back; False when it was no longer held by `hold`."""
        raise NotImplementedError

    def extend(self, hold: _Hold, seconds: float, replace: bool) -> bool:
        """Lengthen (or with `replace`, set) the lease; False when not owned."""
        return not hold.is_lost

    def owned(self, hold: _Hold) -> bool:
        return not hold.is_lost

    def locked(self, client: Client, keys: _Keys) -> bool:
        raise NotImplementedError


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


_record_ms_memo: Tuple[Any, int] = (None, 0)  # (settings, ms): computed once per configuration


def _record_ms(conn: RedisConnection) -> int:
    """How long (ms) a per-call record must last: past every retry of that call.

    A retry reaches the server at most one connect, one reply timeout and one
    backoff after the attempt before it; a second and further retries each
    find the record made by the attempt that ran. One second of slack.
    """
    global _record_ms_memo
    s = conn.settings
    memo = _record_ms_memo
    if memo[0] is s:
        return memo[1]
    per_attempt = s.socket_connect_timeout + s.socket_timeout + s.retry_max_backoff
    ms = _ms(max(1, s.retry_attempts) * per_attempt + 1.0)
    _record_ms_memo = (s, ms)
    return ms


class _RedisBackend(_Backend):
    """Lease locks in Redis: Lua scripts, a FIFO of waiters, BLPOP wake-ups."""

    name = "redis"
    leased = True

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        conn = client.redis("locks")
        lease_ms = _ms(lease)
        # First a plain try (the uncontended path: 2 keys, 2 args). A failed
        # try with the queue keys joins the queue atomically, so the release
        # that follows it is sure to signal us: no wake-up can be lost.
        started = time.monotonic()
        granted, value = conn.call(conn.run_script, conn.script("lock_acquire"), [keys.lock, keys.fence], [token, lease_ms])
        if granted:
            return _Hold(self, keys, token, int(value), lease, started + lease, conn, client=client)
        if deadline is not None and deadline <= time.monotonic():
            return None
        slice_cap = min(_MAX_WAIT_SLICE, conn.settings.socket_timeout / 2)
        queue_ttl = str(_ms(slice_cap + 2 * HANDOFF_GRACE))
        # The signal list is named by this call's nonce (the value's tail): unique per waiter.
        ticket = token[-24:] if _TICKET.fullmatch(token[-24:]) else secrets.token_hex(12)
        signal = keys.signal(ticket)
        key_list = [keys.lock, keys.fence, keys.queue, signal]
        queued = False
        try:
            while True:
                started = time.monotonic()
                queued = True
                granted, value = conn.call(conn.run_script, conn.script("lock_acquire"), key_list, [token, lease_ms, queue_ttl])
                if granted:
                    queued = False
                    return _Hold(self, keys, token, int(value), lease, started + lease, conn, client=client)
                now = time.monotonic()
                remaining = float("inf") if deadline is None else deadline - now
                if remaining <= 0:
                    return None
                pttl = int(value)
                wait = min(remaining, slice_cap, pttl / 1000 + 0.001 if pttl > 0 else slice_cap)
                conn.call(_wait_for_signal, conn.client, signal, wait)
        finally:
            if queued:
                self._leave_queue(conn, keys, signal)

    def replicate(self, hold: _Hold, replicas: int, timeout: float) -> int:
        """Wait until `replicas` replicas have the lock; returns how many did (-1: lost).

        ``WAIT`` counts the writes of its own connection, so one pipeline on
        one connection (the key's node on a cluster) re-writes the lease with
        the owner-checked extend script, then WAITs: replication is ordered,
        so the acknowledgement covers the acquisition before it.
        """
        conn: RedisConnection = hold.handle
        target = conn.client
        if conn.is_cluster:
            target = target.get_redis_connection(target.get_node_from_key(hold.keys.lock))
        wait_ms = max(1, min(_ms(timeout), _ms(conn.settings.socket_timeout * 0.8)))

        def run() -> Tuple[int, int]:
            pipe = target.pipeline(transaction=False)
            conn.script("lock_extend")([hold.keys.lock], [hold.token, _ms(hold.lease), "1"], client=pipe)
            pipe.execute_command("WAIT", replicas, wait_ms)
            extended, acked = pipe.execute()
            return int(extended), int(acked)

        extended, acked = conn.call(run)
        return acked if extended else -1

    def _leave_queue(self, conn: RedisConnection, keys: _Keys, signal: str) -> None:
        """A waiter giving up: leave the queue; pass on a reservation made for us."""
        try:
            conn.call(conn.run_script, conn.script("lock_release"), [keys.lock, keys.queue, signal],
                      [_RESERVED + signal, _ms(HANDOFF_GRACE)])
        except Exception:  # the entry lapses with the queue's short TTL anyway
            log.debug("lock: could not leave the queue", exc_info=True)

    def release(self, hold: _Hold) -> bool:
        """One round trip; leaves a release record, so a retry after a lost reply still answers True."""
        conn: RedisConnection = hold.handle
        keys = [hold.keys.lock, hold.keys.queue]
        args = [hold.token, _ms(HANDOFF_GRACE), _record_ms(conn)]
        return bool(conn.call(conn.run_script, conn.script("lock_release"), keys, args))

    def extend(self, hold: _Hold, seconds: float, replace: bool) -> bool:
        """Set (`replace`, idempotent) or add to the lease; an addition is recorded
        per call, so a retry after a lost reply does not add it twice."""
        conn: RedisConnection = hold.handle
        started = time.monotonic()
        if replace:
            args: List[Any] = [hold.token, _ms(seconds), "1"]
        else:
            args = [hold.token, _ms(seconds), "0", os.urandom(12).hex(), _record_ms(conn)]
        ok = bool(conn.call(conn.run_script, conn.script("lock_extend"), [hold.keys.lock], args))
        if ok and replace:
            hold.expires_at = started + seconds
        elif ok:
            hold.expires_at += seconds
        return ok

    def owned(self, hold: _Hold) -> bool:
        conn: RedisConnection = hold.handle
        return bool(conn.call(conn.client.get, hold.keys.lock) == hold.token)

    def locked(self, client: Client, keys: _Keys) -> bool:
        conn = client.redis("locks")
        return bool(conn.call(conn.client.exists, keys.lock))


def _wait_for_signal(client: Any, key: str, wait: float) -> bool:
    """BLPOP `key` for at most `wait` seconds on a pooled connection; True if signalled.

    An idle Redis times blocked commands out only on its cron tick (100 ms at
    the default ``hz 10``), late by up to a tick. So a long wait asks the
    server for one tick less (its reply then comes by `wait`), and only a
    short last stretch is timed here: if it runs out first, the connection is
    dropped, abandoning the BLPOP. A signal lost that way is harmless: the
    release also reserved the lock for us, and our next try claims it.
    """
    target = client
    if hasattr(client, "get_node_from_key"):  # RedisCluster: the node owning the key
        target = client.get_redis_connection(client.get_node_from_key(key))
    if wait > 1.5 * _SERVER_TICK:
        server_wait, client_wait = wait - _SERVER_TICK, wait + 2 * _SERVER_TICK
    else:
        server_wait = client_wait = wait
    pool = target.connection_pool
    connection = pool.get_connection()
    try:
        # BLPOP's timeout 0 means forever: never send less than 2 ms.
        connection.send_command("BLPOP", key, round(max(server_wait, 0.002), 3))
        if connection.can_read(timeout=client_wait):
            return connection.read_response() is not None
        connection.disconnect()
        return False
    except (rex.MovedError, rex.AskError):
        # The slot moved (cluster resharding): wake up; the next try goes
        # through the cluster client, which follows the move and learns it.
        return False
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def advisory_key(lock_key: str) -> int:
    """A stable signed 64-bit id for PostgreSQL advisory locks, from the lock's key."""
    digest = hashlib.blake2b(lock_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_FENCE_TABLE = """
    CREATE TABLE IF NOT EXISTS core.lock_fences (
        lock_key TEXT PRIMARY KEY,
        fence    BIGINT NOT NULL
    )
"""
# A fallback episode of one lock name: since when PostgreSQL fallback holds
# of it may exist. Started by the first fallback hold, ended by the Redis
# side when it opens the name's gate (see _GatedRedisBackend).
_EPISODE_TABLE = """
    CREATE TABLE IF NOT EXISTS core.lock_fallback_episodes (
        lock_key TEXT PRIMARY KEY,
        since    TIMESTAMPTZ NOT NULL
    )
"""
# Never below PostgreSQL's clock in microseconds, and above every token
# handed out before: like Redis's max(INCR, TIME), on every acquisition.
_NEXT_FENCE = (
    "INSERT INTO core.lock_fences AS f (lock_key, fence) "
    "VALUES (%s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) "
    "ON CONFLICT (lock_key) DO UPDATE SET fence = GREATEST(f.fence + 1, EXCLUDED.fence) RETURNING fence"
)
# Seconds a fallback grant must still wait: the episode's start plus the settle time, minus now.
_JOIN_EPISODE = (
    "INSERT INTO core.lock_fallback_episodes AS e (lock_key, since) VALUES (%s, clock_timestamp()) "
    "ON CONFLICT (lock_key) DO UPDATE SET since = e.since "
    "RETURNING extract(epoch FROM (e.since - clock_timestamp()))::float8 + %s"
)
_END_EPISODE = "DELETE FROM core.lock_fallback_episodes WHERE lock_key = %s"
_LAST_FENCE = "SELECT fence FROM core.lock_fences WHERE lock_key = %s"
_RECORD_FENCE = (
    "INSERT INTO core.lock_fences AS f (lock_key, fence) VALUES (%s, %s) "
    "ON CONFLICT (lock_key) DO UPDATE SET fence = GREATEST(f.fence, EXCLUDED.fence)"
)


def _register_schema() -> None:
    from .postgres import SCHEMA

    for table in (_FENCE_TABLE, _EPISODE_TABLE):
        if table not in SCHEMA:
            SCHEMA.append(table)


_register_schema()

# How often (s) a waiter for a PostgreSQL advisory lock re-checks its deadline
# at most; each wait is also kept under the statement_timeout (postgres_timeout).
_PG_WAIT_SLICE = 1.0


@dataclass
class _PgHandle:
    context: Any  # the Postgres.connection() context manager kept open
    connection: Any
    guard: threading.Lock = field(default_factory=threading.Lock)


class _PostgresBackend(_Backend):
    """Session advisory locks on a pooled connection kept for the whole hold.

    A wait is lock contention, not a backend failure: it is cut into slices
    (``lock_timeout``) each shorter than the connection's statement_timeout,
    so it honours `deadline` (None: forever) and never trips the breaker.
    """

    name = "postgres"

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        return self._acquire(client, keys, token, lease, deadline, settle=None)

    def acquire_fallback(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        """Acquire in place of Redis: also wait out every Redis hold that may still exist.

        A process that cannot reach Redis cannot see its holds. So the first
        fallback grant of a name in an episode waits two leases after the
        episode began (holding the advisory lock, so no Redis gate can open
        meanwhile): one for the name's gate (TTL one lease), one for a Redis
        hold granted just before the gate closed. Later fallback grants of the
        episode wait no more.
        """
        return self._acquire(client, keys, token, lease, deadline, settle=2 * lease)

    def _acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float],
                 settle: Optional[float]) -> Optional[_Hold]:
        pg = client.postgres()
        pg.ensure_schema()
        lock_id = advisory_key(keys.lock)
        # Each slice of a wait ends before the statement_timeout would cut it.
        slice_cap = max(0.001, min(_PG_WAIT_SLICE, pg.settings.postgres_timeout / 2))

        def attempt() -> Optional[_Hold]:
            context = pg.connection()
            conn = context.__enter__()
            got = False
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    got = _wait_advisory(cur, lock_id, deadline, slice_cap)
                    if got and settle is not None:
                        cur.execute(_JOIN_EPISODE, (keys.lock, settle))
                        row = cur.fetchone()
                        pause = float(row[0]) if row else 0.0
                        if pause > 0:
                            if deadline is not None and time.monotonic() + pause > deadline:
                                got = False
                                cur.execute("SELECT pg_advisory_unlock(%s)", (lock_id,))
                            else:
                                time.sleep(pause)
                    if got:
                        cur.execute(_NEXT_FENCE, (keys.lock,))
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
            return _Hold(self, keys, token, fence, lease, float("inf"), _PgHandle(context, conn), client=client)

        return pg.policy.call(attempt, attempts=1)

    def release(self, hold: _Hold) -> bool:
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

    def owned(self, hold: _Hold) -> bool:
        handle: _PgHandle = hold.handle
        if hold.is_lost:
            return False
        with handle.guard:
            try:
                with handle.connection.cursor() as cur:
                    return _holds_advisory(cur, advisory_key(hold.keys.lock))
            except Exception:
                return False

    def locked(self, client: Client, keys: _Keys) -> bool:
        row = client.postgres().execute(
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
            cur.execute("SELECT set_config('lock_timeout', %s, false)", (str(_ms(wait)),))
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


class _FairTurn:
    """FIFO turns among this process's threads for one local lock (direct handoff).

    flock has no timed wait and no order, so without this a thread that
    releases and asks again would beat the threads sleeping between polls.
    Only the thread holding the turn polls the file.
    """

    __slots__ = ("held", "waiters", "users")

    def __init__(self) -> None:
        self.held = False
        self.waiters: Deque[threading.Event] = collections.deque()
        self.users = 0  # threads holding or waiting (the entry is dropped at 0)


_turns_lock = threading.Lock()
_turns: Dict[str, _FairTurn] = {}


def _take_turn(path: str, deadline: Optional[float]) -> bool:
    with _turns_lock:
        turn = _turns.get(path)
        if turn is None:
            turn = _turns[path] = _FairTurn()
        turn.users += 1
        if not turn.held and not turn.waiters:
            turn.held = True
            return True
        event = threading.Event()
        turn.waiters.append(event)
    if event.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
        return True
    with _turns_lock:
        if event.is_set():  # handed over just as we gave up
            return True
        turn.waiters.remove(event)
        _leave(path, turn)
    return False


def _pass_turn(path: str) -> None:
    with _turns_lock:
        turn = _turns.get(path)
        if turn is None:
            return
        if turn.waiters:
            turn.waiters.popleft().set()  # stays held: the next thread owns it now
        else:
            turn.held = False
        _leave(path, turn)


def _leave(path: str, turn: _FairTurn) -> None:
    turn.users -= 1
    if turn.users <= 0 and _turns.get(path) is turn:
        del _turns[path]


# Every lock-file fd this process has open. flock belongs to the open file
# description, which a fork shares: a child that kept its copies would keep
# its parent's locks after the parent died. The at-fork hook closes them.
_open_fds_lock = threading.Lock()
_open_fds: Set[int] = set()


class _LocalBackend(_Backend):
    """``fcntl.flock`` on one file per lock; the file also keeps the fencing counter."""

    name = "local"

    @staticmethod
    def path(keys: _Keys, lock_dir: Optional[str] = None) -> str:
        """The lock file of `keys` in `lock_dir` (default: the default client's)."""
        digest = hashlib.sha256(keys.lock.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        directory = lock_dir if lock_dir is not None else default_client().settings.lock_dir
        return os.path.join(directory, f"mcp_redis-{digest}.lock")

    def _open(self, path: str) -> int:
        """Open the lock file; the fd is tracked so a forked child closes its copy."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with _open_fds_lock:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            _open_fds.add(fd)
        return fd

    @staticmethod
    def _close(fd: int) -> None:
        with _open_fds_lock:
            _open_fds.discard(fd)
            os.close(fd)

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        path = self.path(keys, client.settings.lock_dir)
        if not _take_turn(path, deadline):
            return None
        fd = -1
        try:
            fd = self._open(path)
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                remaining = float("inf") if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    self._close(fd)
                    _pass_turn(path)
                    return None
                # Another process holds it; flock has no timed wait: back off 0.5 ms -> 20 ms.
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.02)
            raw = os.pread(fd, 32, 0).strip()
            # Never below the clock in microseconds, as in Redis and PostgreSQL:
            # tokens of one name keep rising across backends and episodes.
            fence = max(int(raw) + 1 if raw.isdigit() else 0, time.time_ns() // 1000)
            os.pwrite(fd, b"%020d\n" % fence, 0)
        except BaseException:
            if fd >= 0:
                try:
                    self._close(fd)
                except OSError:
                    pass
            _pass_turn(path)
            raise
        return _Hold(self, keys, token, fence, lease, float("inf"), (fd, path))

    def release(self, hold: _Hold) -> bool:
        fd, path = hold.handle
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._close(fd)
            _pass_turn(path)
        return True

    def locked(self, client: Client, keys: _Keys) -> bool:
        fd = self._open(self.path(keys, client.settings.lock_dir))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            self._close(fd)  # closing drops the probe's lock too
        return False


class _OffBackend(_Backend):
    """``locks=off``: every acquire enters at once; nothing is excluded."""

    name = "off"
    _warned = False

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        if not _OffBackend._warned:
            _OffBackend._warned = True
            log.warning("locks backend is 'off': locks are no-ops and exclude nothing")
        METRICS.inc("lock_unsafe_total", backend="off")
        return _Hold(self, keys, token, 0, lease, float("inf"))

    def release(self, hold: _Hold) -> bool:
        return True

    def locked(self, client: Client, keys: _Keys) -> bool:
        return False


class _GatedRedisBackend(_RedisBackend):
    """Redis under ``lock_fallback=postgres``: a grant or renewal counts only through the name's gate.

    A fallback hold lives in PostgreSQL, invisible to Redis. The gate
    (``<lock key>#gate``, TTL one lease) records that PostgreSQL said no
    fallback hold of the name exists; it is opened only while holding the
    name's advisory lock, so no fallback grant can start meanwhile. Absent
    (expired, never set, or lost with Redis's data), the holder asks
    PostgreSQL first: while a fallback hold exists, the grant is given back
    and retried until `deadline`; a renewal fails (the lease is lost). With
    the gate open a grant costs one ``EXISTS`` more than plain Redis, and no
    PostgreSQL round trip. A fallback grant waits two leases after its
    episode began (`_PostgresBackend.acquire_fallback`), so every Redis hold
    granted or renewed before the gate closed has ended.
    """

    def acquire(self, client: Client, keys: _Keys, token: str, lease: float, deadline: Optional[float]) -> Optional[_Hold]:
        delay = 0.002
        while True:
            hold = super().acquire(client, keys, token, lease, deadline)
            if hold is None:
                return None
            try:
                if self._through_gate(hold):
                    return hold
            except BaseException:  # PostgreSQL could not say: fail closed, hold nothing
                self._give_back(hold)
                raise
            self._give_back(hold)
            remaining = float("inf") if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            # A fallback hold exists: it frees in PostgreSQL, where no release
            # signals us. Back off 2 ms -> 100 ms.
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    def extend(self, hold: _Hold, seconds: float, replace: bool) -> bool:
        if not super().extend(hold, seconds, replace):
            return False
        if self._through_gate(hold):
            return True
        self._give_back(hold)
        return False

    def _give_back(self, hold: _Hold) -> None:
        try:
            self.release(hold)
        except Exception:  # its lease runs out anyway
            log.debug("lock: could not give back a grant the gate refused", exc_info=True)

    def _through_gate(self, hold: _Hold) -> bool:
        """True when no PostgreSQL fallback hold of the name can exist while `hold` lasts."""
        conn: RedisConnection = hold.handle
        if conn.call(conn.client.exists, _gate_key(hold.keys)):
            return True
        return self._open_gate(hold)

    def _open_gate(self, hold: _Hold) -> bool:
        """Ask PostgreSQL; if no fallback hold exists, end its episode and open the gate.

        Under the name's transaction-scoped advisory lock: the gate is set,
        and the fencing tokens of both tiers reconciled (the hold's token
        rises above PostgreSQL's, which records it), before any fallback
        grant can begin.
        """

        pg = (hold.client or default_client()).postgres()
        pg.ensure_schema()
        conn: RedisConnection = hold.handle
        lock_key = hold.keys.lock

        def run() -> bool:
            with pg.connection() as pgconn, pgconn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (advisory_key(lock_key),))
                row = cur.fetchone()
                if not (row and row[0]):
                    return False
                cur.execute(_END_EPISODE, (lock_key,))
                cur.execute(_LAST_FENCE, (lock_key,))
                row = cur.fetchone()
                floor = int(row[0]) if row else 0
                script = conn.script("lock_gate")
                fence = conn.call(conn.run_script, script, [_gate_key(hold.keys), hold.keys.fence],
                                  [_ms(hold.lease), floor, hold.fence])
                hold.fence = int(fence)
                cur.execute(_RECORD_FENCE, (lock_key, hold.fence))
            return True

        opened = bool(pg.policy.call(run))
        if opened:
            METRICS.inc("lock_gate_total", outcome="opened")
        else:
            METRICS.inc("lock_gate_total", outcome="fallback_held")
        return opened


def _gate_key(keys: _Keys) -> str:
    """``space.key(ns, *ids, tag=True, suffix="gate")``: the lock's key plus ``#gate`` (same slot)."""
    return keys.lock + "#gate"


_REDIS = _RedisBackend()
_POSTGRES = _PostgresBackend()
_GATED_REDIS = _GatedRedisBackend()
_LOCAL = _LocalBackend()
_OFF = _OffBackend()
_BY_MODE: Dict[Mode, _Backend] = {Mode.REDIS: _REDIS, Mode.POSTGRES: _POSTGRES, Mode.LOCAL: _LOCAL, Mode.OFF: _OFF}


def _primary(s: Settings) -> _Backend:
    backend = _BY_MODE[s.mode("locks")]
    if backend is _REDIS and s.lock_fallback is LockFallback.POSTGRES:
        return _GATED_REDIS
    return backend


def _fallback(s: Settings) -> Optional[_Backend]:
    choice = s.lock_fallback
    if choice is LockFallback.POSTGRES:
        return _POSTGRES
    if choice is LockFallback.LOCAL:
        return _LOCAL
    return None


if hasattr(os, "register_at_fork"):
    # No fork while a thread is between opening a lock file and registering it.
    os.register_at_fork(before=lambda: _open_fds_lock.acquire(), after_in_parent=lambda: _open_fds_lock.release())


# -- the watchdog ------------------------------------------------------------------
class _Watchdog:
    """One daemon thread per process renewing every auto-renewing lease at a third of it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holds: Dict[int, _Hold] = {}
        self._thread: Optional[threading.Thread] = None
        self._pid = _pid
        self._wake_at = float("inf")  # when the thread will next look, unless notified
        # With no holds the thread still looks every last-lease/3, so a new
        # hold with a lease like the last one needs no wake-up: in a loop of
        # short sections, waking it on every acquire would cost a thread
        # switch each time.
        self._idle_wait = float("inf")

    def add(self, hold: _Hold) -> None:
        with self._cond:
            hold.next_renewal = time.monotonic() + hold.lease / 3
            self._holds[id(hold)] = hold
            self._idle_wait = hold.lease / 3
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mcp_redis-lock-watchdog", daemon=True)
                self._thread.start()
            elif hold.next_renewal < self._wake_at:
                self._cond.notify()

    def discard(self, hold: _Hold) -> None:
        with self._cond:
            self._holds.pop(id(hold), None)

    def clear(self) -> None:
        with self._cond:
            self._holds.clear()

    def __len__(self) -> int:
        with self._cond:
            return len(self._holds)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._pid != _pid:
                    return
                now = time.monotonic()
                due = [h for h in self._holds.values() if h.next_renewal <= now]
                if not due:
                    nxt = min((h.next_renewal for h in self._holds.values()), default=now + self._idle_wait)
                    self._wake_at = nxt
                    self._cond.wait(None if nxt == float("inf") else nxt - now)
                    self._wake_at = 0.0  # awake: it looks at every hold again before sleeping
                    continue
                self._wake_at = 0.0
            for hold in due:
                try:
                    self._renew(hold)
                except Exception:  # never let the one renewer die
                    log.exception("lock: watchdog renewal crashed")
                    hold.next_renewal = time.monotonic() + min(hold.lease / 10, 0.5)

    def _renew(self, hold: _Hold) -> None:
        started = time.monotonic()
        try:
            ok = hold.backend.extend(hold, hold.lease, True)
        except Exception as exc:
            if isinstance(exc, ConfigurationError) and not hold.misconfiguration_logged:
                hold.misconfiguration_logged = True
                log.error("lock: lease renewal refused, retrying until the lease ends: %s", exc)
            if time.monotonic() < hold.expires_at:
                # Keep trying until the lease would have ended anyway.
                METRICS.inc("lock_renew_total", outcome="error")
                hold.next_renewal = time.monotonic() + min(hold.lease / 10, 0.5)
                log.debug("lock: renewal failed, retrying: %s", type(exc).__name__)
                return
            ok = False
        if ok:
            METRICS.inc("lock_renew_total", outcome="renewed")
            hold.next_renewal = started + hold.lease / 3
            return
        self.discard(hold)
        if not hold.released:
            hold.mark_lost()
            METRICS.inc("lock_lost_total", backend=hold.backend.name)
            log.warning("lock: lease lost (expired or taken over) while held; release will raise LockNotOwned")


_WATCHDOG = _Watchdog()


# -- the per-thread reentrancy registry --------------------------------------------
class _ThreadHolds(threading.local):
    def __init__(self) -> None:
        self.holds: Dict[str, _Hold] = {}


_THREAD_HOLDS = _ThreadHolds()


@on_fork
def _forget_in_child() -> None:
    """A forked child holds nothing: it must never renew or release its parent's locks."""
    global _WATCHDOG, _pid, _event_lock, _turns_lock, _turns, _open_fds_lock
    _pid = os.getpid()
    # The parent's lock files: closing our copies leaves its flocks to it alone
    # (another thread may have held the registry's lock at the fork: no lock here).
    for fd in list(_open_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _open_fds.clear()
    _open_fds_lock = threading.Lock()
    _event_lock = threading.Lock()
    _turns_lock, _turns = threading.Lock(), {}
    _WATCHDOG = _Watchdog()


@on_reset
def _forget_on_reset() -> None:
    global _generation
    _generation += 1
    _WATCHDOG.clear()


# -- the lock objects ---------------------------------------------------------------
def _check_seconds(value: object, argument: str, *, allow_none: bool, allow_zero: bool) -> Optional[float]:
    if value is None and not allow_none:
        raise InvalidArgumentType(argument, "must be a number, not None")
    return optional_seconds(value, argument, allow_zero=allow_zero)


def _not_owned(message: str) -> LockNotOwned:
    return LockNotOwned(message)  # type: ignore[no-untyped-call,unused-ignore]


def _timed_out(message: str) -> LockTimeout:
    return LockTimeout(message)  # type: ignore[no-untyped-call,unused-ignore]


def _in_event_loop(name: str) -> BlockingCallInEventLoop:
    return BlockingCallInEventLoop(
        f"lock {_shown(name)}: blocking lock call from a thread running an asyncio event loop "
        "(coroutines share the thread, so the lock could not tell them apart, and a wait would "
        "freeze the loop); use the async alternative `mcp_redis.compat.StateLockManager.acquire_agent_lock_async` "
        "(`async with`), or run the blocking call in a worker thread with `asyncio.to_thread`"
    )


def _shown(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


class _Local(threading.local):
    hold: Optional[_Hold] = None
    fence: Optional[int] = None
    last: Optional[_Hold] = None


class _Shared:
    hold: Optional[_Hold] = None
    fence: Optional[int] = None
    last: Optional[_Hold] = None


class DistributedLock:
    """A lock shared by every process and host using the same backend.

    Mirrors redis-py's ``redis.lock.Lock`` (same methods, same meaning), with
    a lease always (`timeout`, default ``REDIS_LOCK_TIMEOUT``), a fencing
    token, signalled waits and optional background renewal (`auto_renew`).
    One object may be shared by threads: each thread holds it separately.
    """

    _namespace = "lock"

    def __init__(
        self,
        name: str,
        timeout: Optional[float] = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: Optional[float] = None,
        thread_local: bool = True,
        raise_on_release_error: bool = True,
        *,
        auto_renew: bool = False,
        reentrant: bool = False,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        client: Optional[Client] = None,
        _argument: str = "name",
    ) -> None:
        self.name = validate_id(name, _argument)
        if client is not None and not isinstance(client, Client):
            raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
        # None: the default client, resolved at each call (follows configure()).
        self.client = client
        if isinstance(min_replicas, bool) or not isinstance(min_replicas, int):
            raise InvalidArgumentType("min_replicas", f"must be an int, not {type(min_replicas).__name__}")
        if not 0 <= min_replicas <= 64:
            raise InvalidArgument("min_replicas", f"must be between 0 and 64, got {min_replicas!r}")
        self.min_replicas = min_replicas
        self.replica_timeout = check_seconds(replica_timeout, "replica_timeout", maximum=60.0)
        self.timeout = _check_seconds(timeout, "timeout", allow_none=True, allow_zero=False)
        self.sleep = check_seconds(sleep, "sleep", allow_zero=True)  # redis-py compatibility; waits are signalled
        self.blocking = bool(blocking)
        self.blocking_timeout = _check_seconds(blocking_timeout, "blocking_timeout", allow_none=True, allow_zero=True)
        self.thread_local = bool(thread_local)
        self.raise_on_release_error = raise_on_release_error
        self.auto_renew = bool(auto_renew)
        self.reentrant = bool(reentrant)
        self._state: Union[_Local, _Shared] = _Local() if thread_local else _Shared()
        self._keys: Optional[_Keys] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_shown(self.name)}, timeout={self.timeout}, blocking_timeout={self.blocking_timeout})"

    # -- keys and holds ----------------------------------------------------------
    def _ids(self) -> Tuple[str, ...]:
        return (self.name,)

    def _client(self) -> Client:
        """The client in force: this lock's, else the default client now."""
        return resolve(self.client)

    def _resolve_keys(self, client: Optional[Client] = None) -> _Keys:
        prefix = (client or resolve(self.client)).settings.key_prefix
        keys = self._keys
        if keys is None or keys.prefix != prefix:
            keys = self._keys = _keys_for(prefix, self._namespace, self._ids())
        return keys

    @property
    def key(self) -> str:
        """The lock's key under the current prefix (also names its file / advisory lock)."""
        return self._resolve_keys().lock

    def _hold(self) -> Optional[_Hold]:
        """This thread's live hold (reentrant locks: whichever object took it)."""
        if self.reentrant:
            hold = _THREAD_HOLDS.holds.get(self._resolve_keys().lock)
        else:
            hold = self._state.hold
        if hold is None or hold.pid != _pid or hold.released:
            return None
        return hold

    # -- redis-py's Lock interface ---------------------------------------------------
    def acquire(
        self,
        blocking: Optional[bool] = None,
        blocking_timeout: Optional[float] = None,
        token: Optional[Union[str, bytes]] = None,
    ) -> bool:
        """Take the lock; False when not acquired in time (``blocking=False``: one try).

        `blocking_timeout` (seconds, float) defaults to the object's; None waits
        forever. A thread already holding a reentrant lock enters at once,
        unless that hold was lost (`LockNotOwned`). `token` is a dedupe id
        stored with the hold, not an identity: a second acquire passing a
        token another holder holds waits or fails like any other. Refused in
        a thread running an asyncio event loop (`BlockingCallInEventLoop`).
        """
        if _get_running_loop() is not None:
            raise _in_event_loop(self.name)
        client = resolve(self.client)
        keys = self._resolve_keys(client)
        if self.reentrant:
            held = _THREAD_HOLDS.holds.get(keys.lock)
            if held is not None and held.pid == _pid and held.generation == _generation and not held.released:
                if held.is_lost:
                    raise _not_owned(
                        f"cannot enter lock {_shown(self.name)}: this thread's hold was lost "
                        "(its lease expired or was taken over)"
                    )
                held.count += 1
                self._state.last = held
                self._state.fence = held.fence
                METRICS.inc("lock_acquire_total", backend=held.backend.name, outcome="reentered")
                return True
        if blocking is None:
            blocking = self.blocking
        wait = _check_seconds(blocking_timeout, "blocking_timeout", allow_none=True, allow_zero=True)
        if wait is None:
            wait = self.blocking_timeout
        if not blocking:
            wait = 0.0
        # The holder's value: a fresh nonce per call, after the caller's token if given.
        value = os.urandom(_NONCE_HEX // 2).hex()
        if token is not None:
            if isinstance(token, bytes):
                token = token.decode("utf-8", "surrogatepass")
            elif not isinstance(token, str):
                raise InvalidArgumentType("token", f"must be str or bytes, not {type(token).__name__}")
            value = f"{token}:{value}"
        lease = self.timeout if self.timeout is not None else client.settings.lock_timeout
        started = time.monotonic()
        deadline = None if wait is None else started + wait
        hold = self._acquire_with_fallback(client, keys, value, lease, deadline)
        if hold is None:
            METRICS.inc("lock_acquire_total", backend=_primary(client.settings).name, outcome="timeout")
            return False
        if self.min_replicas and isinstance(hold.backend, _RedisBackend):
            self._require_replicas(hold)
        METRICS.inc("lock_acquire_total", backend=hold.backend.name, outcome="acquired")
        waited = time.monotonic() - started
        if waited > 0.001:  # contended: worth a histogram entry
            METRICS.observe("lock_wait_seconds", waited, backend=hold.backend.name)
        self._state.last = hold
        self._state.fence = hold.fence
        if self.reentrant:
            _THREAD_HOLDS.holds[keys.lock] = hold
        else:
            self._state.hold = hold
        if self.auto_renew and hold.backend.leased:
            _WATCHDOG.add(hold)
        return True

    def _require_replicas(self, hold: _Hold) -> None:
        """Opt-in durability: the grant must reach `min_replicas` replicas, or it is undone."""
        try:
            acked = _REDIS.replicate(hold, self.min_replicas, self.replica_timeout)
        except BaseException:
            self._undo(hold)
            raise
        if acked >= self.min_replicas:
            return
        self._undo(hold)
        METRICS.inc("lock_unreplicated_total")
        raise LockNotReplicated(_shown(self.name), max(acked, 0), self.min_replicas)

    @staticmethod
    def _undo(hold: _Hold) -> None:
        try:
            hold.backend.release(hold)
        except Exception:  # its lease runs out anyway
            log.debug("lock: could not release an unreplicated grant", exc_info=True)

    def _acquire_with_fallback(self, client: Client, keys: _Keys, token: str, lease: float,
                               deadline: Optional[float]) -> Optional[_Hold]:
        s = client.settings
        backend = _primary(s)
        try:
            return backend.acquire(client, keys, token, lease, deadline)
        except BackendUnavailable:
            fallback = _fallback(s) if isinstance(backend, _RedisBackend) else None
            if fallback is _POSTGRES and not s.database_url:
                log.error("lock: lock_fallback is 'postgres' but DATABASE_URL is not set; failing closed")
                fallback = None
            if fallback is None:
                METRICS.inc("lock_backend_unavailable_total", backend=backend.name)
                raise
        METRICS.inc("lock_fallback_total", to=fallback.name)
        if fallback is _LOCAL:
            METRICS.inc("lock_unsafe_total", backend="local")
            log.warning("lock: redis unavailable, using a host-local file lock (NOT exclusive across hosts)")
        else:
            log.warning("lock: redis unavailable, using a postgres advisory lock")
            return _POSTGRES.acquire_fallback(client, keys, token, lease, deadline)
        return fallback.acquire(client, keys, token, lease, deadline)

    def release(self) -> None:
        """Give the lock back (the outermost release of a reentrant hold).

        Raises `LockNotOwned` when this thread does not hold it, or when its
        lease was lost meanwhile; a new holder's lock is never touched.
        """
        hold = self._hold()
        if hold is None:
            raise _not_owned(f"cannot release lock {_shown(self.name)}: not held by this thread")
        if hold.count > 1:
            hold.count -= 1
            return
        hold.released = True
        self._state.hold = None
        _WATCHDOG.discard(hold)
        if self.reentrant and _THREAD_HOLDS.holds.get(hold.keys.lock) is hold:
            del _THREAD_HOLDS.holds[hold.keys.lock]
        owned = hold.backend.release(hold)
        if not owned or hold.is_lost:
            hold.mark_lost()
            METRICS.inc("lock_release_total", backend=hold.backend.name, outcome="not_owned")
            raise _not_owned(
                f"lock {_shown(self.name)} was no longer owned at release: its lease expired or was taken over"
            )

    def extend(self, additional_time: float, replace_ttl: bool = False) -> bool:
        """Add `additional_time` seconds to the lease (``replace_ttl``: set it to that)."""
        seconds = _check_seconds(additional_time, "additional_time", allow_none=False, allow_zero=False)
        assert seconds is not None
        hold = self._hold()
        if hold is None:
            raise _not_owned(f"cannot extend lock {_shown(self.name)}: not held by this thread")
        if not hold.backend.extend(hold, seconds, replace_ttl):
            hold.mark_lost()
            raise _not_owned(f"cannot extend lock {_shown(self.name)}: no longer owned")
        return True

    def reacquire(self) -> bool:
        """Reset the lease to the lock's `timeout`."""
        lease = self.timeout if self.timeout is not None else resolve(self.client).settings.lock_timeout
        return self.extend(lease, replace_ttl=True)

    def locked(self) -> bool:
        """True when anyone holds the lock."""
        client = resolve(self.client)
        primary = _primary(client.settings)
        hold = self._hold()
        if hold is not None and hold.backend is not primary:
            return hold.backend.owned(hold)
        return primary.locked(client, self._resolve_keys(client))

    def owned(self) -> bool:
        """True when this thread holds the lock and its lease is still its own."""
        hold = self._hold()
        return hold is not None and hold.backend.owned(hold)

    # -- beyond redis-py -------------------------------------------------------------
    @property
    def fencing_token(self) -> Optional[int]:
        """This thread's fencing token: strictly increasing per lock name (None before any acquire)."""
        return self._state.fence

    @property
    def lost(self) -> bool:
        """True when this thread's (current or last) hold lost its lease."""
        last = self._state.last
        return last is not None and last.is_lost

    @property
    def lost_event(self) -> threading.Event:
        """An Event set when this thread's current hold loses its lease (wait on it)."""
        last = self._state.last
        return last.lost_event() if last is not None else threading.Event()

    @property
    def backend(self) -> Optional[str]:
        """Which backend holds this thread's current hold: redis/postgres/local/off."""
        hold = self._hold()
        return hold.backend.name if hold is not None else None

    def __enter__(self) -> DistributedLock:
        if self.acquire():
            return self
        raise _timed_out(f"lock {_shown(self.name)}: not acquired within {self.blocking_timeout}s")

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        try:
            self.release()
        except LockNotOwned:
            if self.raise_on_release_error and exc_type is None:
                raise
            log.warning("lock %s was no longer owned when leaving its block", _shown(self.name))


class AgentLock(DistributedLock):
    """The lock of one agent's state: auto-renewing and reentrant per thread."""

    _namespace = "agent-lock"

    def __init__(
        self,
        agent_id: str,
        timeout: Optional[float] = None,
        blocking_timeout: Optional[float] = AGENT_LOCK_BLOCKING_TIMEOUT,
        *,
        min_replicas: int = 0,
        replica_timeout: float = 0.1,
        client: Optional[Client] = None,
    ) -> None:
        super().__init__(
            agent_id,
            timeout=timeout,
            blocking_timeout=blocking_timeout,
            auto_renew=True,
            reentrant=True,
            min_replicas=min_replicas,
            replica_timeout=replica_timeout,
            client=client,
            _argument="agent_id",
        )

    @property
    def agent_id(self) -> str:
        return self.name


def agent_lock(
    agent_id: str,
    timeout: Optional[float] = None,
    blocking_timeout: Optional[float] = AGENT_LOCK_BLOCKING_TIMEOUT,
    *,
    min_replicas: int = 0,
    replica_timeout: float = 0.1,
    client: Optional[Client] = None,
) -> AgentLock:
    """The lock of `agent_id`'s state, as a context manager.

    `timeout`: lease in seconds (default ``REDIS_LOCK_TIMEOUT``), renewed in
    the background while held; `blocking_timeout`: longest wait (default 5 s,
    ``0`` tries once, None waits forever), then `LockTimeout`. `min_replicas`:
    see `lock`. `client`: a `mcp_redis.Client` (default: the default client,
    resolved at each call).
    """
    return AgentLock(agent_id, timeout=timeout, blocking_timeout=blocking_timeout,
                     min_replicas=min_replicas, replica_timeout=replica_timeout, client=client)


def lock(
    name: str,
    timeout: Optional[float] = None,
    blocking_timeout: Optional[float] = None,
    *,
    blocking: bool = True,
    thread_local: bool = True,
    auto_renew: bool = False,
    raise_on_release_error: bool = True,
    sleep: float = 0.1,
    min_replicas: int = 0,
    replica_timeout: float = 0.1,
    client: Optional[Client] = None,
) -> DistributedLock:
    """A lock named `name` with redis-py's Lock methods (not renewed unless `auto_renew`).

    `sleep` is accepted for redis-py compatibility and ignored: waiters are woken.
    `min_replicas` > 0: each grant must be confirmed by that many replicas
    within `replica_timeout` seconds (``WAIT``), else it is released and
    `LockNotReplicated` raised — narrows, not closes, the failover window.
    """
    return DistributedLock(
        name,
        timeout=timeout,
        sleep=sleep,
        blocking=blocking,
        blocking_timeout=blocking_timeout,
        thread_local=thread_local,
        raise_on_release_error=raise_on_release_error,
        auto_renew=auto_renew,
        min_replicas=min_replicas,
        replica_timeout=replica_timeout,
        client=client,
    )


def held_locks() -> List[str]:
    """Keys of the reentrant locks this thread holds (diagnostics)."""
    pid = _pid
    return [k for k, h in _THREAD_HOLDS.holds.items() if h.pid == pid and not h.released]
