"""Session → agent bindings shared by every process: Redis in front of PostgreSQL.

`SessionStore` replaces the legacy process-local ``_session_identities`` dict
(and its ``_uuid_prefix_index``). Where a binding lives depends on
``client.mode("sessions")`` (the store's client, else the default one) and
whether ``DATABASE_URL`` is set — a table, `_BY_MODE`, picks the backend once
per client:

* ``redis`` with ``DATABASE_URL``: write-through (`writethrough`). PostgreSQL
  ``<pg_schema>.sessions`` is the source of truth (written first); Redis is the fast
  path. A Redis miss reads PostgreSQL and repopulates Redis with the remaining
  TTL (read repair). While Redis is down, calls go to PostgreSQL and rows
  written then are flagged ``redis_pending``; a background replayer
  (`replay`, and `replay_pending`) writes them back to Redis when it returns.
* ``redis`` alone (`redis`): Redis only. Nothing already in Redis is lost by
  an outage, but `bind` raises `BackendUnavailable` until Redis is back. A
  binding never lives in a process-local dict in this mode.
* ``postgres`` (`postgres`): PostgreSQL only. ``local`` (`memory`): an
  in-process `TTLStore` (the single-host legacy behaviour). ``off``: every
  call raises `FeatureDisabled`.

The package: `base` (the `Backend` protocol every backend implements, the
`Source` protocol of a source of truth, the named types between them),
`redis` (the Redis tier: keys and scripts; the Redis-only backend),
`directory` (the prefix index of bound agents), `agents` (`AgentDirectory`: the
prefix index of registered agents, session or not), `postgres`, `memory`,
`writethrough` (Redis + a `Source`; `use_source` picks another source than
`PostgresBackend`, e.g. ``examples/legacy_sessions.py``), `replay` (the outage
replayer, one per client). Redis layout (prefix ``mcp:``): see
`mcp_redis.sessions.redis`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, ItemsView, Iterator, List, Mapping, MutableMapping, Optional, Tuple, ValuesView

from ..client import Client, resolve
from ..config import Mode
from ..errors import ConfigurationError, FeatureDisabled, InvalidArgument, InvalidArgumentType
from ..keys import MAX_ID_LENGTH, KeySpace, validate_id
from ..metrics import METRICS
from ..validation import MAX_SECONDS, optional_seconds, seconds
from .agents import AgentDirectory
from .base import MAX_REFRESH_INTERVAL, Backend, Pending, Record, Source, Timing, Touched
from .directory import pick
from .memory import MemoryBackend
from .postgres import PostgresBackend
from .records import AGENT_FIELD, LIBRARY_FIELDS, MAX_FIELDS_BYTES, RecordData, as_dict, check_fields, pack_fields
from .redis import RedisBackend, RedisTier
from .writethrough import WriteThroughBackend

__all__ = [
    "SessionStore", "SessionMap", "AgentDirectory", "cleanup_expired", "replay_pending", "use_source",
    "Backend", "Source", "Timing", "Record", "Touched", "Pending",
    "RedisBackend", "PostgresBackend", "MemoryBackend", "WriteThroughBackend", "MAX_REFRESH_INTERVAL",
    "RecordData", "MAX_FIELDS_BYTES",
]

MAX_CANDIDATES = 10
_OFF = "sessions: backend is 'off' (MCP_REDIS_SESSIONS_BACKEND)"
MAX_TTL = MAX_SECONDS  # ten years; beyond this a "session" is a configuration mistake


def _ttl_ms(ttl: object, default: float) -> int:
    """`ttl` in seconds (None: `default`) as whole milliseconds, validated."""
    return max(1, int(round(seconds(default if ttl is None else ttl, "ttl") * 1000)))


class OffBackend:
    """``off``: every verb, even the default ttl, raises `FeatureDisabled` (maintenance: 0)."""

    mode = "off"

    @property
    def default_ttl(self) -> float:
        raise FeatureDisabled(_OFF)

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None:
        raise FeatureDisabled(_OFF)

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        raise FeatureDisabled(_OFF)

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]:
        raise FeatureDisabled(_OFF)

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]:
        raise FeatureDisabled(_OFF)

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        raise FeatureDisabled(_OFF)

    def unbind(self, session_key: str) -> bool:
        raise FeatureDisabled(_OFF)

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        raise FeatureDisabled(_OFF)

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        raise FeatureDisabled(_OFF)

    def session_keys(self) -> Iterator[str]:
        raise FeatureDisabled(_OFF)

    def replay_pending(self) -> int:
        return 0

    def cleanup_expired(self, batch: int) -> int:
        return 0

    def close(self) -> None:
        pass


# -- mode -> backend, per client ------------------------------------------------------------------
def _tier(client: Client) -> RedisTier:
    return RedisTier(client.redis("sessions"), KeySpace(client.settings.key_prefix))


def _ttl(client: Client) -> float:
    return float(client.settings.session_ttl)


class _SourceChoice:
    """The client's source of truth for write-through (None: the library's own table)."""

    def __init__(self) -> None:
        self.factory: Optional[Callable[[Client], Source]] = None


_SOURCE = "sessions.source"


def _source(client: Client) -> Source:
    """The write-through source: `use_source`'s factory, else `PostgresBackend`."""
    chosen = client.singleton(_SOURCE, _SourceChoice).factory
    return chosen(client) if chosen is not None else PostgresBackend(client.postgres(), _ttl(client))


def use_source(factory: Optional[Callable[[Client], Source]], *, client: Optional[Client] = None) -> None:
    """Make `factory(client)` the source of truth behind Redis (write-through mode) for `client`.

    For an adapter over a legacy server's own tables (``examples/legacy_sessions.py``);
    None restores the library's own table. Call it before the client's first
    sessions call (the backend is built once per client): afterwards it raises
    `ConfigurationError` rather than switch sources under live bindings.
    ``configure()`` builds a new default client, so call it again after that.
    """
    if factory is not None and not callable(factory):
        raise InvalidArgumentType("factory", f"must be callable, not {type(factory).__name__}")
    c = resolve(client)
    if c.peek(_BACKEND) is not None:
        raise ConfigurationError("sessions: use_source() must run before the client's first sessions call")
    c.singleton(_SOURCE, _SourceChoice).factory = factory


# (mode, DATABASE_URL set) -> the backend; Redis with a database is write-through.
_BY_MODE: Dict[Tuple[Mode, bool], Callable[[Client], Backend]] = {
    (Mode.REDIS, True): lambda c: WriteThroughBackend(_tier(c), _source(c), _ttl(c)),
    (Mode.REDIS, False): lambda c: RedisBackend(_tier(c), _ttl(c)),
    (Mode.POSTGRES, True): lambda c: PostgresBackend(c.postgres(), _ttl(c)),
    (Mode.POSTGRES, False): lambda c: PostgresBackend(c.postgres(), _ttl(c)),
    (Mode.LOCAL, True): lambda c: MemoryBackend(_ttl(c)),
    (Mode.LOCAL, False): lambda c: MemoryBackend(_ttl(c)),
    (Mode.OFF, True): lambda c: OffBackend(),
    (Mode.OFF, False): lambda c: OffBackend(),
}
_BACKEND = "sessions.backend"


def _build(client: Client) -> Backend:
    return _BY_MODE[client.mode("sessions"), bool(client.settings.database_url)](client)


def _current(client: Optional[Client] = None) -> Backend:
    """The client's sessions backend (one per client: `Client.singleton`; closed with it)."""
    c = resolve(client)
    return c.singleton(_BACKEND, lambda: _build(c))


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
        self.sliding = bool(sliding)
        self._timing = Timing(ttl, refresh_interval)
        # None: the default client, resolved at each call (follows configure()).
        self.client = client

    @property
    def ttl(self) -> Optional[float]:
        return self._timing.ttl

    @property
    def refresh_interval(self) -> Optional[float]:
        return self._timing.refresh_interval

    def __repr__(self) -> str:
        return f"SessionStore(ttl={self.ttl!r}, sliding={self.sliding!r})"

    # -- the contract --------------------------------------------------------------------------------
    def _ttl_ms(self, ttl: object, backend: Backend) -> int:
        default = backend.default_ttl  # off: raises FeatureDisabled before ttl is judged
        return _ttl_ms(ttl, self._timing.ttl if self._timing.ttl is not None else default)

    def bind(self, session_key: str, agent_id: str, ttl: Optional[float] = None, **fields: Any) -> None:
        """Bind `session_key` to `agent_id` for `ttl` seconds (replacing any binding and its record).

        `fields` are the record's caller fields (JSON values, e.g.
        ``client_type="sse"``); the library keeps ``bound_at``, ``last_active``
        and ``bind_count`` (binds of this key while it was bound, plus one).
        A secret-like name (``api_key``, ``token``, ``password``, ...), a
        library-kept name or more than `MAX_FIELDS_BYTES` packed raise
        `InvalidArgument` naming the field, before anything is written.
        """
        validate_id(session_key, "session_key")
        validate_id(agent_id, "agent_id")
        packed = pack_fields(check_fields(fields)) if fields else ""
        backend = _current(self.client)
        ttl_ms = self._ttl_ms(ttl, backend)
        METRICS.inc("session_bind_total", mode=backend.mode)
        backend.bind(session_key, agent_id, ttl_ms, self._timing, packed)

    def record(self, session_key: str) -> Optional[Dict[str, Any]]:
        """The binding's record, or None: ``bound_agent_id``, ``bound_at``, ``bind_count``,
        ``last_active`` (whole epoch seconds) and the caller's fields. One GET in Redis modes;
        a copy: change it with `update`."""
        validate_id(session_key, "session_key")
        found = _current(self.client).record(session_key)
        return None if found is None else as_dict(found[0], found[1])

    def update(self, session_key: str, **fields: Any) -> Optional[Dict[str, Any]]:
        """Merge `fields` into the binding's record, atomically; returns the new record (None: not bound).

        One Lua script in Redis, one statement in PostgreSQL (write-through:
        PostgreSQL first, then Redis takes its result), one locked step in
        memory: concurrent updates of different fields from any process all
        land. ``last_active`` becomes now; the expiry and the agent stay.
        Same checks as `bind`; the merged fields are at most `MAX_FIELDS_BYTES`.
        """
        validate_id(session_key, "session_key")
        if not fields:
            return self.record(session_key)
        encoded = check_fields(fields)
        pack_fields(encoded)
        found = _current(self.client).update(session_key, encoded)
        return None if found is None else as_dict(found[0], found[1])

    def get(self, session_key: str) -> Optional[str]:
        """The agent bound to `session_key`, or None (unknown or expired)."""
        if self.sliding:
            return self.touch(session_key)
        if type(session_key) is not str or not 0 < len(session_key) <= MAX_ID_LENGTH:
            validate_id(session_key, "session_key")  # raises, naming the argument
        return _current(self.client).get(session_key, self._timing)

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
        backend = _current(self.client)
        return backend.touch(session_key, self._ttl_ms(ttl, backend), self._timing)

    def unbind(self, session_key: str) -> bool:
        """Remove the binding of `session_key`; True if there was one."""
        validate_id(session_key, "session_key")
        return _current(self.client).unbind(session_key)

    def sessions_for(self, agent_id: str, *, limit: int = 10_000) -> List[str]:
        """The session keys bound to `agent_id` now (sorted), from an index — never a SCAN.

        With PostgreSQL configured its index answers (complete even after Redis
        lost its data; with PostgreSQL down the Redis index answers); otherwise
        the agent's Redis index, verified against the bindings.
        """
        validate_id(agent_id, "agent_id")
        _check_limit(limit, "limit")
        return _current(self.client).sessions_for(agent_id, limit)

    def resolve_agent_prefix(self, prefix: str, *, max_candidates: int = MAX_CANDIDATES) -> Optional[str]:
        """The agent id that `prefix` names (a bound agent's id starting with it), or None.

        An id equal to `prefix` wins; two or more others raise `AmbiguousPrefix`
        listing at most `max_candidates` of them. When no bound agent matches,
        the `AgentDirectory` answers for registered agents (a 12-character
        prefix, ``agent-<prefix12>``, or a whole registered id), live session
        or not.
        """
        validate_id(prefix, "prefix")
        _check_limit(max_candidates, "max_candidates")
        found = pick(_current(self.client).agents_with_prefix(prefix, max_candidates + 1), prefix, max_candidates)
        if found is None:
            found = AgentDirectory(client=self.client).resolve(prefix)
        return found

    def mapping(self) -> SessionMap:
        """A `MutableMapping` of records for legacy code that used the dict of dicts."""
        return SessionMap(self)

    def session_keys(self) -> Iterator[str]:
        """Every bound session key. O(all sessions); a SCAN in Redis-only mode."""
        return _current(self.client).session_keys()

    def replay_pending(self) -> int:
        """Write bindings made while Redis was down back to Redis now; returns the count."""
        return _current(self.client).replay_pending()

    def cleanup_expired(self, batch_size: int = 10_000) -> int:
        """Delete expired PostgreSQL rows; returns the count (see `cleanup_expired`)."""
        _check_limit(batch_size, "batch_size")
        return _current(self.client).cleanup_expired(batch_size)


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
    """Delete expired rows of ``<pg_schema>.sessions`` (not needed for correctness).

    Pending rows are replayed to Redis first. Returns the number deleted;
    0 when no PostgreSQL tier is configured. Meant for cron / the CLI.
    """
    _check_limit(batch_size, "batch_size")
    return _current().cleanup_expired(batch_size)


class SessionMap(MutableMapping[str, Dict[str, Any]]):
    """The legacy dict of records: ``m[key]`` (a record dict), ``m[key] = {...}``, ``del m[key]``, ``key in m``.

    A view over a `SessionStore` for code written against the legacy
    ``_session_identities`` dict: ``m[key].get('bound_agent_id')`` reads the
    agent. ``m[key] = {'bound_agent_id': aid, 'client_type': ...}`` binds
    with those caller fields (library-kept names are ignored: the library
    keeps them); ``m[key] = aid`` binds without fields. A record read here is
    a copy: in-place mutation (``m[key]['client_type'] = ...``) changes
    nothing shared — call ``store.update(key, client_type=...)`` instead.
    Iteration and ``len()`` visit every session (a SCAN in Redis-only mode):
    fine for tools, not for request paths; ``items()`` and ``values()`` pass
    over a session unbound (or expired) while they run. Reading or deleting
    a key no session can have (not a str, empty, too long) answers as a
    dict does, missing; binding one raises naming the argument.
    """

    def __init__(self, store: Optional[SessionStore] = None) -> None:
        self.store = store if store is not None else SessionStore()

    def __repr__(self) -> str:
        return f"SessionMap({self.store!r})"

    def __getitem__(self, session_key: str) -> Dict[str, Any]:
        key = _possible_key(session_key)
        if key is None:
            raise KeyError(session_key)  # as a dict answers (`get`, `pop`, `in` build on this)
        record = self.store.record(key)
        if record is None:
            raise KeyError(session_key)
        return record

    def __setitem__(self, session_key: str, value: Any) -> None:
        if isinstance(value, str):
            self.store.bind(session_key, value)
            return
        if not isinstance(value, Mapping):
            raise InvalidArgumentType("value", f"must be an agent id or a record dict, not {type(value).__name__}")
        if AGENT_FIELD not in value:
            raise InvalidArgument(AGENT_FIELD, "a record assigned to a session must name its agent")
        bad = next((k for k in value if not isinstance(k, str)), None)
        if bad is not None:
            raise InvalidArgumentType("value", f"a record's field names must be str, not {type(bad).__name__}")
        fields = {k: v for k, v in value.items() if k not in LIBRARY_FIELDS}
        self.store.bind(session_key, value[AGENT_FIELD], **fields)

    def __delitem__(self, session_key: str) -> None:
        key = _possible_key(session_key)
        if key is None or not self.store.unbind(key):
            raise KeyError(session_key)

    def __contains__(self, session_key: object) -> bool:
        key = _possible_key(session_key)
        return key is not None and self.store.get(key) is not None  # an impossible key: False, as in a dict

    def items(self) -> ItemsView[str, Dict[str, Any]]:
        return _LiveItems(self)

    def values(self) -> ValuesView[Dict[str, Any]]:
        return _LiveValues(self)

    def __iter__(self) -> Iterator[str]:
        return self.store.session_keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.store.session_keys())


def _possible_key(session_key: object) -> Optional[str]:
    """`session_key` if it could name a session (`validate_id` takes it), else None."""
    try:
        return validate_id(session_key, "session_key")
    except (InvalidArgument, InvalidArgumentType):
        return None


class _LiveItems(ItemsView[str, Dict[str, Any]]):
    """`SessionMap.items()`: a session unbound or expired between the listing of the keys and
    the read of its record is passed over (the legacy scan met a raw KeyError there)."""

    _mapping: SessionMap

    def __iter__(self) -> Iterator[Tuple[str, Dict[str, Any]]]:
        for key in self._mapping:
            try:
                yield key, self._mapping[key]
            except KeyError:
                continue


class _LiveValues(ValuesView[Dict[str, Any]]):
    """`SessionMap.values()`, passing over sessions gone meanwhile (see `_LiveItems`)."""

    _mapping: SessionMap

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for _, record in _LiveItems(self._mapping):
            yield record
