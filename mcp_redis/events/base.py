"""The events backend protocol and the named types passed between front and backend.

The front (`EventBus`, `Subscription`) validates and encodes; a `Backend`
only moves payloads: ``publish(topic, payload)`` returns the receivers,
``subscribe(topic, sink, timeout)`` returns a `Listener` once it is active
and from then on hands every event to ``sink._deliver(Message)``, one at a
time, in publish order, on the listener's own daemon thread. Payloads that
are not a JSON object go to ``sink._skip()``. ``close()`` stops every
listener the backend started (the client calls it on close).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Protocol

__all__ = ["Event", "EventHandler", "Topic", "Message", "Sink", "Listener", "Backend"]

Event = Dict[str, Any]
"""An event: a JSON object (a dict of JSON-ready values)."""

# handler(event), or handler(channel, event) / handler(entry_id, event) when asked.
EventHandler = Callable[..., object]


class Topic(NamedTuple):
    """What a subscription listens to: a channel name, or a glob when `pattern`."""

    name: str
    pattern: bool = False


class Message(NamedTuple):
    """One delivered event: the channel as published (prefix removed) and the event."""

    channel: str
    event: Event


class Sink(Protocol):
    """Where a listener hands what it receives (a `Subscription`)."""

    def _deliver(self, message: Message) -> None:
        """Handle one event (exceptions are the sink's to log: it must not raise)."""

    def _skip(self) -> None:
        """Count one payload that was not a JSON object."""


class Listener(Protocol):
    """One live subscription inside a backend."""

    @property
    def active(self) -> bool:
        """True while subscribed (False while reconnecting or after close)."""

    @property
    def reconnects(self) -> int:
        """How often the listener re-subscribed after losing its connection."""

    def wait_active(self, timeout: float) -> bool:
        """Block until subscribed (again); False on timeout."""

    def close(self, timeout: float = 2.0) -> None:
        """Stop and join the listener thread. Idempotent."""


class Backend(Protocol):
    """The verbs every events backend offers (redis, memory)."""

    prefix: str
    """Prepended to channel names where the backend sends them ("" in memory)."""

    def publish(self, channel: str, payload: str) -> int:
        """Send `payload` (an encoded event) on `channel`; returns the receivers."""

    def subscribe(self, topic: Topic, sink: Sink, timeout: float) -> Listener:
        """Start listening to `topic`; returns once active (or raises `BackendUnavailable`)."""

    def close(self) -> None:
        """Stop every listener this backend started."""
