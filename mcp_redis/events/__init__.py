"""Events: JSON pub/sub (`EventBus`, at-most-once) and durable streams
(`EventStream`, Redis Streams with consumer groups, at-least-once).

Pub/sub is right for hints (a UI refresh, a cache invalidation): a message
published while a subscriber is reconnecting is lost. Events that must not be
lost go to an `EventStream`: entries stay in Redis until a consumer of the
group acknowledges them, and entries a dead consumer read but never acked are
re-delivered to another consumer (XAUTOCLAIM). Consumers must be idempotent.

Channel names live under the key prefix: ``agent:updates`` is sent on
``<prefix>agent:updates`` (``mcp:agent:updates`` by default).

The package has the shape of every feature: this front (`EventBus`,
`Subscription`, `publish_agent_update`; validation and JSON in `codec`) picks
its backend from ``client.mode("events")`` through `_BY_MODE`:

============  ==========================================================
``redis``     `events.redis.RedisEventsBackend` (PUBLISH, one resilient
              `mcp_redis.pubsub.Subscriber` per subscription)
``local``     `events.memory.MemoryEventsBackend` (in-process broker: only
              subscriptions of the same client in this process receive)
``off``       `FeatureDisabled` on publish and subscribe
============  ==========================================================

There is no fallback: pub/sub never falls back to the in-process broker when
Redis is down (publish raises `BackendUnavailable`; a subscription retries
by itself). The protocol both implement is `events.base.Backend`. Backends
are per client (``client.singleton``) and own their listener threads:
closing the client (``reset()``/``configure()`` close the default one) stops
every subscription made through it; a forked child forgets them. Durable
streams (`events.streams`) always need Redis.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, Optional

from ..client import Client, resolve
from ..config import Mode
from ..connections import on_fork
from ..errors import FeatureDisabled
from ..keys import validate_id
from ..metrics import METRICS
from ..validation import seconds
from .base import Backend, Event, EventHandler, Listener, Message, Topic
from .codec import check_channel, check_handler, encode_event
from .codec import decode_event as decode_event  # the pre-package module's name
from .memory import MemoryEventsBackend
from .redis import RedisEventsBackend
from .streams import EventStream, StreamConsumer, StreamEntry, check_client

__all__ = [
    "AGENT_UPDATES",
    "EventBus",
    "Subscription",
    "EventStream",
    "StreamEntry",
    "StreamConsumer",
    "publish_agent_update",
]

log = logging.getLogger("mcp_redis.events")

AGENT_UPDATES = "agent:updates"
"""The channel of `publish_agent_update` (sent on ``<prefix>agent:updates``)."""


# -- the backend of a client: fallback policy as data ---------------------------------
def _disabled(client: Client) -> Backend:
    raise FeatureDisabled("events: off (MCP_REDIS_EVENTS_BACKEND=off)")


_BY_MODE: Dict[Mode, Callable[[Client], Backend]] = {
    Mode.REDIS: RedisEventsBackend,
    Mode.LOCAL: lambda client: MemoryEventsBackend(),
    Mode.OFF: _disabled,
}
_KEY: Dict[Mode, Any] = {mode: ("events", mode.value) for mode in _BY_MODE}


def backend(client: Client) -> Backend:
    """The events `Backend` of `client` (built once per client; `FeatureDisabled` when off)."""
    mode = client.mode("events")
    return client.singleton(_KEY[mode], lambda: _BY_MODE[mode](client))


# -- pub/sub -------------------------------------------------------------------
class Subscription:
    """One live subscription: its own daemon thread calls the handler.

    Calls are one at a time and in publish order. `close()` stops it; it is
    also a context manager. Counters: `delivered` (handler calls that
    returned), `errors` (handler raised), `skipped` (payloads that were not a
    JSON object), `reconnects`.
    """

    def __init__(self, channel: str, handler: EventHandler, *, pattern: bool, with_channel: bool,
                 client: Optional[Client] = None) -> None:
        self.client = resolve(client)
        self.channel = channel
        self.pattern = pattern
        self.with_channel = with_channel
        self._handler = handler
        self.delivered = 0
        self.errors = 0
        self.skipped = 0
        self._prefix = ""
        self._listener: Optional[Listener] = None

    def __repr__(self) -> str:
        kind = "pattern" if self.pattern else "channel"
        state = "active" if self.active else "inactive"
        return f"Subscription({kind}={self.channel!r}, {state}, delivered={self.delivered})"

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def redis_channel(self) -> str:
        """The channel (or pattern) as Redis sees it, prefix included."""
        return self._prefix + self.channel

    @property
    def active(self) -> bool:
        """True while subscribed (False while reconnecting or after close)."""
        return self._listener is not None and self._listener.active

    @property
    def reconnects(self) -> int:
        return self._listener.reconnects if self._listener is not None else 0

    def wait_active(self, timeout: float) -> bool:
        """Block until subscribed (again, after a reconnect); False on timeout."""
        return self._listener is not None and self._listener.wait_active(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the listener and join its thread. Idempotent."""
        if self._listener is not None:
            self._listener.close(timeout)

    # -- the backend's sink --------------------------------------------------------
    def _start(self, timeout: float) -> Subscription:
        events = backend(self.client)
        self._prefix = events.prefix
        self._listener = events.subscribe(Topic(self.channel, self.pattern), self, timeout)
        return self

    def _skip(self) -> None:
        self.skipped += 1
        METRICS.inc("events_decode_errors_total", kind="pubsub")
        # Once per subscription at WARNING (anyone who may publish on the channel could flood the
        # log otherwise), then at DEBUG; `skipped` and the metric count every one.
        log.log(logging.WARNING if self.skipped == 1 else logging.DEBUG,
                "subscription %r: skipped a payload that is not a JSON object (%d so far)", self.channel, self.skipped)

    def _deliver(self, message: Message) -> None:
        try:
            if self.with_channel:
                self._handler(message.channel, message.event)
            else:
                self._handler(message.event)
        except BaseException:  # SystemExit too: it would end the listener's thread, silently
            self.errors += 1
            METRICS.inc("events_handler_errors_total", kind="pubsub")
            log.exception("subscription %r: handler raised; the subscription lives on", self.channel)
            return
        self.delivered += 1
        METRICS.inc("events_delivered_total", kind="pubsub")


_buses: weakref.WeakSet[EventBus] = weakref.WeakSet()


@on_fork
def _after_fork() -> None:
    for bus in list(_buses):
        bus._lock = threading.Lock()  # a parent thread may have held it while forking


class EventBus:
    """Publish JSON events and subscribe handlers to channels or patterns.

    Stateless apart from the subscriptions it made (`close()` closes them);
    the settings in force are read on every call. Thread-safe.
    """

    def __init__(self, client: Optional[Client] = None) -> None:
        self.client = check_client(client)  # None: the default client at each call
        self._lock = threading.Lock()
        _buses.add(self)
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"EventBus(subscriptions={len(self._subs)})"

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, channel: str, event: Dict[str, Any]) -> int:
        """Send `event` (a JSON-ready dict) on `channel`; returns the receivers.

        Receivers are counted by Redis (every subscribed connection, in every
        process; in a cluster, only those on the node that took the PUBLISH).
        At-most-once: nobody subscribed means nobody gets it.
        Raises `BackendUnavailable` when Redis does not answer. Never retried:
        a reply lost after Redis published would make a retry deliver twice,
        and pub/sub promises at most once.
        """
        name = check_channel(channel)
        payload = encode_event(event)
        receivers = backend(resolve(self.client)).publish(name, payload)
        METRICS.inc("events_published_total")
        return receivers

    def subscribe(
        self,
        channel: str,
        handler: EventHandler,
        *,
        pattern: bool = False,
        with_channel: bool = False,
        timeout: float = 5.0,
    ) -> Subscription:
        """Call ``handler(event)`` for every event on `channel`; returns once active.

        ``pattern=True`` treats `channel` as a Redis glob (``agent:*``) matched
        under the prefix. ``with_channel=True`` calls ``handler(channel, event)``
        with the channel name as published (prefix removed). Raises
        `BackendUnavailable` if not subscribed within `timeout` seconds.
        """
        name = check_channel(channel, "pattern" if pattern else "channel")
        fn = check_handler(handler)
        wait = seconds(timeout, "timeout")
        sub = Subscription(name, fn, pattern=bool(pattern), with_channel=bool(with_channel), client=self.client)
        sub._start(wait)
        with self._lock:
            self._subs.add(sub)
        return sub

    def psubscribe(self, pattern: str, handler: EventHandler, *, with_channel: bool = False,
                   timeout: float = 5.0) -> Subscription:
        """`subscribe` with ``pattern=True``."""
        return self.subscribe(pattern, handler, pattern=True, with_channel=with_channel, timeout=timeout)

    def publish_agent_update(self, agent_id: str, event: str,
                             metrics: Optional[Dict[str, Any]] = None) -> int:
        """Publish ``{"agent_id", "event", "metrics", "ts"}`` on ``agent:updates``."""
        return self.publish(AGENT_UPDATES, agent_update(agent_id, event, metrics))

    def close(self) -> None:
        """Close every subscription made through this bus."""
        with self._lock:
            subs = list(self._subs)
            self._subs = weakref.WeakSet()
        for sub in subs:
            sub.close()


def agent_update(agent_id: str, event: str, metrics: Optional[Dict[str, Any]] = None) -> Event:
    """The payload of an agent update (validated): agent_id, event, metrics, ts."""
    validate_id(agent_id, "agent_id")
    validate_id(event, "event")
    if metrics is None:
        metrics = {}
    encode_event(metrics, "metrics")
    return {"agent_id": agent_id, "event": event, "metrics": metrics, "ts": time.time()}


def publish_agent_update(agent_id: str, event: str, metrics: Optional[Dict[str, Any]] = None) -> int:
    """Publish an agent update on ``agent:updates``; returns the receivers.

    The event is ``{"agent_id": ..., "event": ..., "metrics": {...}, "ts":
    <unix seconds>}``. Best effort (pub/sub); for updates that must not be
    lost, also `EventStream.add` them.
    """
    return EventBus().publish_agent_update(agent_id, event, metrics)

