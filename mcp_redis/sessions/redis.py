"""The Redis tier of sessions, and the Redis-only backend.

`RedisTier` holds the keys and scripts (``mcp_redis/lua/session_*.lua``,
through the client's `ScriptSet`). Two kinds of keys, nothing per agent:

* the binding ``mcp:session:<sid>``: one string, PX ttl, holding the agent id
  with its record packed after it (`mcp_redis.sessions.records`);
* the session index ``mcp:session_index:{all}``: one ZSET, every member at
  score 0, ``<agent id>\\0<session key>`` (the key as `index_id` writes it). A lexicographic range
  ``[aid\\0 .. (aid\\1`` lists an agent's sessions; a range on a prefix lists
  the agents it names (`mcp_redis.sessions.directory`). The key's TTL is kept
  at twice the longest ttl written into it (a sliding binding is touched
  between throttled refreshes, at most one ttl apart).

An entry never expires by itself: readers verify every entry against its
binding (one MGET) and drop dead ones; `bind` sweeps a few entries from a
rotating cursor (`SWEEP_EVERY`, `SWEEP_BATCH`), so entries of expired
bindings nobody asks about are removed too. On a single instance one Lua
script writes the binding and the index; on Cluster (two slots) they are
separate single-slot commands. `RedisBackend` is the ``redis`` mode without
``DATABASE_URL``: Redis only, failing loudly (`BackendUnavailable`) while
Redis is down.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..connections import RedisConnection, scan_keys
from ..errors import BackendUnavailable, InvalidArgument
from ..keys import KeySpace, decode_id, encode_id
from ..metrics import METRICS
from .base import Pending, Timing, Touched
from .directory import PrefixIndex
from .records import MAX_FIELDS_BYTES, RS, RecordData, agent_of, pack, unpack

__all__ = ["RedisTier", "RedisBackend", "RefreshThrottle", "SWEEP_EVERY", "SWEEP_BATCH"]

SWEEP_EVERY = 32  # a tier sweeps the index once per this many binds ...
SWEEP_BATCH = 64  # ... checking this many entries (2 per bind: faster than bindings die)
_PAGE = 256


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


_HEX32 = re.compile(r"[0-9a-f]{32}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def index_id(session_key: str) -> str:
    """The session key as written in an index member: `encode_id`, except that the usual
    forms (32 lower-case hex digits, a lower-case UUID) are packed into 22 base64 characters
    behind ``!`` / ``*`` (characters `encode_id` never writes), 16 bytes less per entry."""
    if len(session_key) == 32 and _HEX32.fullmatch(session_key):
        return "!" + base64.urlsafe_b64encode(bytes.fromhex(session_key)).decode("ascii")[:22]
    if len(session_key) == 36 and _UUID.fullmatch(session_key):
        raw = bytes.fromhex(session_key.replace("-", ""))
        return "*" + base64.urlsafe_b64encode(raw).decode("ascii")[:22]
    return encode_id(session_key)


def from_index_id(encoded: str) -> str:
    """Invert `index_id`."""
    if encoded[:1] in ("!", "*"):
        hexed = base64.urlsafe_b64decode(encoded[1:] + "==").hex()
        if encoded[0] == "!":
            return hexed
        return f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
    return decode_id(encoded)


#: The value a put/sync left in the binding: what `RedisTier.forget_if` needs to undo it.
Undo = str


def _undo(reply: Any) -> Optional[Undo]:
    return str(reply[1]) if reply and reply[1] else None


class RedisTier:
    """Bindings (with their records) and the session index in Redis, through the shared policy."""

    def __init__(self, conn: RedisConnection, ks: KeySpace) -> None:
        self.conn = conn
        self.client = conn.client
        self._policy = conn.policy
        # Both share round trips with the process's other threads (mcp_redis.batching).
        self._get = conn.get
        self._run = conn.run_script
        self.ks = ks
        self.cluster = conn.is_cluster
        # The hot path joins this head and encode_id() itself: the very string
        # KeySpace.key("session", id) builds, minus its per-call namespace check.
        self.session_head = ks.namespace_pattern("session")[:-1]
        assert self.binding_key("probe") == ks.key("session", "probe")
        self.index = ks.key("session_index", "all", tag=True)
        register = conn.script
        self._bind = register("session_bind")
        self._unindex = register("session_unindex")
        self._index = register("session_index")
        self._unbind = register("session_unbind")
        self._touch = register("session_touch")
        self._forget = register("session_forget")
        self.directory = PrefixIndex(self)
        self._binds = 0
        self._cursor = b"-"

    def binding_key(self, session_key: str) -> str:
        return self.session_head + encode_id(session_key)

    @staticmethod
    def member(agent_id: str, session_key: str) -> bytes:
        return _utf8(agent_id) + b"\x00" + index_id(session_key).encode("ascii")

    @staticmethod
    def split_member(member: str) -> Tuple[str, str]:
        """(agent id, session key) of an index member."""
        agent, _, encoded = member.rpartition("\x00")
        return agent, from_index_id(encoded)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)`` under the shared retry/breaker policy."""
        return self.conn.policy.call(fn, *args, **kwargs)

    def once(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A single attempt through the breaker: for calls made inside a PostgreSQL
        transaction, which must not hold a row lock through retries (the row is
        flagged for replay instead)."""
        return self.conn.policy.call(fn, *args, attempts=1, **kwargs)

    # reads -------------------------------------------------------------------------
    def get(self, session_key: str, retry: bool) -> Optional[str]:
        """The agent bound to `session_key`: one GET (`retry` False: one attempt only —
        the caller has PostgreSQL to ask instead of waiting out retries against a hung Redis)."""
        key = self.session_head + encode_id(session_key)
        return agent_of(self._policy.call(self._get, key, attempts=None if retry else 1))

    def record(self, session_key: str, retry: bool = True) -> Optional[Tuple[str, Optional[RecordData]]]:
        """(agent id, record) of a live binding, or None: one GET."""
        value: Optional[str] = (self.call if retry else self.once)(self._get, self.binding_key(session_key))
        return None if value is None else unpack(value)

    def getex(self, session_key: str, ttl_ms: int, retry: bool) -> Optional[str]:
        call = self.call if retry else self.once
        return agent_of(call(self.client.getex, self.binding_key(session_key), px=ttl_ms))

    def touch(self, session_key: str, ttl_ms: int) -> Optional[Touched]:
        """Write-through sliding expiry (one attempt): extend the binding to `ttl_ms`.

        None: no binding. (agent, True): `ttl_ms` is shorter than what the
        binding has left, so Redis was left alone for `shorten` to apply once
        PostgreSQL holds the shorter expiry.
        """
        reply = self.once(self._run, self._touch, [self.binding_key(session_key)], [ttl_ms])
        if not reply:
            return None
        bind = (int(reply[3], 16), int(reply[4], 16)) if len(reply) == 5 else None
        left = int(reply[2])
        return Touched(str(reply[0]), bool(int(reply[1])), bind, None if left < 0 else left)

    def left_ms(self, session_key: str) -> Optional[int]:
        """What the binding has left in ms (0: gone; None: no expiry), one attempt."""
        left = int(self.once(self.client.pttl, self.binding_key(session_key)))
        return None if left == -1 else max(left, 0)

    def shorten(self, session_key: str, agent_id: str, ttl_ms: int) -> bool:
        """Set the binding's expiry to `ttl_ms` (even if shorter) while it names `agent_id`."""
        reply = self.once(self._run, self._touch, [self.binding_key(session_key)], [ttl_ms, agent_id])
        return bool(reply)

    def _values(self, keys: List[str]) -> List[Optional[str]]:
        if not keys:
            return []
        if self.cluster:
            return list(self.call(self.client.mget_nonatomic, keys))
        return list(self.call(self.client.mget, keys))

    def sessions_for(self, agent_id: str, limit: int) -> List[str]:
        """The live sessions of `agent_id` (sorted, at most `limit`): index ranges, verified by MGET."""
        head = _utf8(agent_id) + b"\x00"
        low, high = b"[" + head, b"(" + _utf8(agent_id) + b"\x01"
        live: List[str] = []
        offset = 0
        while len(live) < limit:
            page: List[str] = self.call(self.client.zrangebylex, self.index, low, high, offset, _PAGE)
            mine = [m for m in page if "\x00" not in m[len(agent_id) + 1:]]  # not "<agent>\0more\0..."
            sessions = [self.split_member(m)[1] for m in mine]
            values = self._values([self.binding_key(s) for s in sessions])
            stale: List[Tuple[str, str]] = []
            for member, session, value in zip(mine, sessions, values):
                if agent_of(value) == agent_id:
                    live.append(session)
                else:
                    stale.append((member, session))
            self.drop_entries(stale)
            if len(page) < _PAGE:
                break
            offset += _PAGE - len(stale)
        return sorted(live)[:limit]

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
    def _write(self, call: Callable[..., Any], mode: str, session_key: str, agent_id: str, ttl_ms: int,
               payload: str = "", max_bytes: int = MAX_FIELDS_BYTES, client: Any = None) -> Any:
        binding = self.session_head + encode_id(session_key)
        keys = [binding] if self.cluster else [binding, self.index]
        args = [mode, _utf8(agent_id), index_id(session_key), ttl_ms, payload, max_bytes]
        if client is not None:
            return self._bind(keys=keys, args=args, client=client)
        reply = call(self._run, self._bind, keys, args)
        if reply and self.cluster and reply[1] and mode != "update":
            kept = int(reply[2]) if mode == "sync" else ttl_ms
            self._index_cluster(call, session_key, reply[0], str(unpack(reply[1])[0]), kept)
        return reply

    def _index_cluster(self, call: Callable[..., Any], session_key: str, old: Optional[str], agent_id: str,
                       ttl_ms: int) -> None:
        """Cluster: the binding's slot is written; now the index's (a concurrent rebind may slip in
        between: readers verify every entry, so the worst case is an entry swept later)."""
        # One script on the index's slot: ZADD then PEXPIRE as two commands left the index without
        # a TTL when its node stopped answering between them.
        call(self._run, self._index, [self.index], [self.member(agent_id, session_key), 2 * ttl_ms])
        was = agent_of(old)
        if was is not None and was != agent_id:
            self.drop_entries([(self.member(was, session_key).decode("utf-8", "surrogatepass"), session_key)],
                              call)

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, fields: str = "", *, retry: bool = True) -> None:
        """SET the binding with a new record (atomic, PX ttl) and index it."""
        self._write(self.call if retry else self.once, "bind", session_key, agent_id, ttl_ms, fields)
        self._maybe_sweep()

    def put(self, session_key: str, agent_id: str, ttl_ms: int, data: RecordData, *,
            retry: bool = True) -> Optional[Undo]:
        """SET the binding to a record copied from the source of truth, and index it.
        Returns what `forget_if` needs to undo it."""
        return _undo(self._write(self.call if retry else self.once, "put", session_key, agent_id, ttl_ms,
                                 pack(agent_id, data)))

    def sync(self, session_key: str, agent_id: str, ttl_ms: int, data: RecordData, *,
             retry: bool = True) -> Optional[Undo]:
        """`put` a record from the source, keeping the longer TTL of a binding of the same agent."""
        return _undo(self._write(self.call if retry else self.once, "sync", session_key, agent_id, ttl_ms,
                                 pack(agent_id, data)))

    def forget_if(self, session_key: str, undo: Undo) -> bool:
        """Undo a `put`/`sync` the source may not have committed: forget the binding while it still
        holds what that write left (one attempt), for reads to repair from the source. True if so."""
        return bool(self.once(self._run, self._forget, [self.binding_key(session_key)], [undo]))

    def live_left(self, session_key: str, binding: Tuple[str, RecordData]) -> int:
        """The ms the binding has left while it is `binding` (agent id, record: the same bind, by
        its ``bound_at`` and ``bind_count``), else 0; one attempt (see `live_lefts`)."""
        return self.live_lefts([(encode_id(session_key), *binding)])[0]

    def live_lefts(self, bindings: Sequence[Tuple[str, str, RecordData]]) -> List[int]:
        """`live_left` of many (stored session key, agent id, record): one pipeline, one attempt.

        The same bind, not only the same agent: a write in flight (not committed by the source,
        perhaps never) may have put a new binding of that agent in Redis meanwhile, and the
        source's row must not take its expiry from it."""
        keys = [self.session_head + key for key, _, _ in bindings]

        def read() -> List[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            return list(pipe.execute())

        replies = self.once(read)
        lefts = []
        for i, (_, agent_id, record) in enumerate(bindings):
            value, left = replies[2 * i], replies[2 * i + 1]
            same = False
            if value is not None:
                agent, data = unpack(str(value))
                # A bare agent id (before records) carries no bind to compare; it is never a write
                # in flight either (this release always writes a record), so the agent decides.
                same = agent == agent_id and (data is None or (data.bound_at == record.bound_at
                                                                and data.bind_count == record.bind_count))
            lefts.append(max(int(left), 0) if same else 0)
        return lefts

    def refresh_index(self, session_key: str, agent_id: str, ttl_ms: int, keep_bare: bool = False) -> None:
        """After a sliding-expiry touch (throttled): ``last_active`` = now, the index entry and
        its key's TTL kept, only while the binding still names `agent_id`. A bare agent id
        (before records) becomes a record stamped now, unless `keep_bare` (write-through: the
        source of truth holds that binding's bind, which a record stamped now would not be)."""
        self._write(self.call, "refresh", session_key, agent_id, ttl_ms, "keep-bare" if keep_bare else "")

    def update(self, session_key: str, fields: Dict[str, str], agent_id: str = "",
               *, retry: bool = True) -> Optional[Tuple[str, RecordData]]:
        """Merge `fields` ({name: JSON text}) into the record, atomically; None: not bound.

        `agent_id` non-empty: only while the binding names it.
        """
        packed = RS.join(f"{k}{RS}{v}" for k, v in fields.items())
        reply = self._write(self.call if retry else self.once, "update", session_key, agent_id, 0, packed)
        if not reply:
            return None
        if not reply[1]:
            raise InvalidArgument(max(fields, key=lambda k: len(fields[k])),
                                  f"the record's fields would exceed {MAX_FIELDS_BYTES} bytes packed")
        agent, data = unpack(reply[1])
        assert data is not None
        return agent, data

    def unbind(self, session_key: str, *, retry: bool = True) -> bool:
        call = self.call if retry else self.once
        binding = self.binding_key(session_key)
        if not self.cluster:
            return call(self._run, self._unbind, [binding, self.index], [index_id(session_key)]) is not None
        old: Optional[str] = call(self.client.getdel, binding)
        agent = agent_of(old)
        if agent is not None:
            self.drop_entries([(self.member(agent, session_key).decode("utf-8", "surrogatepass"), session_key)],
                              call)
        return old is not None

    def drop_entries(self, entries: Sequence[Tuple[str, str]], call: Optional[Callable[..., Any]] = None) -> None:
        """Drop index entries (member, session key) whose binding is gone or names another agent."""
        if not entries:
            return
        call = call or self.call
        if self.cluster:  # two slots: check, then remove (a concurrent rebind may slip in)
            values = self._values([self.binding_key(s) for _, s in entries])
            dead = [m for (m, _), v in zip(entries, values) if agent_of(v) != self.split_member(m)[0]]
            if dead:
                call(self.client.zrem, self.index, *[m.encode("utf-8", "surrogatepass") for m in dead])
            return
        call(self._unindex, keys=[self.index] + [self.binding_key(s) for _, s in entries],
             args=[m.encode("utf-8", "surrogatepass") for m, _ in entries])

    def _maybe_sweep(self) -> None:
        """Every `SWEEP_EVERY` binds, check `SWEEP_BATCH` index entries from a rotating cursor."""
        self._binds += 1  # racy on purpose: a lost increment only delays a sweep
        if self._binds % SWEEP_EVERY:
            return
        try:
            self.sweep(SWEEP_BATCH)
        except BackendUnavailable:
            pass

    def sweep(self, batch: int) -> int:
        """Check `batch` index entries after the cursor, drop the dead; returns how many were checked."""
        cursor = self._cursor
        page: List[str] = self.call(self.client.zrangebylex, self.index, cursor, b"+", 0, batch)
        self._cursor = b"-" if len(page) < batch else b"(" + page[-1].encode("utf-8", "surrogatepass")
        entries = [(m, self.split_member(m)[1]) for m in page]
        values = self._values([self.binding_key(s) for _, s in entries])
        dead = [e for e, v in zip(entries, values) if agent_of(v) != self.split_member(e[0])[0]]
        self.drop_entries(dead)
        METRICS.inc("session_index_swept_total", len(dead))
        return len(page)

    def write_batch(self, items: Sequence[Pending]) -> None:
        """Replay rows from the source: put the live ones, forget the dead ones."""
        if self.cluster:
            for item in items:
                if item.agent_id is None:
                    self.unbind(item.session_key)
                else:
                    self.put(item.session_key, item.agent_id, item.ttl_ms, item.data or _now_record())
            return

        def run() -> List[Any]:
            pipe = self.client.pipeline(transaction=False)
            for item in items:
                if item.agent_id is None:
                    self._unbind(keys=[self.binding_key(item.session_key), self.index],
                                 args=[index_id(item.session_key)], client=pipe)
                else:
                    self._write(self.call, "put", item.session_key, item.agent_id, item.ttl_ms,
                                pack(item.agent_id, item.data or _now_record()), client=pipe)
            return list(pipe.execute())

        self.call(run)


def _now_record() -> RecordData:
    now = int(time.time())
    return RecordData(now, 1, now, "")


class RefreshThrottle:
    """When this process last refreshed a binding's indexes / PostgreSQL expiry on touch,
    and the expiry that refresh wrote.

    A hint, per client, bounded to the 65,536 most recent (session, agent)
    pairs. A touch rewrites them when the last rewrite is `interval` old, when
    its ttl would run `interval` or more past the expiry last written (a longer
    ttl than before), or when the binding had less left before the touch than
    that expiry (a shorter touch or a new bind lowered it since, in any
    process): what a skipped rewrite leaves behind lags by less than `interval`.
    """

    # How far what Redis had left may fall short of the expiry this process
    # wrote before that counts as lowered (clock reads; a false alarm costs one
    # more rewrite, never a longer lag).
    SLACK = 0.05

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (session, agent) -> (monotonic time of the rewrite, the expiry it wrote counted from
        # then, and counted from when its touch was sent)
        self._refreshed: OrderedDict[Tuple[str, str], Tuple[float, float, float]] = OrderedDict()

    def due(self, session_key: str, agent_id: str, interval: float, ttl: float,
            left: Optional[float] = None, sent: Optional[float] = None) -> bool:
        """Whether this touch (extending to `ttl` s; `left`: the s the binding had before,
        None: not known; `sent`: when the touch was sent, monotonic) rewrites; if so, it is
        recorded as done (`missed` undoes that).

        Lowered or not is judged from the expiry the rewrite's touch gave Redis counted from
        when it was sent (not later than Redis's), and what the binding had left counted from
        now (not earlier): a slow or jittery reply never reads as a lowered expiry, whereas
        one lowered by more than the touch's round trip (plus `SLACK`) always does. Times
        between rewrites count from the replies, as a touch's own did."""
        now = time.monotonic()
        key = (session_key, agent_id)
        with self._lock:
            last = self._refreshed.get(key)
            if last is not None:
                at, written, floor = last
                if (now - at < interval and now + ttl - written < interval
                        and (left is None or now + left >= floor - self.SLACK)):
                    return False
            self._refreshed[key] = (now, now + ttl, (now if sent is None else sent) + ttl)
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
        self._get = tier.conn.get
        self._head = tier.session_head

    def bind(self, session_key: str, agent_id: str, ttl_ms: int, timing: Timing, fields: str = "") -> None:
        self.tier.bind(session_key, agent_id, ttl_ms, fields)
        self.throttle.missed(session_key, agent_id)  # a new bind: the next touch refreshes its index

    def record(self, session_key: str) -> Optional[Tuple[str, Optional[RecordData]]]:
        return self.tier.record(session_key)

    def update(self, session_key: str, fields: Dict[str, str]) -> Optional[Tuple[str, RecordData]]:
        return self.tier.update(session_key, fields)

    def get(self, session_key: str, timing: Timing) -> Optional[str]:
        """The hot path: one GET, the key built inline (a Python frame is ~5% of a loopback GET)."""
        value: Optional[str] = self._call(self._get, self._head + encode_id(session_key), attempts=None)
        if value is None:
            return None
        return value.rsplit("\x1f", 4)[0] if value.count("\x1f") >= 4 else value  # records.agent_of, inlined

    def touch(self, session_key: str, ttl_ms: int, timing: Timing) -> Optional[str]:
        """One GETEX; the indexes are re-scored at most once per refresh interval."""
        tier = self.tier
        agent = tier.getex(session_key, ttl_ms, True)
        if agent is None:
            return None
        interval = timing.refresh_interval_for(ttl_ms / 1000.0)
        if self.throttle.due(session_key, agent, interval, ttl_ms / 1000.0):
            METRICS.inc("session_touch_refresh_total")
            try:
                tier.refresh_index(session_key, agent, ttl_ms)
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
