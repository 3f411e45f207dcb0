"""Session → agent bindings shared by every process: Redis in front of PostgreSQL.

`SessionStore` replaces the legacy process-local ``_session_identities`` dict
(and its ``_uuid_prefix_index``). Where a binding lives depends on
``client.mode("sessions")`` (the store's client, else the default one), read on every call:

* ``redis`` with ``DATABASE_URL``: write-through. PostgreSQL ``core.sessions``
  is the source of truth (written first); Redis is the fast path. A Redis miss
  reads PostgreSQL and repopulates Redis with the remaining TTL (read repair).
  While Redis is down, calls go to PostgreSQL and rows written then are flagged
  ``redis_pending``; a background replayer (and `replay_pending`) writes them
  back to Redis when it returns.
* ``redis`` alone: Redis only. Nothing already in Redis is lost by an outage,
  but `bind` raises `BackendUnavailable` until Redis is back. A binding never
  lives in a process-local dict in this mode.
* ``postgres``: PostgreSQL only. ``local``: an in-process `TTLStore` (the
  single-host legacy behaviour). ``off``: every call raises `FeatureDisabled`.

Redis layout (prefix ``mcp:``): the binding ``mcp:session:<sid>`` (the agent id,
PX ttl); the agent's index ``mcp:session_agent:<aid>`` (ZSET of session keys
scored by horizon ms); the prefix index ``mcp:session_agents:{index}`` (ZSET,
lexicographic) and its horizons ``mcp:session_agents:{index}#expiry``. On a
single instance one Lua script writes them all; on Cluster they are separate
single-slot commands.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, List, MutableMapping, Optional, Sequence, Tuple

from ..client import Client, resolve
from ..config import Mode
from ..connections import RedisConnection
from ..errors import (
    AmbiguousPrefix,
    BackendUnavailable,
    ConfigurationError,
    FeatureDisabled,
    InvalidArgument,
    InvalidArgumentType,
)
from ..keys import MAX_ID_LENGTH, KeySpace, decode_id, encode_id, validate_id
from ..local import TTLStore
from ..metrics import METRICS
from ..postgres import Postgres
from ..validation import MAX_SECONDS, optional_seconds, seconds

__all__ = ["SessionStore", "SessionMap", "cleanup_expired", "replay_pending"]

log = logging.getLogger("mcp_redis.sessions")

MAX_REFRESH_INTERVAL = 300.0  # seconds: PostgreSQL expiry refreshed at most this often on touch
MAX_CANDIDATES = 10
_OFF = "sessions: backend is 'off' (MCP_REDIS_SESSIONS_BACKEND)"
MAX_TTL = MAX_SECONDS  # ten years; beyond this a "session" is a configuration mistake
_REPLAY_BATCH = 500
_REPLAY_POLL = 0.2  # seconds between replay attempts while Redis is still down


# -- arguments -------------------------------------------------------------------
def _ttl_ms(ttl: object, default: float) -> int:
    """`ttl` in seconds (None: `default`) as whole milliseconds, validated."""
    return max(1, int(round(seconds(default if ttl is None else ttl, "ttl") * 1000)))


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _from_utf8(raw: Any) -> str:
    return bytes(raw).decode("utf-8", "surrogatepass")


# -- PostgreSQL tier -----------------------------------------------------------------
# session_key holds keys.encode_id(session key) (readable for plain ids); agent_id
# holds the UTF-8 bytes (surrogatepass) so NUL and lone surrogates survive and a
# prefix is a bytea range. redis_pending: written while Redis was unreachable.
_PG_BIND = """
INSERT INTO core.sessions (session_key, agent_id, expires_at, redis_pending)
VALUES (%s, %s, now() + %s * interval '1 millisecond', %s)
ON CONFLICT (session_key) DO UPDATE SET
    agent_id = EXCLUDED.agent_id, expires_at = EXCLUDED.expires_at,
    redis_pending = EXCLUDED.redis_pending, updated_at = now()
"""
_PG_GET = """
SELECT agent_id, ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint
FROM core.sessions WHERE session_key = %s AND expires_at > now()
"""
_PG_TOUCH = """
UPDATE core.sessions SET expires_at = now() + %s * interval '1 millisecond',
    updated_at = now(), redis_pending = redis_pending OR %s
WHERE session_key = %s AND expires_at > now()
RETURNING agent_id
"""
# No "expires_at > now()": the caller just read the binding live from Redis, so a row
# that expired in PostgreSQL meanwhile (its refresh missed while PostgreSQL was down)
# catches up; a row unbound or rebound meanwhile no longer names the agent.
_PG_TOUCH_AGENT = """
UPDATE core.sessions SET expires_at = now() + %s * interval '1 millisecond', updated_at = now()
WHERE session_key = %s AND agent_id = %s
RETURNING true
"""
_PG_FLAG_PENDING = "UPDATE core.sessions SET redis_pending = true WHERE session_key = %s"
_PG_DELETE = "DELETE FROM core.sessions WHERE session_key = %s RETURNING expires_at > now()"
# A tombstone: an already-expired row flagged for replay, so Redis forgets the key.
_PG_TOMBSTONE = """
INSERT INTO core.sessions (session_key, agent_id, expires_at, redis_pending)
VALUES (%s, ''::bytea, now(), true)
ON CONFLICT (session_key) DO UPDATE SET
    agent_id = ''::bytea, expires_at = now(), redis_pending = true, updated_at = now()
"""
_PG_FOR_AGENT = """
SELECT session_key FROM core.sessions
WHERE agent_id = %s AND expires_at > now() ORDER BY session_key LIMIT %s
"""
_PG_PREFIX = """
SELECT DISTINCT agent_id FROM core.sessions
WHERE agent_id >= %s AND agent_id < %s AND expires_at > now() ORDER BY agent_id LIMIT %s
"""
_PG_ALL = "SELECT session_key FROM core.sessions WHERE expires_at > now() ORDER BY session_key"
_PG_PENDING = """
SELECT session_key, agent_id, ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint
FROM core.sessions WHERE redis_pending ORDER BY session_key LIMIT %s FOR UPDATE SKIP LOCKED
"""
_PG_CLEAR_PENDING = "UPDATE core.sessions SET redis_pending = false WHERE session_key = ANY(%s) AND expires_at > now()"
_PG_DROP_REPLAYED = "DELETE FROM core.sessions WHERE session_key = ANY(%s) AND expires_at <= now()"
_PG_CLEANUP = """
DELETE FROM core.sessions WHERE session_key IN (
    SELECT session_key FROM core.sessions
    WHERE expires_at <= now() AND NOT redis_pending LIMIT %s FOR UPDATE SKIP LOCKED)
"""


class _PostgresTier:
    """The bindings in ``core.sessions``; every statement parameterised."""

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg

    def bind(self, session_key: str, agent_id: str, ttl_ms: int) -> None:
        self.pg.execute(_PG_BIND, (encode_id(session_key), _utf8(agent_id), ttl_ms, False))

    def get(self, session_key: str) -> Optional[Tuple[str, int]]:
        row = self.pg.execute(_PG_GET, (encode_id(session_key),), fetch="one")
        return None if row is None else (_from_utf8(row[0]), int(row[1]))

    def touch(self, session_key: str, ttl_ms: int, pending: bool = False) -> Optional[str]:
        row = self.pg.execute(_PG_TOUCH, (ttl_ms, pending, encode_id(session_key)), fetch="one")
        return None if row is None else _from_utf8(row[0])

    def extend(self, session_key: str, agent_id: str, ttl_ms: int, redis_left: Callable[[], Optional[int]]) -> None:
        """Slide the row's expiry to `ttl_ms` from now if it still binds `agent_id`,
        never past what the Redis binding has left (`redis_left`: ms, None: no expiry).

        Redis is asked with the row locked, so a shorter touch that committed
        meanwhile (PostgreSQL, then Redis, under this lock) is seen and this late
        refresh cannot lengthen PostgreSQL past it. If Redis cannot be asked the
        refresh is rolled back: PostgreSQL keeps its earlier expiry (errs early).
        """
        key, agent = encode_id(session_key), _utf8(agent_id)

        def run() -> None:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PG_TOUCH_AGENT, (ttl_ms, key, agent))
                if cur.fetchone() is None:
                    return
                try:
                    left = redis_left()
                except BackendUnavailable:
                    conn.rollback()
                    return
                if left is not None and left < ttl_ms:
                    cur.execute(_PG_TOUCH_AGENT, (max(left, 0), key, agent))

        self.pg.ensure_schema()
        self.pg.policy.call(run)

    def shorten_through(self, session_key: str, agent_id: str, ttl_ms: int,
                        redis_write: Callable[[], bool]) -> bool:
        """Set the row's expiry to `ttl_ms` from now, then (row still locked) Redis's.

        PostgreSQL first: read repair can then never serve the binding past the
        shorter expiry, whatever Redis does. A Redis failure flags the row for
        replay (which writes its remaining TTL). Returns what `redis_write`
        returned (False: the binding no longer names `agent_id`).
        """
        key = encode_id(session_key)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PG_TOUCH_AGENT, (ttl_ms, key, _utf8(agent_id)))
                had_row = cur.fetchone() is not None
                try:
                    return redis_write()
                except BackendUnavailable:
                    if not had_row:
                        raise
                    cur.execute(_PG_FLAG_PENDING, (key,))
                    return True

        self.pg.ensure_schema()
        return bool(self.pg.policy.call(run))

    def unbind(self, session_key: str) -> bool:
        row = self.pg.execute(_PG_DELETE, (encode_id(session_key),), fetch="one")
        return bool(row and row[0])

    def bind_through(self, session_key: str, agent_id: str, ttl_ms: int,
                     redis_write: Optional[Callable[[], None]]) -> bool:
        """Upsert the row and, while its lock is held, write Redis; False if Redis failed.

        Writers of one session serialise on the row lock and each writes Redis
        before committing, so Redis ends with the value PostgreSQL ends with. A
        Redis failure (or `redis_write` None: known down) flags the row for
        replay in the same transaction.
        """
        key = encode_id(session_key)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PG_BIND, (key, _utf8(agent_id), ttl_ms, redis_write is None))
                if redis_write is None:
                    return False
                try:
                    redis_write()
                    return True
                except BackendUnavailable:
                    cur.execute(_PG_FLAG_PENDING, (key,))
                    return False

        self.pg.ensure_schema()
        return bool(self.pg.policy.call(run))

    def unbind_through(self, session_key: str, redis_unbind: Optional[Callable[[], bool]]) -> Tuple[bool, bool]:
        """Delete the row and, in the same transaction, the Redis binding.

        When Redis fails (or `redis_unbind` is None: known down) a tombstone row
        remembers that Redis must forget the binding once it is reachable.
        Returns (a live binding existed, Redis was updated).
        """
        key = encode_id(session_key)

        def run() -> Tuple[bool, bool]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PG_DELETE, (key,))
                row = cur.fetchone()
                existed = bool(row and row[0])
                if redis_unbind is not None:
                    try:
                        return (redis_unbind() or existed), True
                    except BackendUnavailable:
                        pass
                cur.execute(_PG_TOMBSTONE, (key,))
                return existed, False

        self.pg.ensure_schema()
        result: Tuple[bool, bool] = self.pg.policy.call(run)
        return result

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        rows = self.pg.execute(_PG_FOR_AGENT, (_utf8(agent_id), limit), fetch="all")
        return [decode_id(r[0]) for r in rows]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        low = _utf8(prefix)
        rows = self.pg.execute(_PG_PREFIX, (low, low + b"\xff", limit), fetch="all")
        return [_from_utf8(r[0]) for r in rows]

    def session_keys(self) -> List[str]:
        return [decode_id(r[0]) for r in self.pg.execute(_PG_ALL, (), fetch="all")]

    def repair(self, session_key: str, write: Callable[[str, int], None],
               extend_ms: Optional[int] = None) -> Optional[str]:
        """Read an unexpired row (extending it by `extend_ms` if given) and pass
        (agent_id, ttl ms) to `write` while the row is locked.

        The lock orders the Redis write before any concurrent bind/unbind of the
        same session (they change the row first), so a repair never resurrects
        or overwrites a newer binding. A Redis failure inside `write` is
        swallowed: the answer stands and a later read repairs again.
        """
        key = encode_id(session_key)

        def run() -> Optional[str]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                if extend_ms is None:
                    cur.execute(_PG_GET + " FOR SHARE", (key,))
                else:
                    cur.execute(_PG_TOUCH, (extend_ms, False, key))
                row = cur.fetchone()
                if row is None:
                    return None
                agent_id = _from_utf8(row[0])
                try:
                    write(agent_id, extend_ms if extend_ms is not None else max(1, int(row[1])))
                except BackendUnavailable:
                    pass
                return agent_id

        self.pg.ensure_schema()
        result: Optional[str] = self.pg.policy.call(run)
        return result

    def replay(self, write_batch: Callable[[List[Tuple[str, Optional[str], int]]], None], batch: int) -> int:
        """Hand one batch of pending rows to `write_batch` (under row locks), then clear them.

        Rows are (session_key, agent_id or None for "forget it", ttl ms). Returns
        the number of rows replayed (0: nothing pending).
        """

        def run() -> int:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PG_PENDING, (batch,))
                rows = cur.fetchall()
                if not rows:
                    return 0
                items: List[Tuple[str, Optional[str], int]] = []
                for key, agent, ms in rows:
                    live = ms is not None and int(ms) > 0
                    items.append((decode_id(key), _from_utf8(agent) if live else None, int(ms) if live else 0))
                write_batch(items)  # raises BackendUnavailable: rolled back, still pending
                keys = [r[0] for r in rows]
                cur.execute(_PG_CLEAR_PENDING, (keys,))
                cur.execute(_PG_DROP_REPLAYED, (keys,))
                return len(rows)

        self.pg.ensure_schema()
        return int(self.pg.policy.call(run))

    def cleanup_expired(self, batch: int) -> int:
        total = 0
        while True:
            n = int(self.pg.execute(_PG_CLEANUP, (batch,)))
            total += n
            if n < batch:
                return total


# -- Redis tier ---------------------------------------------------------------------------
class _RedisTier:
    """Bindings and their indexes in Redis, through the shared policy."""

    def __init__(self, conn: RedisConnection, ks: KeySpace) -> None:
        self.conn = conn
        self.client = conn.client
        self._policy = conn.policy
        self._get = conn.client.get
        self.ks = ks
        self.cluster = conn.is_cluster
        self.lex = ks.key("session_agents", "index", tag=True)
        self.horizons = ks.key("session_agents", "index", tag=True, suffix="expiry")
        # The hot path joins this head and encode_id() itself: the very string
        # KeySpace.key("session", id) builds, minus its per-call namespace check.
        self._session_head = ks.namespace_pattern("session")[:-1]
        assert self.binding_key("probe") == ks.key("session", "probe")
        register = conn.script
        self._bind = register("session_bind")
        self._index = register("session_index")
        self._agents = register("session_agents")
        self._unindex = register("session_unindex")
        self._members = register("session_members")
        self._resolve = register("session_resolve")
        self._forget = register("session_forget_agent")
        self._touch = register("session_touch")

    def binding_key(self, session_key: str) -> str:
        return self._session_head + encode_id(session_key)

    def index_key(self, agent_id: str) -> str:
        return self.ks.key("session_agent", agent_id)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` under the shared retry/breaker policy."""
        return self.conn.policy.call(fn, *args, **kwargs)

    # reads -------------------------------------------------------------------------
    def get(self, session_key: str, retry: bool) -> Optional[str]:
        """The hot path: one GET; `call` inlined (a Python frame is ~5% of a loopback GET).

        `retry` False: one attempt only — the caller has PostgreSQL to ask
        instead of waiting out retries against a hung Redis.
        """
        key = self._session_head + encode_id(session_key)
        result: Optional[str] = self._policy.call(self._get, key, attempts=None if retry else 1)
        return result

    def getex(self, session_key: str, ttl_ms: int, retry: bool) -> Optional[str]:
        call = self.call if retry else self.once
        result: Optional[str] = call(self.client.getex, self.binding_key(session_key), px=ttl_ms)
        return result

    def touch(self, session_key: str, ttl_ms: int) -> Optional[Tuple[str, bool]]:
        """Write-through sliding expiry (one attempt): extend the binding to `ttl_ms`.

        None: no binding. (agent, True): `ttl_ms` is shorter than what the
        binding has left, so Redis was left alone for `shorten` to apply once
        PostgreSQL holds the shorter expiry.
        """
        reply = self.once(self._touch, keys=[self.binding_key(session_key)], args=[ttl_ms])
        if not reply:
            return None
        return str(reply[0]), bool(int(reply[1]))

    def left_ms(self, session_key: str) -> Optional[int]:
        """What the binding has left in ms (0: gone; None: no expiry), one attempt."""
        left = int(self.once(self.client.pttl, self.binding_key(session_key)))
        return None if left == -1 else max(left, 0)

    def shorten(self, session_key: str, agent_id: str, ttl_ms: int) -> bool:
        """Set the binding's expiry to `ttl_ms` (even if shorter) while it names `agent_id`."""
        reply = self.once(self._touch, keys=[self.binding_key(session_key)], args=[ttl_ms, agent_id])
        return bool(reply)

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        members: List[str] = self.call(self._members, keys=[self.index_key(agent_id)], args=[limit])
        if not members:
            return []
        keys = [self.binding_key(m) for m in members]
        if self.cluster:
            values = self.call(self.client.mget_nonatomic, keys)
        else:
            values = self.call(self.client.mget, keys)
        live = [m for m, v in zip(members, values) if v == agent_id]
        for stale in (m for m, v in zip(members, values) if v != agent_id):
            self._drop_from_index(stale, agent_id)
        return sorted(live)

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        """Agents starting with `prefix` that hold a live binding (verified), at most `limit`.

        The prefix index only knows when an agent's latest binding would expire;
        each candidate is checked against its bindings, and one found without
        any is dropped from the index, then the range is read again.
        """
        raw = _utf8(prefix)
        bounds = [b"[" + raw, b"(" + raw + b"\xff", limit]
        live: List[str] = []
        for _ in range(4):
            found: List[str] = self.call(self._resolve, keys=[self.lex, self.horizons], args=bounds)
            live = [a for a in found if self.sessions_for(a, 64)]
            if len(live) == len(found) or len(found) < limit:
                return live
            for agent in set(found) - set(live):
                self._forget_agent(agent)
        return live

    def _forget_agent(self, agent_id: str) -> None:
        index = self.index_key(agent_id)
        if self.cluster:  # two slots: check, then remove (a concurrent bind may slip in)
            if not self.call(self._members, keys=[index], args=[1]):
                self.call(self.client.zrem, self.lex, agent_id)
                self.call(self.client.zrem, self.horizons, agent_id)
        else:
            self.call(self._forget, keys=[index, self.lex, self.horizons], args=[agent_id])

    def session_keys(self) -> Iterator[str]:
        """Every bound session key: a SCAN, O(all keys) — for the mapping view only."""
        head = len(self._session_head)
        pattern = self.ks.namespace_pattern("session")
        keys = self.call(lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        for key in keys:
            yield decode_id(key[head:])

    # writes -----------------------------------------------------------------------------
    def once(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A single attempt through the breaker: for calls made inside a PostgreSQL
        transaction, which must not hold a row lock through retries (the row is
        flagged for replay instead)."""
        return self.conn.policy.call(fn, *args, attempts=1, **kwargs)

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, grace_ms: int, *, retry: bool = True) -> None:
        """SET the binding (atomic, PX ttl) and index it; unindex it from a previous agent."""
        call = self.call if retry else self.once
        binding = self.binding_key(session_key)
        index = self.index_key(agent_id)
        if self.cluster:
            old = call(self.client.set, binding, agent_id, px=ttl_ms, get=True)
            call(self._index, keys=[index], args=[session_key, ttl_ms, grace_ms])
            call(self._agents, keys=[self.lex, self.horizons], args=[agent_id, ttl_ms, grace_ms])
        else:
            old = call(
                self._bind,
                keys=[binding, index, self.lex, self.horizons],
                args=[agent_id, session_key, ttl_ms, grace_ms, "bind"],
            )
        if old is not None and old != agent_id:
            self._drop_from_index(session_key, old)

    def refresh_index(self, session_key: str, agent_id: str, ttl_ms: int, grace_ms: int) -> None:
        """Re-score the indexes after a sliding-expiry touch (only if still bound to `agent_id`)."""
        if self.cluster:
            self.call(self._index, keys=[self.index_key(agent_id)], args=[session_key, ttl_ms, grace_ms])
            self.call(self._agents, keys=[self.lex, self.horizons], args=[agent_id, ttl_ms, grace_ms])
        else:
            self.call(
                self._bind,
                keys=[self.binding_key(session_key), self.index_key(agent_id), self.lex, self.horizons],
                args=[agent_id, session_key, ttl_ms, grace_ms, "refresh"],
            )

    def unbind(self, session_key: str, *, retry: bool = True) -> bool:
        call = self.call if retry else self.once
        old: Optional[str] = call(self.client.getdel, self.binding_key(session_key))
        if old is not None:
            self._drop_from_index(session_key, old)
        return old is not None

    def _drop_from_index(self, session_key: str, agent_id: str) -> None:
        binding = self.binding_key(session_key)
        index = self.index_key(agent_id)
        if self.cluster:  # two slots: check, then remove (a concurrent rebind may slip in)
            if self.call(self.client.get, binding) != agent_id:
                self.call(self.client.zrem, index, session_key)
        else:
            self.call(self._unindex, keys=[binding, index], args=[agent_id, session_key])

    def write_batch(self, items: Sequence[Tuple[str, Optional[str], int]], grace_ms: int) -> None:
        """Replay rows from PostgreSQL: bind the live ones, forget the dead ones."""
        if self.cluster:
            for session_key, agent_id, ttl_ms in items:
                if agent_id is None:
                    self.unbind(session_key)
                else:
                    self.bind(session_key, agent_id, ttl_ms, grace_ms)
            return

        def run() -> List[Any]:
            pipe = self.client.pipeline(transaction=False)
            for session_key, agent_id, ttl_ms in items:
                binding = self.binding_key(session_key)
                if agent_id is None:
                    pipe.getdel(binding)
                else:
                    self._bind(
                        keys=[binding, self.index_key(agent_id), self.lex, self.horizons],
                        args=[agent_id, session_key, ttl_ms, grace_ms, "bind"],
                        client=pipe,
                    )
            return list(pipe.execute())

        olds = self.call(run)
        for (session_key, agent_id, _), old in zip(items, olds):
            if old is not None and old != agent_id:
                self._drop_from_index(session_key, old)


# -- local tier ---------------------------------------------------------------------------------
class _LocalTier:
    """In-process bindings: the single-host legacy behaviour (``local`` mode)."""

    def __init__(self) -> None:
        self.store: TTLStore[str] = TTLStore()

    def bind(self, session_key: str, agent_id: str, ttl_ms: int) -> None:
        self.store.set(session_key, agent_id, ttl_ms / 1000.0)

    def get(self, session_key: str) -> Optional[str]:
        return self.store.get(session_key)

    def touch(self, session_key: str, ttl_ms: int) -> Optional[str]:
        def extend(old: Optional[str]) -> Tuple[str, float]:
            if old is None:
                return "", 0.0  # stays absent: an entry that is already expired
            return old, ttl_ms / 1000.0

        agent = self.store.update(session_key, extend)  # atomic: no unbind slips in between
        return agent or None

    def unbind(self, session_key: str) -> bool:
        return self.store.pop(session_key) is not None

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        return sorted(k for k, v in self.store.items() if v == agent_id)[:limit]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        return sorted({v for _, v in self.store.items() if v.startswith(prefix)})[:limit]

    def session_keys(self) -> List[str]:
        return self.store.keys()


# -- the tiers in force, per process ------------------------------------------------------------
class _Tiers:
    """What one `Settings` means for sessions: the tiers, and the outage replayer."""

    def __init__(self, client: Client) -> None:
        s = client.settings
        self.settings = s
        self.mode = s.mode("sessions")
        self.default_ttl = float(s.session_ttl)
        self.redis: Optional[_RedisTier] = None
        self.pg: Optional[_PostgresTier] = None
        self.local: Optional[_LocalTier] = None
        if self.mode is Mode.REDIS:
            self.redis = _RedisTier(client.redis("sessions"), KeySpace(s.key_prefix))
            if s.database_url:
                self.pg = _PostgresTier(client.postgres())
        elif self.mode is Mode.POSTGRES:
            self.pg = _PostgresTier(client.postgres())
        elif self.mode is Mode.LOCAL:
            self.local = _LocalTier()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._generation = 0
        self._replayer: Optional[threading.Thread] = None
        self._refreshed: OrderedDict[Tuple[str, str], float] = OrderedDict()

    # the touch throttle: a hint of when this process last refreshed PG/indexes ----------------
    def refresh_due(self, session_key: str, agent_id: str, interval: float) -> bool:
        now = time.monotonic()
        key = (session_key, agent_id)
        with self._lock:
            last = self._refreshed.get(key)
            if last is not None and now - last < interval:
                return False
            self._refreshed[key] = now
            self._refreshed.move_to_end(key)
            while len(self._refreshed) > 65_536:
                self._refreshed.popitem(last=False)
            return True

    def refresh_missed(self, session_key: str, agent_id: str) -> None:
        """PostgreSQL's expiry was not refreshed: let the next touch try again."""
        with self._lock:
            self._refreshed.pop((session_key, agent_id), None)

    # the outage replayer --------------------------------------------------------------------
    def note_outage(self) -> None:
        """Rows were flagged pending: make sure this process replays them when Redis returns."""
        with self._lock:
            self._generation += 1
            if self._replayer is not None and self._replayer.is_alive():
                return
            self._replayer = threading.Thread(target=self._replay_loop, name="mcp_redis-session-replay", daemon=True)
            self._replayer.start()

    @property
    def replaying(self) -> bool:
        """True while this process has rows to write back to Redis."""
        thread = self._replayer
        return thread is not None and thread.is_alive()

    def _replay_loop(self) -> None:
        assert self.redis is not None and self.pg is not None
        redis = self.redis
        pause = _REPLAY_POLL
        refused = False
        while not self._stop.is_set():
            with self._lock:
                generation = self._generation
            try:
                redis.call(redis.client.ping)  # cheap gate: no PostgreSQL work while Redis is down
                self.replay_pending()
            except BackendUnavailable:
                self._stop.wait(pause)
                pause = min(pause * 1.5, 2.0)
                continue
            except ConfigurationError as exc:  # only the operator can fix it: one line, not a loop
                if not refused:
                    log.error("session replay refused: %s (retrying every %gs)", exc, _REPLAY_POLL * 5)
                    refused = True
                self._stop.wait(_REPLAY_POLL * 5)
                continue
            except Exception:  # never let the thread die silently with rows pending
                log.exception("session replay failed; retrying")
                self._stop.wait(_REPLAY_POLL * 5)
                continue
            with self._lock:
                if generation == self._generation:
                    self._replayer = None
                    return

    def replay_pending(self) -> int:
        """Write every pending row back to Redis; returns how many were replayed."""
        redis, pg = self.redis, self.pg
        if redis is None or pg is None:
            return 0
        grace = _grace_ms(None, self.default_ttl)
        total = 0
        while True:
            n = pg.replay(lambda items: redis.write_batch(items, grace), _REPLAY_BATCH)
            total += n
            if n:
                METRICS.inc("session_replayed_total", n)
            if n < _REPLAY_BATCH:
                if total:
                    log.info("replayed %d session binding(s) to redis", total)
                return total

    def close(self) -> None:
        self._stop.set()


_TIERS = "sessions.tiers"


def _current(client: Optional[Client] = None) -> _Tiers:
    """The client's tiers (one per client: `Client.singleton`; closed with it)."""
    c = resolve(client)
    return c.singleton(_TIERS, lambda: _Tiers(c))


def _grace_ms(refresh_interval: Optional[float], ttl_s: float) -> int:
    return int(_refresh_interval(refresh_interval, ttl_s) * 1000)


def _refresh_interval(configured: Optional[float], ttl_s: float) -> float:
    """How often a touch rewrites PostgreSQL and the indexes: never less often than once per ttl."""
    if configured is not None:
        return min(configured, ttl_s)
    return min(MAX_REFRESH_INTERVAL, ttl_s / 4.0)


# -- the public front --------------------------------------------------------------------------------
class SessionStore:
    """Session key → agent id bindings, seen by every process (see the module doc).

    `ttl` (seconds) overrides ``REDIS_SESSION_TTL`` for this store; `sliding`
    makes `get` extend the binding like `touch`; `refresh_interval` bounds how
    often a touch rewrites PostgreSQL's expiry (default min(300 s, ttl / 4)).
    Thread-safe; cheap to create; reads the settings on every call.
    """

    def __init__(self, *, ttl: Optional[float] = None, sliding: bool = False,
                 refresh_interval: Optional[float] = None, client: Optional[Client] = None) -> None:
        if client is not None and not isinstance(client, Client):
            raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
        if ttl is not None:
            _ttl_ms(ttl, 0)
        # A refresh interval is at most the TTL it refreshes (this store's, else ten
        # years; a per-call ttl caps it again, see _refresh_interval).
        optional_seconds(refresh_interval, "refresh_interval", allow_zero=True,
                         maximum=MAX_TTL if ttl is None else ttl)
        self.ttl = ttl
        self.sliding = bool(sliding)
        self.refresh_interval = refresh_interval
        # None: the default client, resolved at each call (follows configure()).
        self.client = client

    def __repr__(self) -> str:
        return f"SessionStore(ttl={self.ttl!r}, sliding={self.sliding!r})"

    # -- helpers ----------------------------------------------------------------------------
    def _tiers(self) -> _Tiers:
        tiers = _current(self.client)
        if tiers.mode is Mode.OFF:
            raise FeatureDisabled(_OFF)
        return tiers

    def _ttl(self, ttl: object, tiers: _Tiers) -> int:
        return _ttl_ms(ttl, self.ttl if self.ttl is not None else tiers.default_ttl)

    # -- the contract --------------------------------------------------------------------------------
    def bind(self, session_key: str, agent_id: str, ttl: Optional[float] = None) -> None:
        """Bind `session_key` to `agent_id` for `ttl` seconds (replacing any binding)."""
        validate_id(session_key, "session_key")
        validate_id(agent_id, "agent_id")
        tiers = self._tiers()
        ttl_ms = self._ttl(ttl, tiers)
        redis, pg = tiers.redis, tiers.pg
        METRICS.inc("session_bind_total", mode=tiers.mode.value)
        if redis is None:
            if pg is not None:
                pg.bind(session_key, agent_id, ttl_ms)
            else:
                assert tiers.local is not None
                tiers.local.bind(session_key, agent_id, ttl_ms)
            return
        grace = _grace_ms(self.refresh_interval, ttl_ms / 1000.0)
        if pg is None:
            redis.bind(session_key, agent_id, ttl_ms, grace)
            return
        write: Optional[Callable[[], None]] = None  # None: Redis known down, flag the row at once
        if redis.conn.policy.available:
            def write() -> None:
                redis.bind(session_key, agent_id, ttl_ms, grace, retry=False)

        if not pg.bind_through(session_key, agent_id, ttl_ms, write):
            self._fell_back(tiers, "bind")

    def get(self, session_key: str) -> Optional[str]:
        """The agent bound to `session_key`, or None (unknown or expired)."""
        if self.sliding:
            return self.touch(session_key)
        if type(session_key) is not str or not 0 < len(session_key) <= MAX_ID_LENGTH:
            validate_id(session_key, "session_key")  # raises, naming the argument
        tiers = _current(self.client)
        redis = tiers.redis
        if redis is not None:  # the hot path: one GET
            try:
                agent = redis.get(session_key, tiers.pg is None)
            except BackendUnavailable:
                if tiers.pg is None:
                    raise
                METRICS.inc("session_fallback_total", op="get")
                row = tiers.pg.get(session_key)
                return None if row is None else row[0]
            if agent is not None or tiers.pg is None:
                return agent
            return self._repair(tiers, session_key)
        if tiers.mode is Mode.OFF:
            raise FeatureDisabled(_OFF)
        if tiers.pg is not None:
            row = tiers.pg.get(session_key)
            return None if row is None else row[0]
        assert tiers.local is not None
        return tiers.local.get(session_key)

    def touch(self, session_key: str, ttl: Optional[float] = None) -> Optional[str]:
        """Like `get`, and set the binding's expiry to `ttl` from now (sliding expiry).

        Redis only: one GETEX. Write-through: one script that extends the
        binding; PostgreSQL's expiry and the indexes are rewritten at most every
        `refresh_interval` per session and process, and a missed rewrite
        (PostgreSQL down) is retried by the next touch. A `ttl` shorter than
        what the binding has left is written to PostgreSQL first, then to Redis,
        so read repair never serves the binding past it; with PostgreSQL down
        such a touch raises `BackendUnavailable` and changes nothing.
        """
        validate_id(session_key, "session_key")
        tiers = self._tiers()
        ttl_ms = self._ttl(ttl, tiers)
        redis, pg = tiers.redis, tiers.pg
        if redis is None:
            if pg is not None:
                return pg.touch(session_key, ttl_ms)
            assert tiers.local is not None
            return tiers.local.touch(session_key, ttl_ms)
        shorter = False
        try:
            if pg is None:
                agent = redis.getex(session_key, ttl_ms, True)
            else:
                found = redis.touch(session_key, ttl_ms)
                agent, shorter = found if found is not None else (None, False)
        except BackendUnavailable:
            if pg is None:
                raise
            agent = pg.touch(session_key, ttl_ms, pending=True)
            if agent is not None:
                self._fell_back(tiers, "touch")
            return agent
        interval = _refresh_interval(self.refresh_interval, ttl_ms / 1000.0)
        grace = int(interval * 1000)
        if agent is None:
            if pg is None:
                return None
            agent = pg.repair(session_key, lambda a, ms: redis.bind(session_key, a, ms, grace, retry=False),
                              extend_ms=ttl_ms)
            METRICS.inc("session_read_repair_total", result="hit" if agent is not None else "miss")
            return agent
        if shorter:
            assert pg is not None
            bound = agent
            if not pg.shorten_through(session_key, bound, ttl_ms, lambda: redis.shorten(session_key, bound, ttl_ms)):
                return None  # unbound or rebound meanwhile
            return agent
        if tiers.refresh_due(session_key, agent, interval):
            METRICS.inc("session_touch_refresh_total")
            try:
                redis.refresh_index(session_key, agent, ttl_ms, grace)
            except BackendUnavailable:
                pass
            if pg is not None:
                try:
                    pg.extend(session_key, agent, ttl_ms, lambda: redis.left_ms(session_key))
                except BackendUnavailable:
                    # Redis answered and stays right; PostgreSQL's expiry lags (errs
                    # early) until a touch after it returns rewrites it.
                    tiers.refresh_missed(session_key, agent)
                    METRICS.inc("session_refresh_missed_total")
        return agent

    def unbind(self, session_key: str) -> bool:
        """Remove the binding of `session_key`; True if there was one."""
        validate_id(session_key, "session_key")
        tiers = self._tiers()
        redis, pg = tiers.redis, tiers.pg
        if redis is None:
            if pg is not None:
                return pg.unbind(session_key)
            assert tiers.local is not None
            return tiers.local.unbind(session_key)
        if pg is None:
            return redis.unbind(session_key)
        forget: Optional[Callable[[], bool]] = None  # None: Redis known down, leave a tombstone
        if redis.conn.policy.available:
            def forget() -> bool:
                return redis.unbind(session_key, retry=False)

        existed, reached_redis = pg.unbind_through(session_key, forget)
        if not reached_redis:
            self._fell_back(tiers, "unbind")
        return existed

    def sessions_for(self, agent_id: str, *, limit: int = 10_000) -> List[str]:
        """The session keys bound to `agent_id` now (sorted), from an index — never a SCAN.

        With PostgreSQL configured its index answers (complete even after Redis
        lost its data); otherwise the agent's Redis index, verified against the
        bindings.
        """
        validate_id(agent_id, "agent_id")
        _check_limit(limit, "limit")
        return self._lookup(
            "sessions_for",
            lambda pg: pg.sessions_for(agent_id, limit),
            lambda redis: redis.sessions_for(agent_id, limit),
            lambda local: local.sessions_for(agent_id, limit),
        )

    def resolve_agent_prefix(self, prefix: str, *, max_candidates: int = MAX_CANDIDATES) -> Optional[str]:
        """The agent id that `prefix` names (a bound agent's id starting with it), or None.

        An id equal to `prefix` wins; two or more others raise `AmbiguousPrefix`
        listing at most `max_candidates` of them.
        """
        validate_id(prefix, "prefix")
        _check_limit(max_candidates, "max_candidates")
        want = max_candidates + 1
        found = self._lookup(
            "resolve_agent_prefix",
            lambda pg: pg.agents_with_prefix(prefix, want),
            lambda redis: redis.agents_with_prefix(prefix, want),
            lambda local: local.agents_with_prefix(prefix, want),
        )
        if not found:
            return None
        if found[0] == prefix or len(found) == 1:
            return found[0]
        raise AmbiguousPrefix(prefix, found[:max_candidates])

    def mapping(self) -> SessionMap:
        """A `MutableMapping` view for legacy code that used the dict."""
        return SessionMap(self)

    def session_keys(self) -> Iterator[str]:
        """Every bound session key. O(all sessions); a SCAN in Redis-only mode."""
        tiers = self._tiers()
        if tiers.pg is not None:
            return iter(tiers.pg.session_keys())
        if tiers.redis is not None:
            return tiers.redis.session_keys()
        assert tiers.local is not None
        return iter(tiers.local.session_keys())

    def replay_pending(self) -> int:
        """Write bindings made while Redis was down back to Redis now; returns the count."""
        return replay_pending()

    def cleanup_expired(self) -> int:
        """Delete expired PostgreSQL rows; returns the count (see `cleanup_expired`)."""
        return cleanup_expired()

    # -- internals ------------------------------------------------------------------------------------
    def _lookup(self, op: str, pg: Callable[[_PostgresTier], List[str]], redis: Callable[[_RedisTier], List[str]],
                local: Callable[[_LocalTier], List[str]]) -> List[str]:
        """An index query: PostgreSQL when configured (complete even after Redis
        lost its data), else the Redis index, else the local store. With
        PostgreSQL down, the Redis index answers."""
        tiers = self._tiers()
        if tiers.pg is not None:
            try:
                return pg(tiers.pg)
            except BackendUnavailable:
                if tiers.redis is None:
                    raise
                METRICS.inc("session_fallback_total", op=op)
        if tiers.redis is not None:
            return redis(tiers.redis)
        assert tiers.local is not None
        return local(tiers.local)

    def _repair(self, tiers: _Tiers, session_key: str) -> Optional[str]:
        redis, pg = tiers.redis, tiers.pg
        assert redis is not None and pg is not None
        grace = _grace_ms(self.refresh_interval, self.ttl if self.ttl is not None else tiers.default_ttl)
        agent = pg.repair(session_key, lambda a, ms: redis.bind(session_key, a, ms, grace, retry=False))
        METRICS.inc("session_read_repair_total", result="hit" if agent is not None else "miss")
        return agent

    @staticmethod
    def _fell_back(tiers: _Tiers, op: str) -> None:
        METRICS.inc("session_fallback_total", op=op)
        tiers.note_outage()


def _check_limit(value: object, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(argument, f"must be an int, not {type(value).__name__}")
    if value < 1:
        raise InvalidArgument(argument, f"must be >= 1, got {value!r}")


def replay_pending() -> int:
    """Write the PostgreSQL rows flagged while Redis was down back to Redis.

    Runs by itself in the background of the process that saw the outage; call
    it (or ``mcp-redis sessions cleanup``) to replay rows of a process that
    died first. Returns how many rows were replayed; 0 outside write-through.
    """
    return _current().replay_pending()


def cleanup_expired(batch_size: int = 10_000) -> int:
    """Delete expired rows of ``core.sessions`` (not needed for correctness).

    Pending rows are replayed to Redis first. Returns the number deleted;
    0 when no PostgreSQL tier is configured. Meant for cron / the CLI.
    """
    _check_limit(batch_size, "batch_size")
    tiers = _current()
    if tiers.pg is None:
        return 0
    try:
        tiers.replay_pending()
    except BackendUnavailable:
        pass
    return tiers.pg.cleanup_expired(batch_size)


class SessionMap(MutableMapping[str, str]):
    """``sessions[key] = agent_id``, ``sessions.get(key)``, ``del sessions[key]``, ``key in sessions``.

    A view over a `SessionStore` for code written against the legacy dict.
    Iteration and ``len()`` visit every session (a SCAN in Redis-only mode):
    fine for tools, not for request paths.
    """

    def __init__(self, store: Optional[SessionStore] = None) -> None:
        self.store = store if store is not None else SessionStore()

    def __repr__(self) -> str:
        return f"SessionMap({self.store!r})"

    def __getitem__(self, session_key: str) -> str:
        agent = self.store.get(session_key)
        if agent is None:
            raise KeyError(session_key)
        return agent

    def __setitem__(self, session_key: str, agent_id: str) -> None:
        self.store.bind(session_key, agent_id)

    def __delitem__(self, session_key: str) -> None:
        if not self.store.unbind(session_key):
            raise KeyError(session_key)

    def __contains__(self, session_key: object) -> bool:
        if not isinstance(session_key, str):
            return False  # as a dict of str keys would answer
        return self.store.get(session_key) is not None

    def __iter__(self) -> Iterator[str]:
        return self.store.session_keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.store.session_keys())

