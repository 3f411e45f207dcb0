"""The Redis tier of sessions, and the Redis-only backend.

`RedisTier` holds the keys and scripts (``mcp_redis/lua/session_*.lua``,
through the client's `ScriptSet`): the binding ``mcp:session:<sid>`` (the
agent id, PX ttl); the agent's index ``mcp:session_agent:<aid>`` (ZSET of
session keys scored by horizon ms); the prefix index
``mcp:session_agents:{index}`` (ZSET, lexicographic) and its horizons
``mcp:session_agents:{index}#expiry`` (`mcp_redis.sessions.directory`). On a single instance one Lua script
writes them all; on Cluster they are separate single-slot commands.
`RedisBackend` is the ``redis`` mode without ``DATABASE_URL``: Redis only,
failing loudly (`BackendUnavailable`) while Redis is down.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from ..connections import RedisConnection, scan_keys
from ..errors import BackendUnavailable
from ..keys import KeySpace, decode_id, encode_id
from ..metrics import METRICS
from .base import Pending, Timing, Touched
from .directory import PrefixIndex

__all__ = ["RedisTier", "RedisBackend", "RefreshThrottle"]


class RedisTier:
    """Bindings and their indexes in Redis, through the shared policy."""

    def __init__(self, conn: RedisConnection, ks: KeySpace) -> None:
        self.conn = conn
        self.client = conn.client
        self._policy = conn.policy
        self._get = conn.client.get
        self.ks = ks
        self.cluster = conn.is_cluster
        # The hot path joins this head and encode_id() itself: the very string
        # KeySpace.key("session", id) builds, minus its per-call namespace check.
        self.session_head = ks.namespace_pattern("session")[:-1]
        assert self.binding_key("probe") == ks.key("session", "probe")
        register = conn.script
        self._bind = register("session_bind")
        self._index = register("session_index")
        self._unindex = register("session_unindex")
        self._members = register("session_members")
        self._touch = register("session_touch")
        self.directory = PrefixIndex(self)
        self.lex, self.horizons = self.directory.lex, self.directory.horizons  # the bind script writes them too

    def binding_key(self, session_key: str) -> str:
        return self.session_head + encode_id(session_key)

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
        key = self.session_head + encode_id(session_key)
        result: Optional[str] = self._policy.call(self._get, key, attempts=None if retry else 1)
        return result

    def getex(self, session_key: str, ttl_ms: int, retry: bool) -> Optional[str]:
        call = self.call if retry else self.once
        result: Optional[str] = call(self.client.getex, self.binding_key(session_key), px=ttl_ms)
        return result

    def touch(self, session_key: str, ttl_ms: int) -> Optional[Touched]:
        """Write-through sliding expiry (one attempt): extend the binding to `ttl_ms`.

        None: no binding. (agent, True): `ttl_ms` is shorter than what the
        binding has left, so Redis was left alone for `shorten` to apply once
        PostgreSQL holds the shorter expiry.
        """
        reply = self.once(self._touch, keys=[self.binding_key(session_key)], args=[ttl_ms])
        if not reply:
            return None
        return Touched(str(reply[0]), bool(int(reply[1])))

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
        """Agents starting with `prefix` that hold a live binding (see `PrefixIndex`)."""
        return self.directory.agents_with_prefix(prefix, limit)

    def session_keys(self) -> Iterator[str]:
        """Every bound session key: a SCAN, O(all keys) — for the mapping view only."""
        head = len(self.session_head)
        pattern = self.ks.namespace_pattern("session")
        keys = scan_keys(self.conn, pattern, "SessionStore.session_keys() (the mapping view over Redis only)")
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
            self.directory.add(agent_id, ttl_ms, grace_ms, call)
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
            self.directory.add(agent_id, ttl_ms, grace_ms, self.call)
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

    def write_batch(self, items: Sequence[Pending], grace_ms: int) -> None:
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


class RefreshThrottle:
    """When this process last refreshed a binding's indexes / PostgreSQL expiry on touch.

    A hint, per client: a touch rewrites them at most once per refresh
    interval per (session, agent); bounded to the 65,536 most recent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refreshed: OrderedDict[Tuple[str, str], float] = OrderedDict()

    def due(self, session_key: str, agent_id: str, interval: float) -> bool:
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

    def missed(self, session_key: str, agent_id: str) -> None:
        """The refresh did not happen: let the next touch try again."""
        with self._lock:
            self._refreshed.pop((session_key, agent_id), None)


class RedisBackend:
    """``redis`` mode without PostgreSQL: Redis only.

    Nothing already in Redis is lost by an outage, but every call raises
    `BackendUnavailable` until Redis is back; a binding never lives in a
    process-local dict in this mode.
    """

    mode = "redis"

    def __init__(self, tier: RedisTier, default_ttl: float) -> None:
        self.tier = tier
        self.default_ttl = default_ttl
        self.throttle = RefreshThrottle()
        # The hot path's parts, bound once: one GET through the policy.
        self._call = tier.conn.policy.call
        self._get = tier.client.get
        self._head = tier.session_head

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing) -> None:
        self.tier.bind(session_key, agent_id, ttl_ms, timing.grace_ms(ttl_ms / 1000.0))

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        """The hot path: one GET, the key built inline (a Python frame is ~5% of a loopback GET)."""
        result: Optional[str] = self._call(self._get, self._head + encode_id(session_key), attempts=None)
        return result

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        """One GETEX; the indexes are re-scored at most once per refresh interval."""
        tier = self.tier
        agent = tier.getex(session_key, ttl_ms, True)
        if agent is None:
            return None
        interval = timing.refresh_interval_for(ttl_ms / 1000.0)
        if self.throttle.due(session_key, agent, interval):
            METRICS.inc("session_touch_refresh_total")
            try:
                tier.refresh_index(session_key, agent, ttl_ms, int(interval * 1000))
            except BackendUnavailable:
                pass
        return agent

    def unbind(self, session_key: str) -> bool:
        return self.tier.unbind(session_key)

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        return self.tier.sessions_for(agent_id, limit)

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        return self.tier.agents_with_prefix(prefix, limit)

    def session_keys(self) -> Iterator[str]:
        return self.tier.session_keys()

    def replay_pending(self) -> int:
        return 0  # nothing is pending without a source of truth

    def cleanup_expired(self, batch: int) -> int:
        return 0  # Redis expires its keys itself

    def close(self) -> None:
        pass  # the connection belongs to the client
