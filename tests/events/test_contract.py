"""The events backend contract: the same behaviour on every backend.

Each test runs on `RedisEventsBackend` (a real redis-server) and on
`MemoryEventsBackend` (the in-process broker, "local" in settings), through
the front users call (`EventBus(client=...)`): `subscribe` returns once the
subscription is active; each subscription gets its events one at a time, in
publish order, with the channel as published; a raising handler is logged
and counted and the subscription lives on; `close()` stops delivery, is
idempotent, and closing the client stops every subscription made through it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Iterator, List

import pytest

from mcp_redis import Client
from mcp_redis.events import EventBus, backend
from mcp_redis.events.memory import MemoryEventsBackend
from mcp_redis.events.redis import RedisEventsBackend
from mcp_redis.metrics import METRICS
from mcp_redis.testing import wait_for

BACKENDS = {"redis": RedisEventsBackend, "memory": MemoryEventsBackend}


class Inbox:
    """What a handler received, and whether two calls ever overlapped."""

    def __init__(self) -> None:
        self.items: List[Any] = []
        self._lock = threading.Lock()
        self.busy = 0
        self.overlaps = 0

    def __call__(self, *args: Any) -> None:
        with self._lock:
            self.busy += 1
            self.overlaps += self.busy > 1
        with self._lock:
            self.items.append(args[0] if len(args) == 1 else args)
            self.busy -= 1

    def wait(self, n: int, timeout: float = 10.0) -> List[Any]:
        wait_for(lambda: len(self.items) >= n, timeout, what=f"{n} events")
        return list(self.items)


@pytest.fixture(params=sorted(BACKENDS))
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    if request.param == "redis":
        c = Client(redis_url=request.getfixturevalue("redis_url"))
    else:
        c = Client(redis_url=None)  # no Redis: local mode
    assert type(backend(c)) is BACKENDS[request.param]
    with c:
        yield c


@pytest.fixture
def bus(client: Client) -> Iterator[EventBus]:
    with EventBus(client=client) as b:
        yield b


def test_subscribe_returns_once_the_subscription_receives(bus: EventBus) -> None:
    inbox = Inbox()
    sub = bus.subscribe("contract:ready", inbox)
    assert sub.active and sub.wait_active(0)
    assert bus.publish("contract:ready", {"n": 1}) == 1  # no wait between subscribe and publish
    assert inbox.wait(1) == [{"n": 1}]


def test_each_subscription_gets_its_events_one_at_a_time_in_publish_order(bus: EventBus) -> None:
    plain, pattern = Inbox(), Inbox()
    bus.subscribe("contract:order", plain)
    bus.psubscribe("contract:ord*", pattern, with_channel=True)
    events = [{"n": i, "nested": {"l": [1, "x", None, True]}} for i in range(300)]
    for e in events:
        assert bus.publish("contract:order", e) == 2
    assert plain.wait(300) == events
    assert pattern.wait(300) == [("contract:order", e) for e in events]
    assert plain.overlaps == 0 and pattern.overlaps == 0


def test_a_raising_handler_is_logged_and_counted_and_the_subscription_lives_on(
        bus: EventBus, caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()

    def handler(event: Dict[str, Any]) -> None:
        if event["n"] % 2:
            raise RuntimeError("boom")
        inbox(event)

    caplog.set_level(logging.ERROR, logger="mcp_redis.events")
    sub = bus.subscribe("contract:errors", handler)
    for n in range(10):
        bus.publish("contract:errors", {"n": n})
    assert [e["n"] for e in inbox.wait(5)] == [0, 2, 4, 6, 8]
    wait_for(lambda: sub.errors == 5, what="5 handler errors")
    assert sub.active and sub.delivered == 5
    assert METRICS.counter("events_handler_errors_total", kind="pubsub") == 5
    assert "handler raised" in caplog.text and "boom" in caplog.text


@pytest.mark.parametrize("exit_exc", [SystemExit, KeyboardInterrupt], ids=["SystemExit", "KeyboardInterrupt"])
def test_a_handler_raising_system_exit_is_logged_and_counted_and_the_subscription_lives_on(
        bus: EventBus, caplog: pytest.LogCaptureFixture, exit_exc: type) -> None:
    """Not only `Exception`: a `BaseException` would end the listener's thread, silently."""
    inbox = Inbox()

    def handler(event: Dict[str, Any]) -> None:
        if event["n"] == 0:
            raise exit_exc(3)
        inbox(event)

    caplog.set_level(logging.ERROR, logger="mcp_redis.events")
    sub = bus.subscribe("contract:exit", handler)
    for n in range(3):
        bus.publish("contract:exit", {"n": n})
    assert [e["n"] for e in inbox.wait(2)] == [1, 2]
    assert sub.active and sub.errors == 1 and sub.delivered == 2
    assert "handler raised" in caplog.text and exit_exc.__name__ in caplog.text


def test_close_stops_delivery_and_is_idempotent(bus: EventBus) -> None:
    inbox = Inbox()
    sub = bus.subscribe("contract:close", inbox)
    bus.publish("contract:close", {"n": 1})
    inbox.wait(1)
    sub.close()
    sub.close()
    assert not sub.active
    assert bus.publish("contract:close", {"n": 2}) == 0
    assert inbox.items == [{"n": 1}]


def test_closing_the_client_stops_every_subscription_made_through_it(client: Client) -> None:
    bus = EventBus(client=client)
    subs = [bus.subscribe("contract:client", Inbox()), bus.psubscribe("contract:*", Inbox())]
    client.close()
    assert not any(s.active for s in subs)
