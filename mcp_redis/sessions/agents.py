"""The agent directory: the legacy ``_uuid_prefix_index``, independent of session liveness.

`AgentDirectory.register(agent_id)` makes the agent's 12-character prefix
(``agent_id[:12]``, the legacy server's UUID prefix) and its key form
``agent-<prefix12>`` resolve to it until `unregister` — whether or not the
agent has a live session (the prefix index of `mcp_redis.sessions.directory`
only knows agents with one).

Collision rule (the legacy server's): **the first agent registered under a
prefix keeps it**; registering another agent with the same prefix changes
nothing and returns the holder, so a prefix never silently moves to another
agent. `unregister` of the holder frees it.

Where entries live, by ``client.mode("sessions")`` and ``DATABASE_URL``:

* with a database (``redis`` + ``DATABASE_URL``, ``postgres``): PostgreSQL
  table ``<pg_schema>.agent_directory`` is the record (first wins by its
  primary key); Redis (``redis`` mode) holds ``mcp:agent_prefix:<prefix>``
  as a cache with a TTL (`COPY_TTL`, an hour), rebuilt from PostgreSQL on a miss —
  so a Redis FLUSHDB loses nothing;
* ``redis`` without a database: the Redis key only, written ``NX`` (first
  wins) with a TTL of `CACHE_TTL` renewed by each `register` — a registration
  lasts while the agent keeps registering (the legacy server registers on
  every identity resolution);
* ``local``: an in-process dict; ``off``: `FeatureDisabled`.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

from ..client import Client, resolve
from ..config import Mode
from ..errors import BackendUnavailable, FeatureDisabled, InvalidArgumentType
from ..keys import KeySpace, decode_id, encode_id, validate_id
from ..postgres import DEFAULTED, PRIMARY_KEYS, SCHEMA, SHAPES

__all__ = ["AgentDirectory", "PREFIX_LENGTH", "KEY_FORM", "CACHE_TTL", "COPY_TTL"]

PREFIX_LENGTH = 12  # the legacy server's uuid_prefix: agent_uuid[:12]
KEY_FORM = "agent-"  # the legacy session key form: "agent-" + uuid_prefix
CACHE_TTL = 7 * 24 * 3600  # seconds a Redis entry lives without a database (renewed by each register)
# With PostgreSQL the Redis entry is a copy, rebuilt from the record on a miss: an hour bounds how
# long a copy whose write reached Redis after the writer gave up on it (a link slower than the
# socket timeout) can outlive an unregister.
COPY_TTL = 3600

SCHEMA.append("""
    CREATE TABLE IF NOT EXISTS {schema}.agent_directory (
        prefix        TEXT PRIMARY KEY,             -- keys.encode_id(agent_id[:12])
        agent_id      TEXT NOT NULL,                -- keys.encode_id(agent id)
        registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
""")
SHAPES["agent_directory"] = {"prefix": "text", "agent_id": "text", "registered_at": "timestamptz"}
PRIMARY_KEYS["agent_directory"] = ("prefix",)
DEFAULTED["agent_directory"] = frozenset({"registered_at"})

_PG_REGISTER = """
WITH ins AS (
    INSERT INTO {schema}.agent_directory (prefix, agent_id) VALUES (%s, %s)
    ON CONFLICT (prefix) DO NOTHING RETURNING agent_id)
SELECT agent_id FROM ins UNION ALL SELECT agent_id FROM {schema}.agent_directory WHERE prefix = %s
LIMIT 1
"""
_PG_LOOKUP = "SELECT agent_id FROM {schema}.agent_directory WHERE prefix = %s"
# With Redis in front: the record's row stays share-locked until Redis has its copy, so an
# unregister (its DELETE waits for the lock) always removes that copy after it is written.
_PG_INSERT = "INSERT INTO {schema}.agent_directory (prefix, agent_id) VALUES (%s, %s) ON CONFLICT (prefix) DO NOTHING"
_PG_LOOKUP_LOCKED = _PG_LOOKUP + " FOR SHARE"
_PG_UNREGISTER = "DELETE FROM {schema}.agent_directory WHERE prefix = %s AND agent_id = %s"
_OFF = "sessions: backend is 'off' (MCP_REDIS_SESSIONS_BACKEND)"
_LOCAL = "sessions.agent_directory.local"


def prefix_of(agent_id: str) -> str:
    """The directory's key of `agent_id`: its first 12 characters (the whole id if shorter)."""
    return agent_id[:PREFIX_LENGTH]


def _wanted(text: str) -> str:
    """The id or prefix a lookup names: ``agent-<prefix12>`` stands for ``<prefix12>``."""
    if text.startswith(KEY_FORM) and len(text) == len(KEY_FORM) + PREFIX_LENGTH:
        return text[len(KEY_FORM):]
    return text


class _Local:
    """``local`` mode: the directory of this process (first wins, like the others)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_prefix: Dict[str, str] = {}


class AgentDirectory:
    """Prefix → agent id for every registered agent (see the module doc). Thread-safe, cheap to create."""

    def __init__(self, *, client: Optional[Client] = None) -> None:
        if client is not None and not isinstance(client, Client):
            raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
        self.client = client

    def __repr__(self) -> str:
        return "AgentDirectory()"

    def register(self, agent_id: str) -> str:
        """Register `agent_id` under its prefix; returns the agent that holds the prefix
        (`agent_id`, or the agent registered first under it)."""
        validate_id(agent_id, "agent_id")
        c = resolve(self.client)
        prefix = prefix_of(agent_id)
        mode, pg = self._where(c)
        if mode is Mode.LOCAL:
            local = c.singleton(_LOCAL, _Local)
            with local.lock:
                return local.by_prefix.setdefault(prefix, agent_id)
        if pg and mode is Mode.REDIS:  # PostgreSQL decides, Redis caches its answer
            return self._register_cached(c, prefix, agent_id)
        if pg:  # postgres mode: the record alone
            p = c.postgres()
            row = p.execute(p.sql(_PG_REGISTER), (encode_id(prefix), encode_id(agent_id), encode_id(prefix)),
                            fetch="one")
            return decode_id(row[0])
        # Redis alone decides: first wins, each register renews the holder's entry. One SET NX GET:
        # a SET NX, then a GET, answered "registered" with nothing stored when the holder was
        # unregistered (or expired) between the two (a reviewer).
        conn = c.redis("sessions")
        key = self._key(c, prefix)
        ttl_ms = CACHE_TTL * 1000
        old: Optional[str] = conn.policy.call(conn.client.set, key, agent_id, px=ttl_ms, nx=True, get=True)
        if old is None:
            return agent_id
        if old == agent_id:
            conn.policy.call(conn.client.pexpire, key, ttl_ms)
        return old

    def _register_cached(self, c: Client, prefix: str, agent_id: str) -> str:
        """The record decides (first wins by its primary key); Redis gets the holder while the
        record's row is share-locked, so an unregister meanwhile removes the copy after it."""
        p = c.postgres()
        conn = c.redis("sessions")
        key = self._key(c, prefix)

        def run() -> str:
            with p.connection() as pg_conn, pg_conn.cursor() as cur:
                for _ in range(5):  # the holder may be unregistered between the two statements
                    cur.execute(p.sql(_PG_INSERT), (encode_id(prefix), encode_id(agent_id)))
                    cur.execute(p.sql(_PG_LOOKUP_LOCKED), (encode_id(prefix),))
                    row = cur.fetchone()
                    if row is not None:
                        break
                else:
                    raise BackendUnavailable("agent directory: the prefix changed hands repeatedly; try again")
                holder = decode_id(row[0])
                try:  # one attempt: the row stays locked no longer than one socket timeout
                    conn.policy.call(conn.client.set, key, holder, px=COPY_TTL * 1000, attempts=1)
                except BackendUnavailable:
                    pass  # the record decided; a miss rebuilds the copy
                return holder

        p.ensure_schema()
        result: str = p.policy.call(run)
        return result

    def unregister(self, agent_id: str) -> bool:
        """Forget `agent_id` (the agent was deleted): its prefix is free again. True if it held it.

        With PostgreSQL and Redis, the record goes first, then Redis's copy; when Redis does not
        answer, `BackendUnavailable` says the copy may still resolve: call it again once Redis
        answers (the record is gone already, so the retry returns True only through Redis)."""
        validate_id(agent_id, "agent_id")
        c = resolve(self.client)
        prefix = prefix_of(agent_id)
        mode, pg = self._where(c)
        if mode is Mode.LOCAL:
            local = c.singleton(_LOCAL, _Local)
            with local.lock:
                if local.by_prefix.get(prefix) != agent_id:
                    return False
                del local.by_prefix[prefix]
                return True
        held = False
        if pg:
            p = c.postgres()
            held = bool(p.execute(p.sql(_PG_UNREGISTER), (encode_id(prefix), encode_id(agent_id))))
        if mode is Mode.REDIS:
            conn = c.redis("sessions")
            key = self._key(c, prefix)
            try:
                # Compare-and-delete in one script (session_forget.lua: DEL only while the key holds
                # this agent): a GET then a DEL deleted another agent's registration made between
                # the two, which Redis alone cannot rebuild (a reviewer).
                forgot = conn.call(conn.script("session_forget"), keys=[key], args=[agent_id], client=conn.client)
                held = bool(forgot) or held
            except BackendUnavailable as exc:
                if not pg:
                    raise
                # The record is gone but Redis's copy (7 days) would still resolve once Redis
                # is back: the caller must know, and call again.
                raise BackendUnavailable(
                    f"unregister: the PostgreSQL record of the agent is gone, but Redis did not answer "
                    f"and may still resolve it: call unregister again once Redis answers ({exc})") from exc
        return held

    def resolve(self, text: str) -> Optional[str]:
        """The registered agent that `text` names, or None.

        `text` is a 12-character prefix, its key form ``agent-<prefix12>``, or
        a whole registered id (shorter ids are their own prefix).
        """
        validate_id(text, "text")
        c = resolve(self.client)
        wanted = _wanted(text)
        if wanted != text:  # "agent-<12>": a prefix's key form, or a whole id of that shape
            holder = self._holder(c, prefix_of(text))
            if holder == text:
                return holder  # a whole registered id resolves to itself, whatever its shape
        prefix = prefix_of(wanted)
        holder = self._holder(c, prefix)
        if holder is None or (len(wanted) > PREFIX_LENGTH and holder != wanted):
            return None
        if len(wanted) < PREFIX_LENGTH and holder != wanted:
            return None
        return holder

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _where(c: Client) -> Tuple[Mode, bool]:
        mode = c.mode("sessions")
        if mode is Mode.OFF:
            raise FeatureDisabled(_OFF)
        # postgres mode always has a record (without DATABASE_URL: the same ConfigurationError as SessionStore).
        return mode, mode is Mode.POSTGRES or (mode is Mode.REDIS and bool(c.settings.database_url))

    @staticmethod
    def _key(c: Client, prefix: str) -> str:
        return KeySpace(c.settings.key_prefix).key("agent_prefix", prefix)

    def _holder(self, c: Client, prefix: str) -> Optional[str]:
        mode, pg = self._where(c)
        if mode is Mode.LOCAL:
            local = c.singleton(_LOCAL, _Local)
            with local.lock:
                return local.by_prefix.get(prefix)
        if mode is Mode.REDIS:
            conn = c.redis("sessions")
            key = self._key(c, prefix)
            try:
                cached: Optional[str] = conn.policy.call(conn.client.get, key)
                if cached is not None or not pg:
                    return cached
            except BackendUnavailable:
                if not pg:
                    raise
        p = c.postgres()
        if mode is not Mode.REDIS:
            row = p.execute(p.sql(_PG_LOOKUP), (encode_id(prefix),), fetch="one")
            return None if row is None else decode_id(row[0])
        conn = c.redis("sessions")
        key = self._key(c, prefix)

        def repair() -> Optional[str]:  # rebuild the copy (after a FLUSHDB, or its TTL), row locked
            with p.connection() as pg_conn, pg_conn.cursor() as cur:
                cur.execute(p.sql(_PG_LOOKUP_LOCKED), (encode_id(prefix),))
                row = cur.fetchone()
                if row is None:
                    return None
                holder = decode_id(row[0])
                try:  # one attempt, as in register
                    conn.policy.call(conn.client.set, key, holder, px=COPY_TTL * 1000, nx=True, attempts=1)
                except BackendUnavailable:
                    pass
                return holder

        p.ensure_schema()
        found: Optional[str] = p.policy.call(repair)
        return found
