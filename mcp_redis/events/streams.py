"""Durable events: `EventStream` (Redis Streams read through a consumer group, at-least-once).

Entries stay in Redis until a consumer of the group acknowledges them;
entries a dead consumer read but never acked are re-delivered to another
consumer (XAUTOCLAIM), so consumers must be idempotent. Streams need Redis:
in local mode every call raises `ConfigurationError`. Lua (``events_add``,
``events_group``, ``events_deadletter``) comes from the client's `ScriptSet`.

`StreamConsumer` threads belong to the client they were started on: closing
the client (``reset()``/``configure()`` close the default one) stops them.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import redis.exceptions as rex
from redis.client import NEVER_DECODE

from ..client import Client, resolve
from ..config import Settings
from ..connections import RedisConnection, on_fork
from ..errors import InvalidArgument, InvalidArgumentType
from ..keys import KeySpace, validate_id
from ..metrics import METRICS
from ..validation import MAX_SECONDS, seconds
from .base import Event, EventHandler
from .codec import check_handler, check_int, decode_event, encode_event
from .consumer import StreamConsumer, consume_loop, handle_batch

# Stream reads come back undecoded (redis-py's NEVER_DECODE option): entries are decoded here.
_RAW: Dict[str, Any] = {NEVER_DECODE: True}


def _text(value: Any) -> str:
    """An entry id or cursor (ASCII) as text."""
    return value.decode("ascii", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


__all__ = ["EventStream", "StreamEntry", "StreamConsumer", "check_client"]

log = logging.getLogger("mcp_redis.events")


def check_client(client: Optional[Client]) -> Optional[Client]:
    if client is not None and not isinstance(client, Client):
        raise InvalidArgumentType("client", f"must be a mcp_redis.Client, not {type(client).__name__}")
    return client


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, rex.ResponseError) and str(exc).startswith("NOGROUP")


@dataclass(frozen=True)
class StreamEntry:
    """One entry read from a stream: its id, the event (None if trimmed or
    unreadable), and whether it was claimed from another (dead) consumer."""

    id: str
    event: Optional[Event]
    claimed: bool = False


_MAX_ADD_BATCH = 500
_DEFAULT_TTL = 7 * 24 * 3600.0
_MAX_MS = int(MAX_SECONDS * 1000)  # idle times in ms: the same ten-year bound as every duration


_streams: weakref.WeakSet[EventStream] = weakref.WeakSet()


@on_fork
def _after_fork() -> None:
    for stream in list(_streams):
        stream._lock = threading.RLock()  # a parent thread may have held it while forking
        if stream._named_by_default:
            # Another process: another consumer. Under the parent's name a worker
            # re-read (as its own pending) the batch a sibling was still handling.
            stream.consumer = _default_consumer()
            stream._own_cursor = "0"
            stream._claim_cursor = "0-0"
            stream._next_claim = 0.0


def _default_consumer() -> str:
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(4)}"


_MAX_LEN = 2**63 - 1  # Redis's bound for MAXLEN (a signed 64-bit count)


class EventStream:
    """A durable event stream (Redis Streams) read through a consumer group.

    Producers only need `name`: ``EventStream("agent:changes").add(event)``.
    Consumers name a `group`; every group sees every entry once, shared among
    its consumers. Delivery is at-least-once: an entry stays pending until
    acked, and entries left pending longer than `min_idle_ms` (a consumer
    died or is stuck) are claimed by another consumer, so handlers must be
    idempotent (use the entry id). The stream holds about `maxlen` entries
    (``MAXLEN ~``) and expires `ttl` seconds after the last `add` (every key
    the library writes expires: None is refused). With `max_deliveries`, an entry
    re-delivered more often than that (a poison event) is moved to a
    dead-letter stream (`dead_letters()`) and acked. Data survives a Redis restart only
    with persistence (AOF); without it the stream and group are recreated
    empty on next use.
    """

    def __init__(
        self,
        name: str,
        group: Optional[str] = None,
        consumer: Optional[str] = None,
        *,
        maxlen: int = 100_000,
        ttl: Optional[float] = _DEFAULT_TTL,
        min_idle_ms: int = 30_000,
        start_id: str = "0",
        claim_interval: Optional[float] = None,
        max_deliveries: Optional[int] = None,
        client: Optional[Client] = None,
    ) -> None:
        self.name = validate_id(name, "name")
        self.client = check_client(client)  # None: the default client at each call
        self.group = None if group is None else validate_id(group, "group")
        self._named_by_default = consumer is None  # made anew in a forked child
        self.consumer = validate_id(_default_consumer() if consumer is None else consumer, "consumer")
        self.maxlen = check_int(maxlen, "maxlen", 1, _MAX_LEN)
        if ttl is None:  # every key the library writes expires
            raise InvalidArgument("ttl", "must be a number of seconds: the stream expires that long after its last "
                                         "add (a quiet stream that must live long: a long ttl, e.g. 365 days)")
        self.ttl: float = seconds(ttl, "ttl")
        self.min_idle_ms = check_int(min_idle_ms, "min_idle_ms", 0, _MAX_MS)
        if start_id not in ("0", "$") and not _valid_stream_id(start_id):
            raise InvalidArgument("start_id", "must be '0', '$' or a stream id like '1700000000000-0'")
        self.start_id = start_id
        if claim_interval is None:
            claim_interval = max(self.min_idle_ms / 2000.0, 0.05)
        self.claim_interval = seconds(claim_interval, "claim_interval", allow_zero=True)  # 0: on every read
        self.max_deliveries = None if max_deliveries is None else check_int(max_deliveries, "max_deliveries", 1)
        self._lock = threading.RLock()
        _streams.add(self)
        self._group_ready: Optional[Any] = None  # the client the group was ensured on
        self._own_cursor: Optional[str] = "0"  # re-read our own pending entries first
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self.claimed = 0
        self.recreated = 0
        self.dead_lettered = 0

    def __repr__(self) -> str:
        return f"EventStream({self.name!r}, group={self.group!r}, consumer={self.consumer!r}, maxlen={self.maxlen})"

    @property
    def key(self) -> str:
        """The stream's Redis key under the prefix in force."""
        return KeySpace(resolve(self.client).settings.key_prefix).key("stream", self.name, tag=True)

    @property
    def dead_letter_key(self) -> str:
        """Where entries past `max_deliveries` go (same hash slot as `key`)."""
        return KeySpace(resolve(self.client).settings.key_prefix).key("stream", self.name, tag=True, suffix="dead")

    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def _conn(self) -> RedisConnection:
        return resolve(self.client).redis("events")  # ConfigurationError in local mode: streams need Redis

    # -- producing ----------------------------------------------------------------
    def add(self, event: Dict[str, Any]) -> str:
        """Append `event`; returns its entry id. Raises `BackendUnavailable`."""
        return self._add([encode_event(event)])[0]

    def add_many(self, events: Iterable[Dict[str, Any]]) -> List[str]:
        """Append events in order (all validated first); returns their ids."""
        if isinstance(events, (dict, str, bytes)) or not isinstance(events, Iterable):
            raise InvalidArgumentType("events", f"must be an iterable of dicts, not {type(events).__name__}")
        return self._add([encode_event(e, "events") for e in events])

    def _add(self, payloads: List[str]) -> List[str]:
        conn = self._conn()
        key = self.key
        script = conn.script("events_add")
        ids: List[str] = []
        for i in range(0, len(payloads), _MAX_ADD_BATCH):
            chunk = payloads[i:i + _MAX_ADD_BATCH]
            # Not through shared round trips (run_script): an append is not idempotent, and a
            # shared trip that loses its replies has every call in it retried.
            out = conn.call(script, keys=[key], args=[self.maxlen, self._ttl_ms(), *chunk], client=conn.client)
            ids.extend(str(x) for x in out)
        METRICS.inc("events_stream_added_total", float(len(ids)))
        return ids

    def length(self) -> int:
        """Entries in the stream now (XLEN)."""
        conn = self._conn()
        return int(conn.call(conn.client.xlen, self.key))

    # -- consuming ----------------------------------------------------------------
    def _need_group(self) -> str:
        if self.group is None:
            raise InvalidArgument("group", "this EventStream has no consumer group; pass group= to read")
        return self.group

    def ensure_group(self, start_id: Optional[str] = None) -> bool:
        """Create the group (and stream) if missing, at `start_id` (default the stream's); True if created."""
        group = self._need_group()
        conn = self._conn()
        created = bool(conn.call(conn.script("events_group"), keys=[self.key],
                                 args=[group, start_id or self.start_id, self._ttl_ms()], client=conn.client))
        with self._lock:
            self._group_ready = conn.client
        return created

    def _group_call(self, fn: Callable[[RedisConnection], Any]) -> Any:
        """Run a group command; on NOGROUP (Redis restarted empty) recreate and retry once."""
        conn = self._conn()
        if self._group_ready is not conn.client:
            self.ensure_group()
        try:
            return fn(conn)
        except rex.ResponseError as exc:
            if not _is_nogroup(exc):
                raise
        METRICS.inc("events_stream_group_recreated_total")
        log.warning("stream %r: consumer group %r missing (Redis restarted?); recreating", self.name, self.group)
        self.recreated += 1
        with self._lock:
            self._own_cursor = "0"
            self._claim_cursor = "0-0"
        # From the stream's start, whatever `start_id` says: the entries a restarted,
        # empty Redis holds were all added after the restart ("$" would skip them).
        self.ensure_group("0")
        return fn(self._conn())

    def read(self, count: int = 100, block_ms: int = 1000) -> List[StreamEntry]:
        """Up to `count` entries for this consumer; they are pending until `ack`.

        In order of preference: this consumer's own pending entries (after a
        restart under the same consumer name), entries claimed from consumers
        idle longer than `min_idle_ms` (checked every `claim_interval`
        seconds), then new entries, waiting up to `block_ms` (≤ 1000 ms, kept
        below the socket timeout) for them.
        """
        group = self._need_group()
        _check_read_args(count, block_ms, resolve(self.client).settings)
        if self._own_cursor is not None:
            entries = self._screen(self._read_own(group, count))
            if entries:
                return entries
        if time.monotonic() >= self._next_claim:
            entries = self._screen(self.claim(count))
            if entries:
                return entries
        key = self.key
        block = ["BLOCK", block_ms] if block_ms else []
        reply = self._group_call(lambda c: c.call(
            c.client.execute_command, "XREADGROUP", "GROUP", group, self.consumer, "COUNT", count, *block,
            "STREAMS", key, ">", **_RAW))
        return self._entries(reply, claimed=False)

    def _read_own(self, group: str, count: int) -> List[StreamEntry]:
        key = self.key
        cursor = self._own_cursor or "0"
        reply = self._group_call(lambda c: c.call(
            c.client.execute_command, "XREADGROUP", "GROUP", group, self.consumer, "COUNT", count,
            "STREAMS", key, cursor, **_RAW))
        entries = self._entries(reply, claimed=False)
        with self._lock:
            self._own_cursor = entries[-1].id if entries else None
        return entries

    def claim(self, count: int = 100, min_idle_ms: Optional[int] = None) -> List[StreamEntry]:
        """Take over up to `count` entries pending longer than `min_idle_ms` (XAUTOCLAIM)."""
        group = self._need_group()
        check_int(count, "count", 1, 10_000)
        idle = self.min_idle_ms if min_idle_ms is None else check_int(min_idle_ms, "min_idle_ms", 0, _MAX_MS)
        key = self.key
        cursor = self._claim_cursor
        reply = self._group_call(lambda c: c.call(
            c.client.execute_command, "XAUTOCLAIM", key, group, self.consumer, idle, cursor, "COUNT", count, **_RAW))
        next_cursor = _text(reply[0]) if reply else "0-0"
        with self._lock:
            self._claim_cursor = next_cursor
            if next_cursor == "0-0":  # a full pass over the PEL: rest a while
                self._next_claim = time.monotonic() + self.claim_interval
        entries = [self._entry(eid, fields, claimed=True) for eid, fields in (reply[1] if reply else [])
                   if eid is not None]
        if entries:
            self.claimed += len(entries)
            METRICS.inc("events_stream_claimed_total", float(len(entries)))
            log.info("stream %r: consumer %r claimed %d idle pending entries", self.name, self.consumer, len(entries))
        return entries

    def _screen(self, entries: List[StreamEntry]) -> List[StreamEntry]:
        """Dead-letter re-delivered entries past `max_deliveries` (when set)."""
        if self.max_deliveries is None or not entries:
            return entries
        group = self._need_group()
        key = self.key
        first, last = entries[0].id, entries[-1].id
        rows = self._group_call(lambda c: c.call(
            c.client.xpending_range, key, group, first, last, max(2 * len(entries), 1000),
            consumername=self.consumer))
        limit = self.max_deliveries
        over = [str(r["message_id"]) for r in rows if int(r["times_delivered"]) > limit]
        if not over:
            return entries
        conn = self._conn()
        conn.call(conn.script("events_deadletter"), keys=[key, self.dead_letter_key],
                  args=[group, self.maxlen, self._ttl_ms(), self.consumer, *over], client=conn.client)
        self.dead_lettered += len(over)
        METRICS.inc("events_stream_dead_lettered_total", float(len(over)))
        log.warning("stream %r: %d entries delivered more than %d times moved to the dead-letter stream",
                    self.name, len(over), limit)
        gone = set(over)
        return [e for e in entries if e.id not in gone]

    def dead_letters(self, count: int = 100) -> List[StreamEntry]:
        """The oldest `count` dead-lettered entries (ids are the original ids)."""
        check_int(count, "count", 1, 10_000)
        conn = self._conn()
        rows = conn.call(conn.client.execute_command, "XRANGE", self.dead_letter_key, "-", "+", "COUNT", count, **_RAW)
        return [StreamEntry(_text(f.get(b"id", eid)), decode_event(f.get(b"e"))) for eid, f in rows]

    def _entries(self, reply: Any, *, claimed: bool) -> List[StreamEntry]:
        out: List[StreamEntry] = []
        for _stream, items in reply or []:
            for eid, fields in items or []:
                if eid is not None:
                    out.append(self._entry(eid, fields, claimed=claimed))
        return out

    def _entry(self, eid: Any, fields: Any, *, claimed: bool) -> StreamEntry:
        # Read undecoded (`_RAW`): an entry that is not UTF-8 (a foreign producer)
        # is skipped like any non-JSON one, instead of failing every read after it.
        data = fields.get(b"e") if isinstance(fields, dict) else None
        return StreamEntry(_text(eid), decode_event(data), claimed)

    def ack(self, *ids: str) -> int:
        """Acknowledge entries (XACK); returns how many were pending."""
        group = self._need_group()
        if not ids:
            return 0
        for i in ids:
            if not isinstance(i, str) or not _valid_stream_id(i):
                raise InvalidArgument("ids", "must be stream entry ids like '1700000000000-0'")
        conn = self._conn()
        n = int(conn.call(conn.client.xack, self.key, group, *ids))
        METRICS.inc("events_stream_acked_total", float(n))
        return n

    def pending(self) -> int:
        """Entries of the group delivered but not yet acked (every consumer)."""
        group = self._need_group()
        info = self._group_call(lambda c: c.call(c.client.xpending, self.key, group))
        return int(info["pending"]) if info else 0

    def prune_consumers(self, min_idle_ms: int = 24 * 3600 * 1000) -> int:
        """Forget consumers with nothing pending, idle over `min_idle_ms`; returns how many."""
        group = self._need_group()
        check_int(min_idle_ms, "min_idle_ms", 0, _MAX_MS)
        key = self.key
        consumers = self._group_call(lambda c: c.call(c.client.xinfo_consumers, key, group))
        removed = 0
        conn = self._conn()
        for info in consumers:
            if info.get("name") != self.consumer and int(info.get("pending", 0)) == 0 \
                    and int(info.get("idle", 0)) >= min_idle_ms:
                conn.call(conn.client.xgroup_delconsumer, key, group, info["name"])
                removed += 1
        return removed

    def process(self, handler: EventHandler, *, count: int = 100, block_ms: int = 1000,
                with_id: bool = False, stop: Optional[threading.Event] = None) -> Tuple[int, int]:
        """Read one batch, call the handler per event, ack the ones it handled.

        Returns (handled, failed). A handler that raises leaves its entry
        pending: it is re-delivered after `min_idle_ms`. Entries that were
        trimmed away or are not a JSON object are acked and skipped.
        """
        fn = check_handler(handler)
        done, failed = handle_batch(self, fn, self.read(count, block_ms), with_id=with_id, stop=stop)
        if done:
            self.ack(*done)
            METRICS.inc("events_delivered_total", float(len(done)), kind="stream")
        return len(done), failed

    def consume(self, handler: EventHandler, *, count: int = 100, block_ms: int = 1000, with_id: bool = False,
                stop: Optional[threading.Event] = None, max_events: Optional[int] = None) -> int:
        """Process batches until `stop` is set (or `max_events` handled); returns handled.

        Survives Redis outages and restarts: waits with backoff and carries on
        (recreating the group if Redis came back empty).
        """
        check_handler(handler)
        self._need_group()
        _check_read_args(count, block_ms, resolve(self.client).settings)
        self._conn()  # fail fast in local mode
        return consume_loop(self, handler, count=count, block_ms=block_ms, with_id=with_id, stop=stop,
                            max_events=max_events)

    def run_in_thread(self, handler: EventHandler, *, count: int = 100, block_ms: int = 1000,
                      with_id: bool = False, name: Optional[str] = None) -> StreamConsumer:
        """`consume` on a daemon thread; returns a handle with `close()`."""
        check_handler(handler)
        self._need_group()
        _check_read_args(count, block_ms, resolve(self.client).settings)
        self._conn()
        return StreamConsumer(self, handler, count=count, block_ms=block_ms, with_id=with_id, name=name)


def _check_read_args(count: object, block_ms: object, s: Settings) -> None:
    check_int(count, "count", 1, 10_000)
    # XREADGROUP BLOCK must end well before the socket timeout of the stream's client fires.
    limit = max(0, min(1000, int(s.socket_timeout * 500)))
    check_int(block_ms, "block_ms", 0, limit)


def _valid_stream_id(value: str) -> bool:
    """``<ms>`` or ``<ms>-<seq>``, each an unsigned 64-bit number in ASCII digits (what Redis takes)."""
    ms, dash, seq = value.partition("-")
    return (ms.isdigit() and (not dash or seq.isdigit()) and ms.isascii() and seq.isascii()
            and len(ms) <= 20 and len(seq) <= 20 and int(ms) < 2**64 and (not seq or int(seq) < 2**64))
