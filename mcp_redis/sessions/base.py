"""The sessions backend protocol and the named types passed between front and backends.

`Backend` is what `SessionStore` calls: one object per client and mode
(`mcp_redis.sessions._BY_MODE`), each verb with the same signature in every
implementation. `Source` is the narrower protocol of a *source of truth*
behind the Redis tier in write-through mode (today `PostgresBackend` over
``<pg_schema>.sessions``; an adapter over a legacy server's own tables implements the
same verbs): load a record by session key, write / expire / unbind it, list
by agent, and the transactional ``*_through`` verbs that write Redis while
the record is locked.
"""


from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple

from .records import RecordData

__all__ = ["Backend", "Source", "Timing", "Record", "Touched", "Pending", "MAX_REFRESH_INTERVAL"]

MAX_REFRESH_INTERVAL = 300.0  # seconds: PostgreSQL expiry refreshed at most this often on touch


class Timing(NamedTuple):
    """A store's own timing settings (None: the client's default / derived)."""

    ttl: Optional[float]
    refresh_interval: Optional[float]

    def refresh_interval_for(self, ttl_s: float) -> float:
        """How often a touch rewrites PostgreSQL and the indexes: never less often than once per ttl."""
        if self.refresh_interval is not None:
            return min(self.refresh_interval, ttl_s)
        return min(MAX_REFRESH_INTERVAL, ttl_s / 4.0)

    def grace_ms(self, ttl_s: float) -> int:
        """How long an index entry outlives its binding's horizon (one refresh interval), in ms."""
        return int(self.refresh_interval_for(ttl_s) * 1000)


class Record(NamedTuple):
    """A live binding read from a source of truth: the agent, the ms it has left, its record."""

    agent_id: str
    ttl_ms: int
    data: Optional[RecordData] = None


class Touched(NamedTuple):
    """A write-through touch's answer from Redis: the agent, whether the new ttl is shorter,
    the bind the binding is, (``bound_at``, ``bind_count``) (None: a bare agent id), and the
    ms the binding had left before the touch (None: no expiry)."""

    agent_id: str
    shorter: bool
    bind: Optional[Tuple[int, int]] = None
    left_ms: Optional[int] = None


class Pending(NamedTuple):
    """A row written while Redis was down: replay binds it (agent_id None: forget the key)."""

    session_key: str
    agent_id: Optional[str]
    ttl_ms: int
    data: Optional[RecordData] = None


class Backend(Protocol):
    """The verbs every sessions backend offers (Redis, write-through, PostgreSQL, memory, off).

    Arguments are validated by the front; `ttl_ms` is whole milliseconds.
    `mode` labels metrics (the setting's value); `default_ttl` is the
    client's ``REDIS_SESSION_TTL`` in seconds.
    """

    @property
    def mode(self) -> str: ...

    @property
    def default_ttl(self) -> float: ...

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None: ...

    def get(self, session_key: str, timing: Timing) -> Optional[str]: ...

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]: ...

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]: ...

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]: ...

    def unbind(self, session_key: str) -> bool: ...

    def sessions_for(self, agent_id: str, limit: int) -> List[str]: ...

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]: ...

    def session_keys(self) -> Iterator[str]: ...

    def replay_pending(self) -> int: ...

    def cleanup_expired(self, batch: int) -> int: ...

    def close(self) -> None: ...


class Source(Protocol):
    """A source of truth behind the Redis tier (write-through mode).

    Every ``*_through`` verb changes the record first and calls the Redis
    write while the record is locked, so Redis ends with what the source ends
    with; a Redis failure flags the record for `replay`. The source keeps
    the record (`RecordData`: ``bound_at``, ``bind_count``, ``last_active``,
    caller fields) and hands Redis the very record it stored.
    """

    def load(self, session_key: str) -> Optional[Record]: ...

    def touch_record(self, session_key: str, ttl_ms: int, pending: bool = False) -> Optional[str]: ...

    def sessions_for(self, agent_id: str, limit: int) -> List[str]: ...

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]: ...

    def session_keys(self) -> Iterator[str]: ...

    def bind_through(self, session_key: str, agent_id: str, ttl_ms: int,
                     redis_write: Optional[Callable[[RecordData], None]], fields: str = "") -> bool: ...

    def update_through(self, session_key: str, fields: Dict[str, str],
                       redis_write: Optional[Callable[[str, int, RecordData], None]]) -> Optional[Record]: ...

    def unbind_through(self, session_key: str, redis_unbind: Optional[Callable[[], bool]]) -> Tuple[bool, bool]: ...

    def shorten_through(self, session_key: str, agent_id: str, ttl_ms: int,
                        redis_write: Callable[[], bool]) -> bool: ...

    def extend(self, session_key: str, agent_id: str, ttl_ms: int,
               redis_left: Callable[[], Optional[int]]) -> None:
        """Slide the expiry, never past `redis_left()`; `BackendUnavailable` when it was left as it
        was (Redis could not be asked), so the next touch tries again."""
        ...

    def repair(self, session_key: str, write: Callable[[str, int, RecordData], None],
               extend_ms: Optional[int] = None) -> Optional[str]: ...

    def replay(self, write_batch: Callable[[Sequence[Pending]], None], batch: int) -> int: ...

    def cleanup_expired(self, batch: int) -> int: ...
