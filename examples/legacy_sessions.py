"""A sessions `Source` over the legacy server's own tables: ``core.sessions`` + ``core.identities``.

The legacy MCP server (CIRWEL/unitares) keeps its sessions in ``core.sessions``
(``session_id``, ``identity_id`` → ``core.identities.agent_id``, ``expires_at``,
``last_active``, ``is_active``, ``client_type``, ``client_info``,
``metadata``). `LegacySessionsSource` lets `mcp_redis.SessionStore` (Redis in
front, write-through) use those rows as its source of truth, so the server and
the library read and write the same sessions during a gradual roll-out::

    import mcp_redis
    from mcp_redis.sessions import use_source
    from legacy_sessions import LegacySessionsSource

    mcp_redis.configure()                         # REDIS_URL and DATABASE_URL set
    use_source(LegacySessionsSource.factory())    # before the first sessions call
    store = mcp_redis.SessionStore()

How the tables are used (every statement parameterised; the table names are
the legacy server's constants):

* a session key is stored in ``session_id`` as ``mcp_redis.keys.encode_id``
  (the key itself for plain ids such as UUIDs, so the server's own rows are
  found under their ids);
* the agent is the ``core.identities`` row of that ``agent_id``: binding an
  agent the legacy server never registered raises `InvalidArgument` naming
  ``agent_id`` (the adapter never invents agents or API keys) unless a
  `register` hook is given. An agent id with NUL or a lone surrogate cannot be
  a legacy ``TEXT`` id and is refused the same way;
* unbind sets ``is_active = false`` (the legacy ``end_session``), never
  deletes; a bind, touch or update sets ``last_active``;
* the session record maps onto the row: ``bound_at`` is ``created_at`` (a
  bind sets it), ``last_active`` is ``last_active``, the caller fields
  ``client_type`` (a str or None: the column is TEXT) and ``client_info``
  (JSONB; ``{}`` reads as absent) are those columns, every other caller field
  is a top-level key of ``metadata``, and ``bind_count`` is the metadata key
  ``mcp_redis_bind_count``. A bind replaces ``metadata`` with the caller's
  fields (as it replaces the record); `update` merges into it;
* a row written while Redis was down is flagged by the key
  ``mcp_redis_pending`` in its ``metadata`` (the legacy table has no column
  for it); the replayer clears it;
* `cleanup_expired` deletes nothing: the legacy server's own cleanup owns
  these rows.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from mcp_redis.client import Client
from mcp_redis.errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from mcp_redis.keys import decode_id, encode_id, validate_id
from mcp_redis.postgres import Postgres
from mcp_redis.sessions import Pending, Record, RecordData
from mcp_redis.sessions.postgres import check_merged
from mcp_redis.sessions.records import check_fields, unpack_fields

__all__ = ["LegacySessionsSource", "Register"]

# (cursor, agent_id) -> the new core.identities.identity_id; None: refuse unknown agents.
Register = Callable[[Any, str], int]

# Statements are constants (no formatting): a live row is "s.is_active AND s.expires_at > now()"; the
# pending flag is the metadata key mcp_redis_pending.
_IDENTITY = "SELECT identity_id FROM core.identities WHERE agent_id = %s"
# The record columns, after the agent id and the ms left, in every read of a row.
_RECORD = """floor(extract(epoch FROM s.created_at))::bigint, floor(extract(epoch FROM s.last_active))::bigint,
    s.client_type, s.client_info, s.metadata"""
_BIND = """
INSERT INTO core.sessions AS s (session_id, identity_id, expires_at, last_active, is_active, created_at,
                                client_type, client_info, metadata)
VALUES (%(sid)s, %(iid)s, now() + %(ms)s * interval '1 millisecond', now(), true, now(),
        %(ctype)s, %(cinfo)s::jsonb,
        %(meta)s::jsonb || CASE WHEN %(pending)s THEN '{"mcp_redis_pending": true}'::jsonb ELSE '{}'::jsonb END)
ON CONFLICT (session_id) DO UPDATE SET
    identity_id = EXCLUDED.identity_id, expires_at = EXCLUDED.expires_at, last_active = now(),
    is_active = true, created_at = now(), client_type = EXCLUDED.client_type, client_info = EXCLUDED.client_info,
    metadata = EXCLUDED.metadata || jsonb_build_object('mcp_redis_bind_count',
        CASE WHEN s.is_active AND s.expires_at > now()
             -- as _bind_count reads it: a whole number of at most 18 digits, else 1 (a row another
             -- writer left with 5.5, "x" or 2^63-1 is no error)
             AND (s.metadata ->> 'mcp_redis_bind_count') ~ '^[1-9][0-9]{0,17}$'
             AND jsonb_typeof(s.metadata -> 'mcp_redis_bind_count') = 'number'
             THEN (s.metadata ->> 'mcp_redis_bind_count')::bigint + 1 ELSE 1 END)
RETURNING 0, 0, """ + _RECORD + """
"""
_UPDATE = """
UPDATE core.sessions s SET last_active = now(),
    client_type = CASE WHEN %(has_ctype)s THEN %(ctype)s ELSE s.client_type END,
    client_info = CASE WHEN %(has_cinfo)s THEN %(cinfo)s::jsonb ELSE s.client_info END,
    metadata = s.metadata || %(meta)s::jsonb
        || CASE WHEN %(pending)s THEN '{"mcp_redis_pending": true}'::jsonb ELSE '{}'::jsonb END
FROM core.identities i
WHERE s.session_id = %(sid)s AND s.is_active AND s.expires_at > now() AND i.identity_id = s.identity_id
RETURNING i.agent_id, ceil(extract(epoch FROM s.expires_at - now()) * 1000)::bigint, """ + _RECORD + """
"""
_GET = """
SELECT i.agent_id, ceil(extract(epoch FROM s.expires_at - now()) * 1000)::bigint, """ + _RECORD + """
FROM core.sessions s JOIN core.identities i USING (identity_id)
WHERE s.session_id = %s AND s.is_active AND s.expires_at > now()
"""
_TOUCH = """
UPDATE core.sessions s SET expires_at = clock_timestamp() + %s * interval '1 millisecond', last_active = now(),
    metadata = CASE WHEN %s THEN s.metadata || '{"mcp_redis_pending": true}'::jsonb ELSE s.metadata END
FROM core.identities i
WHERE s.session_id = %s AND s.is_active AND s.expires_at > now() AND i.identity_id = s.identity_id
RETURNING i.agent_id, ceil(extract(epoch FROM s.expires_at - now()) * 1000)::bigint, """ + _RECORD + """
"""
# No expiry check (see mcp_redis.sessions.postgres._PG_TOUCH_AGENT): Redis just had it live.
_TOUCH_AGENT = """
UPDATE core.sessions s SET expires_at = clock_timestamp() + %s * interval '1 millisecond', last_active = now()
FROM core.identities i
WHERE s.session_id = %s AND s.is_active AND i.identity_id = s.identity_id AND i.agent_id = %s
RETURNING clock_timestamp()
"""
# The refresh's cap: the time the touch wrote (read before Redis's time left) plus that time left.
_EXPIRE_FROM = "UPDATE core.sessions SET expires_at = %s + %s * interval '1 millisecond' WHERE session_id = %s"
_FLAG_PENDING = """
UPDATE core.sessions SET metadata = metadata || '{"mcp_redis_pending": true}'::jsonb WHERE session_id = %s
"""
_END = """
UPDATE core.sessions SET is_active = false, metadata = metadata - 'mcp_redis_pending'
WHERE session_id = %s AND is_active RETURNING expires_at > now()
"""
# An ended, expired row flagged for replay: Redis forgets the key once reachable.
_TOMBSTONE = """
UPDATE core.sessions SET is_active = false, expires_at = LEAST(expires_at, now()),
    metadata = metadata || '{"mcp_redis_pending": true}'::jsonb
WHERE session_id = %s
"""
_FOR_AGENT = """
SELECT s.session_id FROM core.sessions s JOIN core.identities i USING (identity_id)
WHERE i.agent_id = %s AND s.is_active AND s.expires_at > now()
"""
_PREFIX = """
SELECT i.agent_id FROM core.sessions s JOIN core.identities i USING (identity_id)
WHERE left(i.agent_id, char_length(%s)) = %s AND s.is_active AND s.expires_at > now()
GROUP BY i.agent_id ORDER BY i.agent_id COLLATE "C" LIMIT %s
"""
_ALL = 'SELECT s.session_id FROM core.sessions s WHERE s.is_active AND s.expires_at > now() ORDER BY s.session_id COLLATE "C"'
_PENDING_ROWS = """
SELECT s.session_id, i.agent_id, s.is_active, ceil(extract(epoch FROM s.expires_at - now()) * 1000)::bigint,
    """ + _RECORD + """
FROM core.sessions s JOIN core.identities i USING (identity_id)
WHERE (s.metadata ->> 'mcp_redis_pending') = 'true'
ORDER BY s.session_id LIMIT %s FOR UPDATE OF s SKIP LOCKED
"""
_CLEAR_PENDING = "UPDATE core.sessions SET metadata = metadata - 'mcp_redis_pending' WHERE session_id = ANY(%s)"


# The adapter's own metadata keys (mcp_redis_pending, mcp_redis_bind_count) start with this:
# never a caller field, never read as one.
_OWN_PREFIX = "mcp_redis_"


def _readable(name: str, value: Any) -> bool:
    """Whether a key of a row's ``metadata`` reads as a record field: the server's own rows may
    hold names no record field can have (a control character), or a secret (an ``api_key``),
    which never goes into a binding. Those stay in the row, out of the record."""
    if name.startswith(_OWN_PREFIX):
        return False
    try:
        check_fields({name: value})
    except (InvalidArgument, InvalidArgumentType):
        return False
    return True


def _bind_count(meta: Dict[str, Any]) -> int:
    count = meta.get("mcp_redis_bind_count")
    return count if isinstance(count, int) and not isinstance(count, bool) and 1 <= count < 10**18 else 1


# Caller fields that are columns of their own: a key of that name in a row's metadata (another
# writer's) must not hide the column.
_COLUMN_FIELDS = ("client_type", "client_info")


def _data(cols: Sequence[Any]) -> RecordData:
    """The record from the columns of `_RECORD` (created_at, last_active, client_type, client_info, metadata)."""
    created, last, ctype, cinfo, meta = cols
    fields: Dict[str, Any] = {}
    if ctype is not None:
        fields["client_type"] = ctype
    if cinfo and _readable("client_info", cinfo):
        fields["client_info"] = cinfo
    meta = dict(meta) if isinstance(meta, dict) else {}  # JSONB: another writer may leave "x", 5, [1]
    count = _bind_count(meta)
    fields.update((k, v) for k, v in meta.items() if k not in _COLUMN_FIELDS and _readable(k, v))
    packed = "\x1e".join(f"{k}\x1e{json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
                         for k, v in fields.items())
    return RecordData(int(created), count, int(last), packed)


def _columns(fields: Dict[str, Any]) -> Dict[str, Any]:
    """Caller fields as statement parameters: client_type, client_info, the rest as metadata."""
    for name in fields:
        if name.startswith(_OWN_PREFIX):
            raise InvalidArgument(name, "is kept by the legacy adapter in core.sessions.metadata; "
                                        "it cannot be set by the caller")
    rest = dict(fields)
    ctype = rest.pop("client_type", None)
    if ctype is not None and not isinstance(ctype, str):
        raise InvalidArgument("client_type", "must be a str or None here (core.sessions.client_type is TEXT)")
    has_cinfo = "client_info" in rest
    cinfo = rest.pop("client_info", None)
    return {"has_ctype": "client_type" in fields, "ctype": ctype, "has_cinfo": has_cinfo,
            "cinfo": json.dumps(cinfo if cinfo is not None else {}), "meta": json.dumps(rest)}


def _key_of(session_id: str) -> Optional[str]:
    """The session key whose `encode_id` form a row's ``session_id`` is, or None: the server's own
    ids are plain (its UUIDs), but one of its clients may have chosen an id that merely looks
    encoded (a leading ``~``), which no session key of the store addresses; it is not listed
    (before, it broke the whole listing, or was listed as another key)."""
    try:
        key = validate_id(decode_id(session_id), "session_key")  # "~" decodes to "", which no call takes
    except ValueError:  # binascii.Error, UnicodeDecodeError and InvalidArgument included
        return None
    return key if encode_id(key) == session_id else None


def _legacy_text(agent_id: str) -> bool:
    """Whether `agent_id` can be a legacy TEXT id (no NUL, valid UTF-8)."""
    if "\x00" in agent_id:
        return False
    try:
        agent_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LegacySessionsSource:
    """The `mcp_redis.sessions.Source` verbs over ``core.sessions`` + ``core.identities``.

    `register`: called as ``register(cursor, agent_id)`` inside the binding's
    transaction for an agent without a ``core.identities`` row, returns its new
    ``identity_id``; None (the default) refuses such agents with `InvalidArgument`.
    """

    def __init__(self, pg: Postgres, register: Optional[Register] = None) -> None:
        self.pg = pg
        self.register = register

    @classmethod
    def factory(cls, register: Optional[Register] = None) -> Callable[[Client], LegacySessionsSource]:
        """For `mcp_redis.sessions.use_source`: one source per client, on the client's pool."""
        return lambda client: cls(client.postgres(), register)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.pg.ensure_schema()  # the library's own tables (locks, limits) in its schema
        return self.pg.policy.call(fn, *args)

    def _identity(self, cur: Any, agent_id: str) -> int:
        if _legacy_text(agent_id):
            cur.execute(_IDENTITY, (agent_id,))
            row = cur.fetchone()
            if row is not None:
                return int(row[0])
            if self.register is not None:
                return self.register(cur, agent_id)
        raise InvalidArgument(
            "agent_id", "is not an agent of the legacy server (no core.identities row); register it there first")

    # -- reads ---------------------------------------------------------------------------------
    def load(self, session_key: str) -> Optional[Record]:
        row = self.pg.execute(_GET, (encode_id(session_key),), fetch="one")
        return None if row is None else Record(str(row[0]), int(row[1]), _data(row[2:]))

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        if not _legacy_text(agent_id):
            return []
        # Sorted by the keys themselves, not their stored (encoded) form: see PostgresBackend.sessions_for.
        keys = (_key_of(r[0]) for r in self.pg.execute(_FOR_AGENT, (agent_id,), fetch="all"))
        return sorted(k for k in keys if k is not None)[:limit]

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        if not _legacy_text(prefix):
            return []
        return [str(r[0]) for r in self.pg.execute(_PREFIX, (prefix, prefix, limit), fetch="all")]

    def session_keys(self) -> Iterator[str]:
        keys = [_key_of(r[0]) for r in self.pg.execute(_ALL, (), fetch="all")]
        return iter([k for k in keys if k is not None])

    # -- writes --------------------------------------------------------------------------------
    def touch_record(self, session_key: str, ttl_ms: int, pending: bool = False) -> Optional[str]:
        row = self.pg.execute(_TOUCH, (ttl_ms, pending, encode_id(session_key)), fetch="one")
        return None if row is None else str(row[0])

    def bind_through(self, session_key: str, agent_id: str, ttl_ms: int,
                     redis_write: Optional[Callable[[RecordData], None]], fields: str = "") -> bool:
        """Upsert the row (active, agent's identity, the record's columns) and write Redis while it is locked."""
        key = encode_id(session_key)
        params = _columns(unpack_fields(fields))
        meta = json.loads(params["meta"])
        meta["mcp_redis_bind_count"] = 1
        params.update(sid=key, ms=ttl_ms, pending=redis_write is None, meta=json.dumps(meta))

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                params["iid"] = self._identity(cur, agent_id)
                cur.execute(_BIND, params)
                row = cur.fetchone()
                if redis_write is None:
                    return False
                try:
                    assert row is not None
                    redis_write(_data(row[2:]))
                    return True
                except BackendUnavailable:
                    cur.execute(_FLAG_PENDING, (key,))
                    return False

        return bool(self._call(run))

    def update_through(self, session_key: str, fields: Dict[str, str],
                       redis_write: Optional[Callable[[str, int, RecordData], None]]) -> Optional[Record]:
        """Merge caller fields into the row's columns (one statement), then, row locked, Redis."""
        key = encode_id(session_key)
        params = _columns({k: json.loads(v) for k, v in fields.items()})
        params.update(sid=key, pending=redis_write is None)

        def run() -> Optional[Record]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_UPDATE, params)
                row = cur.fetchone()
                if row is None:
                    return None
                found = Record(str(row[0]), max(1, int(row[1])), _data(row[2:]))
                assert found.data is not None
                check_merged(found.data, fields)
                if redis_write is not None:
                    try:
                        redis_write(found.agent_id, found.ttl_ms, found.data)
                    except BackendUnavailable:
                        cur.execute(_FLAG_PENDING, (key,))
                return found

        result: Optional[Record] = self._call(run)
        return result

    def unbind_through(self, session_key: str, redis_unbind: Optional[Callable[[], bool]]) -> Tuple[bool, bool]:
        """End the row (``is_active = false``) and forget the Redis binding in the same transaction."""
        key = encode_id(session_key)

        def run() -> Tuple[bool, bool]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_END, (key,))
                row = cur.fetchone()
                existed = bool(row and row[0])
                if redis_unbind is not None:
                    try:
                        return (redis_unbind() or existed), True
                    except BackendUnavailable:
                        pass
                cur.execute(_TOMBSTONE, (key,))
                return existed, False

        result: Tuple[bool, bool] = self._call(run)
        return result

    def shorten_through(self, session_key: str, agent_id: str, ttl_ms: int,
                        redis_write: Callable[[], bool]) -> bool:
        """The row's expiry to `ttl_ms` first, then (row locked) Redis's; see `PostgresBackend`."""
        key = encode_id(session_key)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_TOUCH_AGENT, (ttl_ms, key, agent_id))
                had_row = cur.fetchone() is not None
                try:
                    return redis_write()
                except BackendUnavailable:
                    if not had_row:
                        raise
                    cur.execute(_FLAG_PENDING, (key,))
                    return True

        return bool(self._call(run))

    def extend(self, session_key: str, agent_id: str, ttl_ms: int, redis_left: Callable[[], Optional[int]]) -> None:
        """Slide the row's expiry, never past what Redis has left; see `PostgresBackend.extend`."""
        key = encode_id(session_key)

        def run() -> bool:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_TOUCH_AGENT, (ttl_ms, key, agent_id))
                row = cur.fetchone()
                if row is None:
                    return True
                try:
                    left = redis_left()
                except BackendUnavailable:
                    conn.rollback()
                    return False
                if left is not None and left <= ttl_ms:
                    cur.execute(_EXPIRE_FROM, (row[0], max(left, 0), key))
            return True

        if not self._call(run):  # the refresh is still to be made: the next touch tries again
            raise BackendUnavailable("redis: the binding's time left could not be read")

    def repair(self, session_key: str, write: Callable[[str, int, RecordData], None],
               extend_ms: Optional[int] = None) -> Optional[str]:
        """Read a live row (extended by `extend_ms` if given) and write Redis while it is locked."""
        key = encode_id(session_key)

        def run() -> Optional[str]:
            with self.pg.connection() as conn, conn.cursor() as cur:
                if extend_ms is None:
                    cur.execute(_GET + " FOR SHARE OF s", (key,))
                else:
                    cur.execute(_TOUCH, (extend_ms, False, key))
                row = cur.fetchone()
                if row is None:
                    return None
                agent_id = str(row[0])
                try:
                    write(agent_id, extend_ms if extend_ms is not None else max(1, int(row[1])), _data(row[2:]))
                except BackendUnavailable:
                    pass
                return agent_id

        result: Optional[str] = self._call(run)
        return result

    def replay(self, write_batch: Callable[[Sequence[Pending]], None], batch: int) -> int:
        """One batch of flagged rows to `write_batch` (rows locked), then clear their flags."""

        def run() -> int:
            with self.pg.connection() as conn, conn.cursor() as cur:
                cur.execute(_PENDING_ROWS, (batch,))
                rows = cur.fetchall()
                if not rows:
                    return 0
                items: List[Pending] = []
                for row in rows:
                    key, agent, active, ms = row[:4]
                    live = bool(active) and ms is not None and int(ms) > 0
                    items.append(Pending(decode_id(key), str(agent) if live else None, int(ms) if live else 0,
                                         _data(row[4:]) if live else None))
                write_batch(items)  # raises BackendUnavailable: rolled back, still flagged
                cur.execute(_CLEAR_PENDING, ([r[0] for r in rows],))
                return len(rows)

        return int(self._call(run))

    def cleanup_expired(self, batch: int) -> int:
        """Nothing: the legacy server's own cleanup owns ``core.sessions`` rows."""
        return 0
