"""The Redis events backend: PUBLISH, and one `Subscriber` per subscription.

Channels live under the key prefix (``agent:updates`` is sent on
``mcp:agent:updates``); the prefix is removed again before delivery. Each
subscription is a `mcp_redis.pubsub.Subscriber` (its own daemon thread,
reconnecting and resubscribing by itself) on the client's ``events``
deployment (``MCP_REDIS_EVENTS_URL``, else ``REDIS_URL``).
"""

from __future__ import annotations

import threading
import weakref

from ..client import Client
from ..keys import KeySpace
from ..pubsub import Subscriber
from .base import Listener, Message, Sink, Topic
from .codec import decode_event

__all__ = ["RedisEventsBackend"]


class RedisEventsBackend:
    """`Backend` over Redis pub/sub; one per client (``client.singleton``)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.prefix = client.settings.key_prefix
        self._keys = KeySpace(self.prefix)
        self._lock = threading.Lock()
        self._listeners: weakref.WeakSet[Subscriber] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"RedisEventsBackend(prefix={self.prefix!r}, listeners={len(self._listeners)})"

    def publish(self, channel: str, payload: str) -> int:
        """PUBLISH once: never retried (a reply lost after Redis published would deliver twice)."""
        conn = self._client.redis("events")
        return int(conn.call(conn.client.publish, self._keys.channel(channel), payload, attempts=1))

    def subscribe(self, topic: Topic, sink: Sink, timeout: float) -> Listener:
        client = self._client
        prefix = self.prefix
        cut = len(prefix)

        def on_message(channel: str, data: str) -> None:
            event = decode_event(data)
            if event is None:
                sink._skip()
                return
            sink._deliver(Message(channel[cut:] if channel.startswith(prefix) else channel, event))

        key = [self._keys.channel(topic.name)]
        listener = Subscriber(
            on_message,
            channels=() if topic.pattern else key,
            patterns=key if topic.pattern else (),
            name=f"mcp_redis-events-{'p' if topic.pattern else 'c'}:{topic.name[:40]}",
            connection=lambda: client.redis("events"),
        )
        with self._lock:
            self._listeners.add(listener)
        try:
            listener.start(wait=True, timeout=timeout)
        except BaseException:
            with self._lock:
                self._listeners.discard(listener)
            raise
        return listener

    def close(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
            self._listeners = weakref.WeakSet()
        for listener in listeners:
            listener.close()
