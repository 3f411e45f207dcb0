"""EventBus (pub/sub) on a real redis-server, and in local mode.

Specification: JSON dicts in, the same dicts (as JSON round-trips them) out;
one handler call at a time per subscription, in publish order, on a daemon
thread; a raising handler is logged and the subscription lives on; channels
live under the key prefix; bad input raises naming the argument before
anything is sent; after a Redis restart the subscription resumes by itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any, List, Tuple

import pytest

import mcp_redis
from mcp_redis.errors import BackendUnavailable, InvalidArgument, InvalidArgumentType
from mcp_redis.events import AGENT_UPDATES, EventBus, publish_agent_update
from mcp_redis.testing import wait_for


class Inbox:
    """A thread-safe list of what a handler received."""

    def __init__(self) -> None:
        self.items: List[Any] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()
        self.busy = 0
        self.overlaps = 0

    def __call__(self, *args: Any) -> None:
        with self._lock:
            self.busy += 1
            self.overlaps += self.busy > 1
            self.threads.add(threading.get_ident())
        with self._lock:
            self.items.append(args[0] if len(args) == 1 else args)
            self.busy -= 1

    def wait(self, n: int, timeout: float = 10.0) -> List[Any]:
        wait_for(lambda: len(self.items) >= n, timeout, what=f"{n} events")
        return list(self.items)


@pytest.fixture
def bus(redis_mode: str) -> EventBus:
    with EventBus() as b:
        yield b  # type: ignore[misc]


def test_subscriber_receives_published_dicts_in_publish_order(bus: EventBus) -> None:
    inbox = Inbox()
    sub = bus.subscribe("orders", inbox)
    assert sub.active
    events = [{"n": i, "nested": {"l": [1, "x", None, True]}, "s": "é\u2028"} for i in range(500)]
    for e in events:
        assert bus.publish("orders", e) == 1
    assert inbox.wait(500) == events
    assert sub.delivered == 500


def test_handler_runs_one_call_at_a_time_on_one_daemon_thread(bus: EventBus) -> None:
    inbox = Inbox()
    seen_daemon: List[bool] = []
    bus.subscribe("c", lambda e: (seen_daemon.append(threading.current_thread().daemon), inbox(e)))
    publishers = [threading.Thread(target=lambda k=k: [bus.publish("c", {"k": k, "i": i}) for i in range(100)])
                  for k in range(4)]
    for t in publishers:
        t.start()
    for t in publishers:
        t.join()
    got = inbox.wait(400)
    assert inbox.overlaps == 0 and len(inbox.threads) == 1
    assert all(seen_daemon) and threading.get_ident() not in inbox.threads
    for k in range(4):  # each publisher's own order is kept
        assert [e["i"] for e in got if e["k"] == k] == list(range(100))


def test_json_round_trip_is_what_the_handler_gets(bus: EventBus) -> None:
    inbox = Inbox()
    bus.subscribe("c", inbox)
    bus.publish("c", {1: (1, 2), "f": 1.5})
    assert inbox.wait(1) == [{"1": [1, 2], "f": 1.5}]


def test_channel_is_sent_under_the_key_prefix(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, key_prefix="app1:")
    bus = EventBus()
    sub = bus.subscribe(AGENT_UPDATES, Inbox())
    assert sub.redis_channel == "app1:agent:updates"
    from redis import Redis

    client = Redis.from_url(redis_url, decode_responses=True)
    assert client.pubsub_channels() == ["app1:agent:updates"]
    ps = client.pubsub()
    ps.subscribe("app1:agent:updates")
    wait_for(lambda: ps.get_message(timeout=0.1) is not None, what="raw subscribe")
    assert bus.publish(AGENT_UPDATES, {"a": 1}) == 2
    msg = None
    for _ in range(50):
        msg = ps.get_message(timeout=0.2)
        if msg and msg["type"] == "message":
            break
    assert msg is not None and msg["data"] == '{"a":1}'
    ps.close()
    client.close()


def test_payloads_that_are_not_a_json_object_are_skipped(bus: EventBus, redis_url: str) -> None:
    inbox = Inbox()
    sub = bus.subscribe("c", inbox)
    from redis import Redis

    raw = Redis.from_url(redis_url, decode_responses=True)
    # A JSON object nested deeper than Python's recursion limit too (json raises RecursionError).
    deep = '{"a":' + "[" * 5000 + "]" * 5000 + "}"
    deeper_than_written = '{"a":' + "[" * 300 + "]" * 300 + "}"  # decodable, but the library never writes it
    # 1e999 is valid JSON, but a float out of range: it would decode to Infinity.
    for junk in ("not json", "[1, 2]", "42", "\"s\"", '{"n": NaN}', '{"n": -Infinity}', '{"n": -1e999}', deep,
                 deeper_than_written):
        raw.publish(sub.redis_channel, junk)
    bus.publish("c", {"ok": True})
    assert inbox.wait(1) == [{"ok": True}]
    assert sub.skipped == 9 and sub.errors == 0 and sub.active
    raw.publish(sub.redis_channel, b"\xff not utf-8")  # skipped too; the connection is dropped under it
    wait_for(lambda: sub.skipped == 10, what="the undecodable payload skipped")
    wait_for(lambda: (bus.publish("c", {"ok": 2}), inbox.wait(0.2))[1][-1:] == [{"ok": 2}], timeout=10,
             what="events after it delivered")
    assert sub.active
    raw.close()


def test_pattern_subscription_gets_the_unprefixed_channel(bus: EventBus) -> None:
    inbox = Inbox()
    bus.psubscribe("agent:*", inbox, with_channel=True)
    plain = Inbox()
    bus.subscribe("agent:*", plain)  # not a pattern: only the literal channel
    bus.publish("agent:updates", {"a": 1})
    bus.publish("other", {"a": 2})
    bus.publish("agent:x:y", {"a": 3})
    bus.publish("agent:*", {"a": 4})
    assert inbox.wait(3) == [("agent:updates", {"a": 1}), ("agent:x:y", {"a": 3}), ("agent:*", {"a": 4})]
    assert plain.wait(1) == [{"a": 4}]


def test_a_pattern_never_matches_outside_the_prefix(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, key_prefix="mine:")
    inbox = Inbox()
    EventBus().psubscribe("*", inbox, with_channel=True)
    from redis import Redis

    raw = Redis.from_url(redis_url, decode_responses=True)
    assert raw.publish("theirs:x", '{"no": 1}') == 0
    EventBus().publish("x", {"yes": 1})
    assert inbox.wait(1) == [("x", {"yes": 1})]
    raw.close()


def test_close_stops_delivery_and_is_idempotent(bus: EventBus) -> None:
    inbox = Inbox()
    sub = bus.subscribe("c", inbox)
    bus.publish("c", {"n": 1})
    inbox.wait(1)
    sub.close()
    sub.close()
    assert not sub.active
    assert bus.publish("c", {"n": 2}) == 0


def test_reset_stops_every_subscription(redis_mode: str) -> None:
    sub = EventBus().subscribe("c", Inbox())
    mcp_redis.reset()
    assert not sub.active


BAD_PUBLISH: List[Tuple[Any, Any, type, str]] = [
    (None, {"a": 1}, InvalidArgumentType, "channel"),
    (b"c", {"a": 1}, InvalidArgumentType, "channel"),
    ("", {"a": 1}, InvalidArgument, "channel"),
    ("x" * 1025, {"a": 1}, InvalidArgument, "channel"),
    ("c", ["a"], InvalidArgumentType, "event"),
    ("c", None, InvalidArgumentType, "event"),
    ("c", {"a": object()}, InvalidArgumentType, "event"),
    ("c", {"a": {1, 2}}, InvalidArgumentType, "event"),
    ("c", {(1, 2): "tuple key"}, InvalidArgumentType, "event"),
    ("c", {"a": math.nan}, InvalidArgument, "event"),
]


@pytest.mark.parametrize("channel,event,error,argument", BAD_PUBLISH)
def test_bad_publish_raises_naming_the_argument_before_sending(
        bus: EventBus, channel: Any, event: Any, error: type, argument: str) -> None:
    inbox = Inbox()
    bus.psubscribe("*", inbox, with_channel=True)
    with pytest.raises(error) as info:
        bus.publish(channel, event)
    assert str(info.value).startswith(f"{argument}:")
    bus.publish("sentinel", {"last": True})
    assert inbox.wait(1) == [("sentinel", {"last": True})]  # nothing was sent before it


def test_bad_subscribe_raises_naming_the_argument(bus: EventBus) -> None:
    with pytest.raises(InvalidArgumentType, match="^handler:"):
        bus.subscribe("c", "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="^channel:"):
        bus.subscribe("", Inbox())
    with pytest.raises(InvalidArgument, match="^pattern:"):
        bus.psubscribe("p" * 1025, Inbox())
    with pytest.raises(InvalidArgumentType, match="^channel:"):
        bus.subscribe(7, Inbox())  # type: ignore[arg-type]


def test_publish_agent_update_sends_agent_id_event_metrics_and_ts(bus: EventBus) -> None:
    inbox = Inbox()
    bus.subscribe(AGENT_UPDATES, inbox)
    assert publish_agent_update("agent-1", "state_changed", {"coherence": 0.5}) == 1
    assert bus.publish_agent_update("agent-2", "paused") == 1
    first, second = inbox.wait(2)
    assert set(first) == {"agent_id", "event", "metrics", "ts"}
    assert first["agent_id"] == "agent-1" and first["event"] == "state_changed"
    assert first["metrics"] == {"coherence": 0.5} and isinstance(first["ts"], float)
    assert second["metrics"] == {}
    with pytest.raises(InvalidArgument, match="^agent_id:"):
        publish_agent_update("", "x")
    with pytest.raises(InvalidArgumentType, match="^metrics:"):
        publish_agent_update("a", "x", metrics=[1])  # type: ignore[arg-type]


def _listening(redis_url: str, **settings: Any) -> Tuple[EventBus, Inbox, Any]:
    """Configured on `redis_url`: a bus, and its subscription to "c" that got a first event."""
    mcp_redis.configure(redis_url=redis_url, **settings)
    bus = EventBus()
    inbox = Inbox()
    sub = bus.subscribe("c", inbox)
    bus.publish("c", {"n": 0})
    inbox.wait(1)
    return bus, inbox, sub


def _delivered_again(server: Any, sub: Any, inbox: Inbox) -> None:
    """Publish straight to `server` until `sub` delivers it (events sent while it reconnects are lost)."""
    direct = server.client()
    wait_for(lambda: (direct.publish(sub.redis_channel, json.dumps({"n": 1})), inbox.items[-1:] == [{"n": 1}])[1],
             15, interval=0.1, what="delivery after it subscribed again")


def test_subscription_resumes_by_itself_after_redis_restarts(redis_factory: Any) -> None:
    server = redis_factory()
    bus, inbox, sub = _listening(server.url)
    server.restart()
    # Publish until it arrives: events sent while reconnecting are lost (at-most-once).
    n = 0
    stop = threading.Event()

    def delivered_after_restart() -> bool:
        nonlocal n
        n += 1
        try:
            bus.publish("c", {"n": n})
        except BackendUnavailable:
            pass
        stop.wait(0.01)
        return any(e["n"] > 0 for e in inbox.items)

    wait_for(delivered_after_restart, 20, interval=0, what="an event after the restart")
    assert sub.active and sub.reconnects >= 1
    ns = [e["n"] for e in inbox.items]
    assert ns == sorted(ns)


def test_a_subscription_whose_connection_goes_silent_reconnects_by_itself(redis_server: Any) -> None:
    """A connection that dies without a close or a reset (the host vanished, a firewall dropped
    the flow) answers nothing: the listener's PING after `health_check_interval` idle seconds
    goes unanswered for `socket_timeout`, and it reconnects (here once the silence ends: the
    proxy's black hole holds new connections too, and closes the silent one only after it)."""
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        bus, inbox, sub = _listening(proxy.url(), health_check_interval=1, socket_timeout=1.0)
        proxy.blackhole()
        # Without the probe the listener reads nothing and stays active, for ever.
        wait_for(lambda: not sub.active, 15, what="the silent connection found dead")
        assert sub.reconnects >= 1
        proxy.pass_through()
        assert sub.wait_active(15)
        _delivered_again(redis_server, sub, inbox)
        bus.close()


def test_a_subscription_whose_subscribe_is_never_answered_tries_again_and_resumes(redis_server: Any) -> None:
    """A new connection whose handshake passes but whose SUBSCRIBE is never answered (its flow
    dropped on the path) gives up within the socket timeout and tries again; it used to wait
    for the confirmation for ever, deaf, and the cache's L1 was never flushed."""
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        bus, inbox, sub = _listening(proxy.url(), socket_timeout=1.0)
        proxy.swallow_requests(b"SUBSCRIBE")
        redis_server.client().client_kill_filter(_type="pubsub")  # the listener reconnects
        wait_for(lambda: sub.reconnects >= 3, 15, what="attempts to subscribe that time out")
        assert not sub.active
        proxy.swallow_requests(None)
        assert sub.wait_active(15)
        _delivered_again(redis_server, sub, inbox)
        bus.close()


def test_closing_a_subscriber_mid_subscribe_never_lends_its_connection_to_another_command(redis_server: Any) -> None:
    """`close()` from another thread while the listener still uses its connection (here: waiting
    for a SUBSCRIBE confirmation) must not put that connection back in the pool: another thread's
    command would get it, and the listener could read that command's reply. The listener thread
    hands it back itself once it stopped."""
    from mcp_redis.pubsub import Subscriber
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=5.0)
        pool = mcp_redis.default_client().redis().client.connection_pool
        proxy.swallow_requests(b"SUBSCRIBE")
        sub = Subscriber(lambda channel, data: None, channels=["c", "c"]).start(wait=False)
        wait_for(lambda: sub._pubsub is not None and sub._pubsub.connection is not None, what="subscribing")
        connection = sub._pubsub.connection
        released_by: List[threading.Thread] = []  # who gave `connection` back to the pool
        release = pool.release

        def recording_release(conn: Any) -> None:
            if conn is connection:
                released_by.append(threading.current_thread())
            release(conn)

        pool.release = recording_release  # type: ignore[method-assign]

        def idle() -> List[Any]:  # the pool's idle connections (a blocking pool keeps a queue)
            return list(pool.pool.queue)

        sub.close(timeout=0.0)  # the listener is still waiting for its confirmation
        wait_for(lambda: not sub.alive, 10, what="the listener to stop")
        assert connection in idle()  # handed back, disconnected ...
        assert released_by == [sub._thread]  # ... by the listener itself once it stopped, never by close()
        assert sub._pubsub is None


def test_foreign_payloads_are_logged_at_warning_once_per_subscription(
        bus: EventBus, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # One WARNING per payload: anyone who may publish on the channel could flood the log (a reviewer).
    inbox = Inbox()
    sub = bus.subscribe("c", inbox)
    from redis import Redis

    raw = Redis.from_url(redis_url)
    with caplog.at_level(logging.DEBUG, logger="mcp_redis.events"):
        for _ in range(50):
            raw.publish(sub.redis_channel, "junk")
        bus.publish("c", {"ok": True})
        assert inbox.wait(1) == [{"ok": True}]
    assert sub.skipped == 50
    warnings = [r for r in caplog.records if r.name == "mcp_redis.events" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped" in warnings[0].getMessage()
    raw.close()


def test_each_undecodable_payload_costs_one_short_resubscription_never_a_growing_backoff(redis_url: str) -> None:
    """The reconnect backoff doubled on every loss for the life of the listener: after six
    foreign payloads each later one kept the subscription down for up to 1.5 s (a reviewer:
    one junk payload every 250 ms let through a quarter of the events). A confirmed
    subscription now starts the backoff anew."""
    from mcp_redis.pubsub import Subscriber

    mcp_redis.configure(redis_url=redis_url)
    got: List[Any] = []
    sub = Subscriber(lambda channel, data: got.append(data), channels=["c"]).start(wait=True, timeout=5)
    waits: List[float] = []
    wait = sub._closed.wait

    def recording_wait(timeout: Any = None) -> bool:
        waits.append(timeout)
        return wait(timeout)

    sub._closed.wait = recording_wait  # type: ignore[method-assign]
    raw = mcp_redis.default_client().redis().client
    try:
        for n in range(1, 9):
            raw.publish("c", b"\xff not utf-8")
            wait_for(lambda: sub.reconnects == n and sub.active, 10, what=f"resubscription {n}")
        assert len(waits) == 8 and max(waits) <= 0.02 * 1.5  # the first backoff every time, with jitter
        raw.publish("c", "after")
        wait_for(lambda: got[-1:] == ["after"], what="delivery after the last one")
    finally:
        sub.close()


def test_a_channel_listed_twice_is_subscribed_once(redis_url: str) -> None:
    from mcp_redis.pubsub import Subscriber

    mcp_redis.configure(redis_url=redis_url)
    got: List[Any] = []
    sub = Subscriber(lambda channel, data: got.append(data), channels=["c", "c"], patterns=["p*", "p*"]).start(
        wait=True, timeout=5)
    mcp_redis.default_client().redis().client.publish("c", "x")
    wait_for(lambda: got == ["x"], what="the message")
    assert sub.channels == ("c",) and sub.patterns == ("p*",)
    sub.close()


def test_publish_and_subscribe_raise_backend_unavailable_when_redis_is_down(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, socket_connect_timeout=0.2, retry_attempts=1)
    server.stop()
    with pytest.raises(BackendUnavailable):
        EventBus().publish("c", {"a": 1})
    with pytest.raises(BackendUnavailable):
        EventBus().subscribe("c", Inbox(), timeout=0.5)


def test_local_mode_delivers_inside_the_process() -> None:
    bus = EventBus()  # no REDIS_URL
    inbox, pattern = Inbox(), Inbox()
    sub = bus.subscribe("c", inbox)
    bus.psubscribe("c*", pattern, with_channel=True)
    events = [{"n": i} for i in range(100)]
    for e in events:
        assert bus.publish("c", e) == 2
    assert bus.publish("zzz", {"n": -1}) == 0
    assert inbox.wait(100) == events
    assert pattern.wait(100) == [("c", e) for e in events]
    sub.close()
    assert bus.publish("c", {"n": 1}) == 1


def test_local_mode_delivers_only_to_subscriptions_of_the_same_client() -> None:
    with mcp_redis.Client(redis_url=None) as one, mcp_redis.Client(redis_url=None) as other:
        mine, theirs = Inbox(), Inbox()
        EventBus(client=one).subscribe("c", mine)
        EventBus(client=other).subscribe("c", theirs)
        assert EventBus(client=one).publish("c", {"n": 1}) == 1
        assert mine.wait(1) == [{"n": 1}]
        assert theirs.items == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sees_the_parents_subscription_inactive_and_closing_it_there_leaves_the_parent_subscribed(
        bus: EventBus) -> None:
    inbox = Inbox()
    sub = bus.subscribe("c", inbox)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 3
        try:
            inactive = not sub.active and not sub.wait_active(0.2)
            sub.close()
            code = 0 if inactive else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sub.active
    assert bus.publish("c", {"n": 1}) == 1
    assert inbox.wait(1) == [{"n": 1}]


def test_reset_leaves_the_subscriptions_of_a_client_you_made_running(redis_url: str) -> None:
    with mcp_redis.Client(redis_url=redis_url) as client:
        inbox = Inbox()
        sub = EventBus(client=client).subscribe("c", inbox)
        mcp_redis.reset()
        assert sub.active
        assert EventBus(client=client).publish("c", {"n": 1}) == 1
        assert inbox.wait(1) == [{"n": 1}]


def test_subscribe_to_a_hung_server_gives_up_after_its_own_timeout(redis_factory: Any) -> None:
    # It used to join the listener thread, stuck in a read, for 2 s more.
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    mcp_redis.EventBus().publish("warm", {})  # the pool is connected
    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(mcp_redis.BackendUnavailable):
            mcp_redis.EventBus().subscribe("c", lambda event: None, timeout=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        server.resume()
