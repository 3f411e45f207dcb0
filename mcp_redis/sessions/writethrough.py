"""Write-through sessions (``redis`` mode with ``DATABASE_URL``): Redis in front of a source of truth.

The source (`PostgresBackend` over ``<pg_schema>.sessions``; any `Source`) is
written first and Redis is written while the record is locked, so the two end
equal. A Redis miss reads the source and repopulates Redis with the remaining
TTL (read repair). While Redis is down calls go to the source, rows written
then are flagged pending, and the client's `Replayer` writes them back.
Index queries ask the source (complete even after Redis lost its data) and
fall back to the Redis indexes while it is down.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import BackendUnavailable
from ..keys import encode_id
from ..metrics import METRICS
from .base import Source, Timing
from .postgres import PostgresBackend
from .records import RecordData
from .redis import RedisTier, RefreshThrottle, Undo
from .replay import Replayer

__all__ = ["WriteThroughBackend"]

log = logging.getLogger("mcp_redis.sessions")


class WriteThroughBackend:
    """A `RedisTier` in front of a `Source`; one per client (with its replayer)."""

    mode = "redis"

    def __init__(self, tier: RedisTier, source: Source, default_ttl: float) -> None:
        self.tier = tier
        self.source = source
        self.default_ttl = default_ttl
        self.throttle = RefreshThrottle()
        self.replayer = Replayer(tier, source, default_ttl)
        self.replayer.start_sweeping()
        # The library's table checks the bind Redis holds (agent, bound_at, bind_count) before a
        # touch or an update catches the row up, and before cleanup deletes it; another source
        # keeps the older protocol (agent only; an expired row is not caught up).
        self._table: Optional[PostgresBackend] = source if isinstance(source, PostgresBackend) else None
        # The hot path's parts, bound once: one GET through the policy, one attempt.
        self._call = tier.conn.policy.call
        self._get = tier.client.get
        self._head = tier.session_head

    # -- writes ------------------------------------------------------------------------------
    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None:
        tier = self.tier
        undo: List[Undo] = []
        write: Optional[Callable[[RecordData], None]] = None  # None: Redis known down, flag the row at once
        if tier.conn.policy.available:
            def write(data: RecordData) -> None:
                done = tier.put(session_key, agent_id, ttl_ms, data, retry=False)
                if done is not None:
                    undo.append(done)

        try:
            reached = self.source.bind_through(session_key, agent_id, ttl_ms, write, fields)
        except BaseException:
            self._undo_uncommitted(session_key, undo)
            raise
        self.throttle.missed(session_key, agent_id)  # a new bind: the next touch refreshes
        if not reached:
            self._fell_back("bind")

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]:
        """The source merges the fields (one statement, row locked), then Redis takes its record."""
        tier = self.tier
        reached = [False]
        undo: List[Undo] = []
        write: Optional[Callable[[str, int, RecordData], None]] = None
        if tier.conn.policy.available:
            def write(agent: str, ttl_ms: int, data: RecordData) -> None:
                done = tier.sync(session_key, agent, ttl_ms, data, retry=False)
                reached[0] = True
                if done is not None:
                    undo.append(done)

        def left(agent: str, record: RecordData) -> int:
            return tier.live_left(session_key, (agent, record))

        try:
            if self._table is not None:  # the library's table; other sources: not bound
                found = self._table.update_through(session_key, fields, write, redis_left=left)
            else:
                found = self.source.update_through(session_key, fields, write)
        except BaseException:
            self._undo_uncommitted(session_key, undo)
            raise
        if found is None or found.data is None:
            return None
        if not reached[0]:
            self._fell_back("update")
        return found.agent_id, found.data

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]:
        """One GET; a miss is repaired from the source (as `get`), whose record answers."""
        try:
            found = self.tier.record(session_key, retry=False)
        except BackendUnavailable:
            METRICS.inc("session_fallback_total", op="record")
            found = None
        else:
            if found is not None:
                return found
            self._repair(session_key, Timing(None, None))
        loaded = self.source.load(session_key)
        return None if loaded is None else (loaded.agent_id, loaded.data)

    def unbind(self, session_key: str) -> bool:
        tier = self.tier
        forget: Optional[Callable[[], bool]] = None  # None: Redis known down, leave a tombstone
        if tier.conn.policy.available:
            def forget() -> bool:
                return tier.unbind(session_key, retry=False)

        existed, reached_redis = self.source.unbind_through(session_key, forget)
        if not reached_redis:
            self._fell_back("unbind")
        return existed

    # -- reads -------------------------------------------------------------------------------
    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        """The hot path: one GET (one attempt: the source answers instead of retries)."""
        try:
            agent: Optional[str] = self._call(self._get, self._head + encode_id(session_key), attempts=1)
        except BackendUnavailable:
            METRICS.inc("session_fallback_total", op="get")
            record = self.source.load(session_key)
            return None if record is None else record.agent_id
        if agent is not None:
            return agent.rsplit("\x1f", 4)[0] if agent.count("\x1f") >= 4 else agent  # records.agent_of, inlined
        return self._repair(session_key, timing)

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        """One script that extends the binding; the source's expiry and the indexes are
        rewritten at most every refresh interval, a missed rewrite retried by the next
        touch; a shorter ttl reaches the source first (see `SessionStore.touch`)."""
        tier, source = self.tier, self.source
        sent = time.monotonic()
        try:
            found = tier.touch(session_key, ttl_ms)
        except BackendUnavailable:
            agent = source.touch_record(session_key, ttl_ms, pending=True)
            if agent is not None:
                self._fell_back("touch")
            return agent
        interval = timing.refresh_interval_for(ttl_ms / 1000.0)
        if found is None:
            agent = source.repair(session_key, self._putter(session_key),
                                  extend_ms=ttl_ms)
            METRICS.inc("session_read_repair_total", result="hit" if agent is not None else "miss")
            return agent
        bound = found.agent_id
        if found.shorter:
            def shorten() -> bool:
                return tier.shorten(session_key, bound, ttl_ms)

            if self._table is not None:
                shortened = self._table.shorten_through(session_key, bound, ttl_ms, shorten, bind=found.bind)
            else:
                shortened = source.shorten_through(session_key, bound, ttl_ms, shorten)
            return bound if shortened else None  # None: unbound or rebound meanwhile
        had = None if found.left_ms is None else found.left_ms / 1000.0
        if self.throttle.due(session_key, bound, interval, ttl_ms / 1000.0, had, sent):
            METRICS.inc("session_touch_refresh_total")
            try:
                tier.refresh_index(session_key, bound, ttl_ms, keep_bare=True)
            except BackendUnavailable:
                pass

            def left() -> Optional[int]:
                return tier.left_ms(session_key)

            try:
                if self._table is not None:
                    self._table.extend(session_key, bound, ttl_ms, left, bind=found.bind)
                else:
                    source.extend(session_key, bound, ttl_ms, left)
            except BackendUnavailable:
                # Redis answered and stays right; the source's expiry lags (errs
                # early) until a touch after it returns rewrites it.
                self.throttle.missed(session_key, bound)
                METRICS.inc("session_refresh_missed_total")
        return bound

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        try:
            return self.source.sessions_for(agent_id, limit)
        except BackendUnavailable:
            METRICS.inc("session_fallback_total", op="sessions_for")
        return self.tier.sessions_for(agent_id, limit)

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        try:
            return self.source.agents_with_prefix(prefix, limit)
        except BackendUnavailable:
            METRICS.inc("session_fallback_total", op="resolve_agent_prefix")
        return self.tier.agents_with_prefix(prefix, limit)

    def session_keys(self) -> Iterator[str]:
        return self.source.session_keys()

    # -- maintenance -------------------------------------------------------------------------
    def replay_pending(self) -> int:
        return self.replayer.replay_pending()

    def cleanup_expired(self, batch: int) -> int:
        """Replay pending rows first (best effort), then delete the source's expired rows
        (the library's table: not those whose binding Redis still has live; they catch up)."""
        try:
            self.replayer.replay_pending()
        except BackendUnavailable:
            pass
        if self._table is not None:
            return self._table.cleanup_expired_through(batch, self.tier.live_lefts)
        return self.source.cleanup_expired(batch)

    def close(self) -> None:
        self.replayer.close()

    # -- internals ---------------------------------------------------------------------------
    def _putter(self, session_key: str) -> Callable[[str, int, RecordData], None]:
        """A source's Redis write of `session_key`'s record (read repair, touch catch-up)."""
        tier = self.tier

        def put(agent: str, ttl_ms: int, data: RecordData) -> None:
            tier.put(session_key, agent, ttl_ms, data, retry=False)

        return put

    def _repair(self, session_key: str, timing: Timing) -> Optional[str]:
        agent = self.source.repair(session_key, self._putter(session_key))
        METRICS.inc("session_read_repair_total", result="hit" if agent is not None else "miss")
        return agent

    def _undo_uncommitted(self, session_key: str, undo: List[Undo]) -> None:
        """The source's transaction failed after Redis took its write(s) (the COMMIT's connection
        died, through the retries; the COMMIT may even have succeeded, its reply lost): Redis
        forgets the binding while it holds what the last of those writes left, and the next
        read repairs it from whatever the source kept (with the source's expiry: an extension
        that touches gave the binding in Redis alone is lost). One attempt; if Redis fails too,
        the two differ until the binding is written again or expires."""
        if not undo:
            return
        try:
            self.tier.forget_if(session_key, undo[-1])
        except Exception:  # already failing: the caller gets the source's error
            log.warning("session: a write Redis took was not committed by the source, and Redis could not "
                        "be told to forget it; it is served until rewritten or expired")

    def _fell_back(self, op: str) -> None:
        METRICS.inc("session_fallback_total", op=op)
        self.replayer.note_outage()
