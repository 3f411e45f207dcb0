"""The PostgreSQL source of truth: bindings in ``<pg_schema>.sessions``, every statement parameterised.

`PostgresBackend` is both a `Backend` (``postgres`` mode: PostgreSQL only)
and the `Source` behind the Redis tier in write-through mode. ``session_key``
holds ``keys.encode_id(session key)`` (readable for plain ids); ``agent_id``
holds the UTF-8 bytes (surrogatepass) so NUL and lone surrogates survive and a
prefix is a bytea range; ``redis_pending`` flags rows written while Redis was
unreachable (the replayer writes them back, `mcp_redis.sessions.replay`);
``record`` (JSONB) holds the binding's record: ``bound_at``, ``bind_count``,
``last_active`` (epoch seconds, PostgreSQL's clock) and the caller's
``fields``. A row written before records existed has ``{}`` and reads as
bound at its ``created_at``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import BackendUnavailable, InvalidArgument
from ..keys import decode_id, encode_id
from ..postgres import Postgres
from .base import Pending, Record, Timing
from .records import MAX_FIELDS_BYTES, RecordData, fields_json, from_json, pack_fields, unpack_fields

__all__ = ["PostgresBackend"]


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _from_utf8(raw: Any) -> str:
    return bytes(raw).decode("utf-8", "surrogatepass")


_NOW_S = "floor(extract(epoch FROM now()))::bigint"
_LEFT_MS = "ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint"
_PG_BIND = """
INSERT INTO {schema}.sessions AS s (session_key, agent_id, expires_at, redis_pending, record)
VALUES (%s, %s, now() + %s * interval '1 millisecond', %s,
        jsonb_build_object('bound_at', NOW_S, 'bind_count', 1, 'last_active', NOW_S, 'fields', %s::jsonb))
ON CONFLICT (session_key) DO UPDATE SET
    agent_id = EXCLUDED.agent_id, expires_at = EXCLUDED.expires_at,
    redis_pending = EXCLUDED.redis_pending, updated_at = now(),
    record = EXCLUDED.record || jsonb_build_object('bind_count', CASE WHEN s.expires_at > now()
        THEN COALESCE((s.record ->> 'bind_count')::bigint, 1) + 1 ELSE 1 END)
RETURNING record
""".replace("NOW_S", _NOW_S)
_PG_GET = """
SELECT agent_id, LEFT_MS, record, floor(extract(epoch FROM created_at))::bigint
FROM {schema}.sessions WHERE session_key = %s AND expires_at > now()
""".replace("LEFT_MS", _LEFT_MS)
_PG_TOUCH = """
UPDATE {schema}.sessions SET expires_at = now() + %s * interval '1 millisecond',
    updated_at = now(), redis_pending = redis_pending OR %s,
    record = record || jsonb_build_object('last_active', NOW_S)
WHERE session_key = %s AND expires_at > now()
RETURNING agent_id, LEFT_MS, record, floor(extract(epoch FROM created_at))::bigint
""".replace("NOW_S", _NOW_S).replace("LEFT_MS", _LEFT_MS)
_PG_UPDATE = """
UPDATE {schema}.sessions SET updated_at = now(), redis_pending = redis_pending OR %s,
    record = record || jsonb_build_object('last_active', NOW_S,
                                          'fields', COALESCE(record -> 'fields', '{{}}'::jsonb) || %s::jsonb)
WHERE session_key = %s
RETURNING agent_id, LEFT_MS, record, floor(extract(epoch FROM created_at))::bigint, expires_at > now(),
    redis_pending
""".replace("NOW_S", _NOW_S).replace("LEFT_MS", _LEFT_MS)
# An expired row that Redis still has live (touches slide Redis's expiry, PostgreSQL's follows
# only at the throttled refresh): it catches up with Redis's.
_PG_EXTEND = "UPDATE {schema}.sessions SET expires_at = now() + %s * interval '1 millisecond' WHERE session_key = %s"
# No "expires_at > now()": the caller just read the binding live from Redis, so a row
# that expired in PostgreSQL meanwhile (its refresh missed while PostgreSQL was down)
# catches up; a row unbound or rebound meanwhile no longer names the agent.
# clock_timestamp(), not now() (the transaction's start): a touch that waited on the row lock
# must not write an expiry early by the wait. It returns that time: the refresh then caps the
# expiry at it plus what Redis has left, read after it (so never past Redis's expiry).
_PG_TOUCH_AGENT = """
UPDATE {schema}.sessions SET expires_at = clock_timestamp() + %s * interval '1 millisecond', updated_at = now(),
    record = record || jsonb_build_object('last_active', NOW_S)
WHERE session_key = %s AND agent_id = %s
RETURNING clock_timestamp()
""".replace("NOW_S", _NOW_S)
# The same, given the bind Redis holds (agent, bound_at, bind_count; a record of {} reads as
# bound at created_at, count 1, as `records.from_json` reads it): a live row of the agent is
# its committed binding and takes the touch; an expired row catches up only from that same
# bind: never from a newer bind of its agent still in flight, whose COMMIT may yet fail (Redis
# then forgets that bind, and read repair would serve the old row again), nor from an older
# one Redis still holds (a pending row, written while Redis was unreachable, has ended).
_PG_TOUCH_BIND = _PG_TOUCH_AGENT.replace("RETURNING clock_timestamp()", """
    AND (expires_at > now()
         OR (COALESCE(NULLIF((record ->> 'bound_at')::bigint, 0), floor(extract(epoch FROM created_at))::bigint) = %s
             AND COALESCE(NULLIF((record ->> 'bind_count')::bigint, 0), 1) = %s))
RETURNING clock_timestamp()""")
# The same for a bare agent id in Redis (the layout before records: no bind to compare, and never
# a write in flight), but an expired pending row is newer than it (written while Redis was
# unreachable) and has ended, as `_PG_TOUCH_BIND` leaves it.
_PG_TOUCH_BARE = _PG_TOUCH_AGENT.replace("RETURNING clock_timestamp()", """
    AND (expires_at > now() OR NOT redis_pending)
RETURNING clock_timestamp()""")
_PG_EXPIRE_FROM = """
UPDATE {schema}.sessions SET expires_at = %s + %s * interval '1 millisecond' WHERE session_key = %s
"""
_PG_FLAG_PENDING = "UPDATE {schema}.sessions SET redis_pending = true WHERE session_key = %s"
_PG_DELETE = "DELETE FROM {schema}.sessions WHERE session_key = %s RETURNING expires_at > now()"
# A tombstone: an already-expired row flagged for replay, so Redis forgets the key.
_PG_TOMBSTONE = """
INSERT INTO {schema}.sessions (session_key, agent_id, expires_at, redis_pending)
VALUES (%s, ''::bytea, now(), true)
ON CONFLICT (session_key) DO UPDATE SET
    agent_id = ''::bytea, expires_at = now(), redis_pending = true, updated_at = now()
"""
_PG_FOR_AGENT = """
SELECT session_key FROM {schema}.sessions
WHERE agent_id = %s AND expires_at > now()
"""
_PG_PREFIX = """
SELECT DISTINCT agent_id FROM {schema}.sessions
WHERE agent_id >= %s AND agent_id < %s AND expires_at > now() ORDER BY agent_id LIMIT %s
"""
_PG_ALL = "SELECT session_key FROM {schema}.sessions WHERE expires_at > now() ORDER BY session_key"
_PG_PENDING = """
SELECT session_key, agent_id, ceil(extract(epoch FROM expires_at - now()) * 1000)::bigint, record,
    floor(extract(epoch FROM created_at))::bigint
FROM {schema}.sessions WHERE redis_pending ORDER BY session_key LIMIT %s FOR UPDATE SKIP LOCKED
"""
_PG_CLEAR_PENDING = "UPDATE {schema}.sessions SET redis_pending = false WHERE session_key = ANY(%s) AND expires_at > now()"
_PG_DROP_REPLAYED = "DELETE FROM {schema}.sessions WHERE session_key = ANY(%s) AND expires_at <= now()"
_PG_CLEANUP = """
DELETE FROM {schema}.sessions WHERE session_key IN (
    SELECT session_key FROM {schema}.sessions
    WHERE expires_at <= now() AND NOT redis_pending LIMIT %s FOR UPDATE SKIP LOCKED)
"""
# Write-through: a batch of expired rows is read (no lock held while Redis is asked about it),
# then each row that is still expired and still names the agent Redis was asked about is deleted,
# or catches up with the binding Redis still has live (the same bind). A row written meanwhile
# (rebound, touched, refreshed) no longer matches: neither statement touches it.
_PG_EXPIRED_BATCH = """
SELECT session_key, agent_id, record, floor(extract(epoch FROM created_at))::bigint, clock_timestamp()
FROM {schema}.sessions WHERE expires_at <= now() AND NOT redis_pending LIMIT %s
"""
_PG_DELETE_EXPIRED = """
DELETE FROM {schema}.sessions AS s USING unnest(%s::text[], %s::bytea[]) AS v(k, a)
WHERE s.session_key = v.k AND s.agent_id = v.a AND s.expires_at <= now() AND NOT s.redis_pending
"""
# Redis's time left counts from a time read before Redis was asked (the batch's read): from the
# UPDATE's own now(), after the answer came back, the row ran past Redis's expiry by that trip.
_PG_CATCH_UP = """
UPDATE {schema}.sessions AS s SET expires_at = %s + v.ms * interval '1 millisecond'
FROM unnest(%s::text[], %s::bytea[], %s::bigint[]) AS v(k, a, ms)
WHERE s.session_key = v.k AND s.agent_id = v.a AND s.expires_at <= now() AND NOT s.redis_pending
"""


def _data(row: Any) -> RecordData:
    """The record of a row read as (..., record, created_at seconds) at positions 2 and 3."""
    return from_json(row[2], int(row[3]))


def _fields_doc(fields: str) -> str:
    """Packed caller fields as the JSON object stored under ``fields``."""
    return json.dumps(unpack_fields(fields), ensure_ascii=False, separators=(",", ":"))


def _merge_doc(fields: Dict[str, str]) -> str:
    """{name: JSON text} as one JSON object (the values are already JSON)."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"


def check_merged(data: RecordData, fields: Dict[str, str]) -> None:
    """Raise (rolling the update back) when the merged fields exceed `MAX_FIELDS_BYTES`."""
    try:
        pack_fields(fields_json(data.fields))
    except InvalidArgument:
        raise InvalidArgument(max(fields, key=lambda k: len(fields[k])),
                              f"the record's fields would exceed {MAX_FIELDS_BYTES} bytes packed") from None


class PostgresBackend:
    """The bindings in ``<pg_schema>.sessions``: a `Backend` (postgres mode) and a `Source` (write-through)."""

    mode = "postgres"

    def __init__(self, pg: Postgres, default_ttl: float) -> None:
        self.pg = pg
        self.default_ttl = default_ttl

    # -- Backend (postgres mode) ---------------------------------------------------------
    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None:
        self.pg.execute(self.pg.sql(_PG_BIND),
                        (encode_id(session_key), _utf8(agent_id), ttl_ms, False, _fields_doc(fields)))

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        record = self.load(session_key)
        return None if record is None else record.agent_id

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]:
        found = self.load(session_key)
        return None if found is None else (found.agent_id, found.data)

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]:
        found = self.update_through(session_key, fields, None, pending=False)
        if found is None or found.data is None:
            return None
        return found.agent_id, found.data

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        return self.touch_record(session_key, ttl_ms)

    def replay_pending(self) -> int:
        return 0  # nothing is pending without a Redis tier

    def close(self) -> None:
        pass  # the pool belongs to the client

    # -- Source (write-through) ------------------------------------------------------------
    def load(self, session_key: str) -> Optional[Record]:
        row = self.pg.execute(self.pg.sql(_PG_GET), (encode_id(session_key),), fetch="one")
        return None if row is None else Record(_from_utf8(row[0]), int(row[1]), _data(row))

    def touch_record(self, session_key: str, ttl_ms: int, pending: bool = False) -> Optional[str]:
        row = self.pg.execute(self.pg.sql(_PG_TOUCH), (ttl_ms, pending, encode_id(session_key)), fetch="one")
        return None if row is None else _from_utf8(row[0])

    def _touch_bind(self, key: str, agent_id: str,
                    bind: Optional[Tuple[int, int]]) -> Callable[[Any, int], Any]:
        """``touch(cursor, ttl_ms)``: the row's expiry to `ttl_ms` from now while it binds
        `agent_id` and is live or, past its expiry, is `bind` (``bound_at``, ``bind_count``:
        the bind Redis holds; None: a bare agent id there, and the row is not pending); if so,
        the time it was written (``clock_timestamp()``), else None."""
        args: Tuple[Any, ...] = (key, _utf8(agent_id))
        if bind is None:
            statement = self.pg.sql(_PG_TOUCH_BARE)
        else:
            statement, args = self.pg.sql(_PG_TOUCH_BIND), (*args, *bind)

        def touch(cur: Any, ttl_ms: int) -> Any:
            cur.execute(statement, (ttl_ms, *args))
            row = cur.fetchone()
            return None if row is None else row[0]  # when it was written (PostgreSQL's clock)

        return touch

    def extend(self, session_key: str, agent_id: str, ttl_ms: int, redis_left: Callable[[], Optional[int]],
               bind: Optional[Tuple[int, int]] = None) -> None:
        """Slide the row's expiry to `ttl_ms` from now if it still binds `agent_id` (given
        `bind`, the bind Redis touched: only that bind), never past what the Redis binding has
        left (`redis_left`: ms, None: no expiry).

        Redis is asked with the row locked, so a shorter touch that committed
        meanwhile (PostgreSQL, then Redis, under this lock) is seen and this late
        refresh cannot lengthen PostgreSQL past it. If Redis cannot be asked the
        refresh is rolled back: PostgreSQL keeps its earlier expiry (errs early),
        and `BackendUnavailable` tells the caller the refresh is still to be made.
        """
        key = encode_id(session_key)
        touch = self._touch_bind(key, agent_id, bind)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                written = touch(cur, ttl_ms)
                if written is None:
                    return True
                try:
                    left = redis_left()  # read after `written`: `written` + left is not past Redis's
                except BackendUnavailable:
                    conn.rollback()
                    return False
                if left is not None and left <= ttl_ms:  # (longer: a touch since extended Redis)
                    cur.execute(self.pg.sql(_PG_EXPIRE_FROM), (written, max(left, 0), key))
            return True

        self.pg.ensure_schema()
        if not self.pg.policy.call(run):  # (outside the policy: PostgreSQL answered)
            raise BackendUnavailable("redis: the binding's time left could not be read; PostgreSQL's expiry "
                                     "was left as it was")

    def shorten_through(self, session_key: str, agent_id: str, ttl_ms: int,
                        redis_write: Callable[[], bool], bind: Optional[Tuple[int, int]] = None) -> bool:
        """Set the row's expiry to `ttl_ms` from now (given `bind`: only while the row is that
        bind of `agent_id`), then (row still locked) Redis's.

        PostgreSQL first: read repair can then never serve the binding past the
        shorter expiry, whatever Redis does. A Redis failure flags the row for
        replay (which writes its remaining TTL). Returns what `redis_write`
        returned (False: the binding no longer names `agent_id`).
        """
        key = encode_id(session_key)
        touch = self._touch_bind(key, agent_id, bind)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                had_row = touch(cur, ttl_ms)
                try:
                    return redis_write()
                except BackendUnavailable:
                    if not had_row:
                        raise
                    cur.execute(self.pg.sql(_PG_FLAG_PENDING), (key,))
                    return True

        self.pg.ensure_schema()
        return bool(self.pg.policy.call(run))

    def unbind(self, session_key: str) -> bool:
        row = self.pg.execute(self.pg.sql(_PG_DELETE), (encode_id(session_key),), fetch="one")
        return bool(row and row[0])

    def update_through(self, session_key: str, fields: Dict[str, str],
                       redis_write: Optional[Callable[[str, int, RecordData], None]],
                       pending: bool = True,
                       redis_left: Optional[Callable[[str, RecordData], int]] = None) -> Optional[Record]:
        """Merge `fields` into the row's record (one statement) and, row locked, hand Redis the
        result; a Redis failure (or `redis_write` None) flags the row for replay. None: not bound.

        A row past its expiry here whose binding Redis still has live, the same bind (`redis_left(agent,
        record as the row had it)`: its ms left, 0: none; touches slide Redis's expiry ahead of this
        row's throttled one) first catches up with Redis's expiry, then is updated as a live
        one. Not when the row has changes Redis has not taken yet (pending): Redis's binding is
        older than the row then. Otherwise the row is left as it was: not bound."""
        key = encode_id(session_key)

        def run() -> Optional[Record]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(self.pg.sql(_PG_UPDATE), (pending and redis_write is None, _merge_doc(fields), key))
                row = cur.fetchone()
                if row is None:
                    return None
                data = _data(row)
                check_merged(data, fields)
                found = Record(_from_utf8(row[0]), max(1, int(row[1])), data)
                if not row[4]:  # expired here
                    left = 0
                    if redis_left is not None and redis_write is not None and not row[5]:
                        try:
                            left = redis_left(found.agent_id, data)
                        except BackendUnavailable:
                            left = 0
                    if left <= 0:
                        conn.rollback()
                        return None
                    cur.execute(self.pg.sql(_PG_EXTEND), (left, key))
                    found = found._replace(ttl_ms=left)
                if redis_write is not None:
                    try:
                        redis_write(found.agent_id, found.ttl_ms, data)
                    except BackendUnavailable:
                        cur.execute(self.pg.sql(_PG_FLAG_PENDING), (key,))
                return found

        self.pg.ensure_schema()
        result: Optional[Record] = self.pg.policy.call(run)
        return result

    def bind_through(self, session_key: str, agent_id: str, ttl_ms: int,
                     redis_write: Optional[Callable[[RecordData], None]], fields: str = "") -> bool:
        """Upsert the row and, while its lock is held, write Redis; False if Redis failed.

        Writers of one session serialise on the row lock and each writes Redis
        before committing, so Redis ends with the value PostgreSQL ends with. A
        Redis failure (or `redis_write` None: known down) flags the row for
        replay in the same transaction.
        """
        key = encode_id(session_key)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(self.pg.sql(_PG_BIND),
                            (key, _utf8(agent_id), ttl_ms, redis_write is None, _fields_doc(fields)))
                row = cur.fetchone()
                if redis_write is None:
                    return False
                try:
                    redis_write(from_json(row[0] if row is not None else None, 0))
                    return True
                except BackendUnavailable:
                    cur.execute(self.pg.sql(_PG_FLAG_PENDING), (key,))
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
                cur.execute(self.pg.sql(_PG_DELETE), (key,))
                row = cur.fetchone()
                existed = bool(row and row[0])
                if redis_unbind is not None:
                    try:
                        return (redis_unbind() or existed), True
                    except BackendUnavailable:
                        pass
                cur.execute(self.pg.sql(_PG_TOMBSTONE), (key,))
                return existed, False

        self.pg.ensure_schema()
        result: Tuple[bool, bool] = self.pg.policy.call(run)
        return result

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        # Sorted here, not by SQL: the column holds the encoded keys (encode_id),
        # whose order is not the keys' (an encoded key sorts last), and `limit`
        # must keep the first keys in the keys' own order, as in every other mode.
        rows = self.pg.execute(self.pg.sql(_PG_FOR_AGENT), (_utf8(agent_id),), fetch="all")
        return sorted(decode_id(r[0]) for r in rows)[:limit]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        low = _utf8(prefix)
        rows = self.pg.execute(self.pg.sql(_PG_PREFIX), (low, low + b"\xff", limit), fetch="all")
        return [_from_utf8(r[0]) for r in rows]

    def session_keys(self) -> Iterator[str]:
        return iter([decode_id(r[0]) for r in self.pg.execute(self.pg.sql(_PG_ALL), (), fetch="all")])

    def repair(self, session_key: str, write: Callable[[str, int, RecordData], None],
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
                    cur.execute(self.pg.sql(_PG_GET + " FOR SHARE"), (key,))
                else:
                    cur.execute(self.pg.sql(_PG_TOUCH), (extend_ms, False, key))
                row = cur.fetchone()
                if row is None:
                    return None
                agent_id = _from_utf8(row[0])
                try:
                    write(agent_id, extend_ms if extend_ms is not None else max(1, int(row[1])), _data(row))
                except BackendUnavailable:
                    pass
                return agent_id

        self.pg.ensure_schema()
        result: Optional[str] = self.pg.policy.call(run)
        return result

    def replay(self, write_batch: Callable[[Sequence[Pending]], None], batch: int) -> int:
        """Hand one batch of pending rows to `write_batch` (under row locks), then clear them.

        Returns the number of rows replayed (0: nothing pending).
        """

        def run() -> int:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(self.pg.sql(_PG_PENDING), (batch,))
                rows = cur.fetchall()
                if not rows:
                    return 0
                items: List[Pending] = []
                for key, agent, ms, doc, created in rows:
                    live = ms is not None and int(ms) > 0
                    items.append(Pending(decode_id(key), _from_utf8(agent) if live else None, int(ms) if live else 0,
                                         from_json(doc, int(created)) if live else None))
                write_batch(items)  # raises BackendUnavailable: rolled back, still pending
                keys = [r[0] for r in rows]
                cur.execute(self.pg.sql(_PG_CLEAR_PENDING), (keys,))
                cur.execute(self.pg.sql(_PG_DROP_REPLAYED), (keys,))
                return len(rows)

        self.pg.ensure_schema()
        return int(self.pg.policy.call(run))

    def cleanup_expired(self, batch: int) -> int:
        total = 0
        while True:
            n = int(self.pg.execute(self.pg.sql(_PG_CLEANUP), (batch,)))
            total += n
            if n < batch:
                return total

    def cleanup_expired_through(self, batch: int,
                                redis_left: Callable[[List[Tuple[str, str, RecordData]]], List[int]]) -> int:
        """`cleanup_expired` in front of Redis: a row past its expiry whose binding Redis still
        has live, the same bind (touches slide Redis's expiry ahead of the row's throttled one),
        catches up with Redis's expiry instead of being deleted. `redis_left([(stored
        session key, agent, record), ...])`: the ms each binding has left while it is that same
        bind (0: none; a bind in flight in Redis is not the row's), one round trip per
        batch, asked with no row locked. If Redis cannot be asked, `BackendUnavailable` is
        raised; the batches done before it stay done."""
        total = 0
        while True:
            rows = self.pg.execute(self.pg.sql(_PG_EXPIRED_BATCH), (batch,), fetch="all")
            if not rows:
                return total
            raw = [(str(row[0]), bytes(row[1])) for row in rows]
            lefts = redis_left([(key, _from_utf8(agent), _data(row)) for (key, agent), row in zip(raw, rows)])
            gone = [(key, agent) for (key, agent), left in zip(raw, lefts) if left <= 0]
            live = [(key, agent, left) for (key, agent), left in zip(raw, lefts) if left > 0]
            deleted = 0
            if gone:
                deleted = int(self.pg.execute(self.pg.sql(_PG_DELETE_EXPIRED),
                                              ([k for k, _ in gone], [a for _, a in gone])))
            caught_up = 0
            if live:
                asked_after = min(row[4] for row in rows)  # PostgreSQL's time before Redis was asked
                caught_up = int(self.pg.execute(self.pg.sql(_PG_CATCH_UP), (
                    asked_after, [k for k, _, _ in live], [a for _, a, _ in live], [n for _, _, n in live])))
            total += deleted
            if len(rows) < batch or deleted + caught_up == 0:  # the last batch, or rows written meanwhile
                return total

