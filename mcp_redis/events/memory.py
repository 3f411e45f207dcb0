"""The in-process events backend ("local" in settings): a broker per client.

Delivers only to subscriptions made through the same `mcp_redis.Client` in
this process, with the Redis backend's threading and ordering guarantees: a
queue and a daemon thread per subscription, one handler call at a time, in
publish order. Patterns are `fnmatch` globs. Each receiver decodes its own
copy of the event.
"""

from __future__ import annotations

import fnmatch
import queue
import threading
from typing import List, Optional

from .base import Listener, Message, Sink, Topic
from .codec import decode_event

__all__ = ["MemoryEventsBackend"]


class _MemoryListener:
    """One subscription: a queue drained by its own daemon thread."""

    reconnects = 0  # nothing to reconnect to

    def __init__(self, broker: MemoryEventsBackend, topic: Topic, sink: Sink) -> None:
        self._broker = broker
        self.topic = topic
        self._sink = sink
        self._queue: queue.SimpleQueue[Optional[Message]] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"mcp_redis-events-local:{topic.name[:40]}",
                                        daemon=True)
        self._thread.start()

    @property
    def active(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def wait_active(self, timeout: float) -> bool:
        return self.active  # active from the start until closed

    def matches(self, channel: str) -> bool:
        if self.topic.pattern:
            return fnmatch.fnmatchcase(channel, self.topic.name)
        return channel == self.topic.name

    def put(self, channel: str, payload: str) -> None:
        event = decode_event(payload)  # each receiver gets its own copy
        if event is not None:
            self._queue.put(Message(channel, event))

    def close(self, timeout: float = 2.0) -> None:
        self._closed = True
        self._broker._discard(self)
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            self._sink._deliver(item)


class MemoryEventsBackend:
    """`Backend` inside this process; one per client (``client.singleton``)."""

    prefix = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: List[_MemoryListener] = []

    def __repr__(self) -> str:
        return f"MemoryEventsBackend(listeners={len(self._listeners)})"

    def publish(self, channel: str, payload: str) -> int:
        with self._lock:
            targets = [li for li in self._listeners if li.matches(channel)]
        for li in targets:
            li.put(channel, payload)
        return len(targets)

    def subscribe(self, topic: Topic, sink: Sink, timeout: float) -> Listener:
        listener = _MemoryListener(self, topic, sink)
        with self._lock:
            self._listeners.append(listener)
        return listener

    def _discard(self, listener: _MemoryListener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def close(self) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for li in listeners:
            li.close(0)
