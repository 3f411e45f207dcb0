"""EventStream (Redis Streams + consumer groups) on a real redis-server.

Specification: at-least-once. An entry stays pending until acked; a handler
that raises leaves it pending and it is delivered again; entries a consumer
read but never acked are claimed by another consumer once idle longer than
`min_idle_ms`; a consumer restarted under the same name re-reads its own
pending entries first. The stream is bounded (MAXLEN ~) and expires when idle
(TTL refreshed on every add). The group is created idempotently and
recreated if Redis comes back empty.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List

import pytest
from redis import Redis

import mcp_redis
from mcp_redis.errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from mcp_redis.events import EventStream, StreamEntry
from mcp_redis.metrics import METRICS
from mcp_redis.testing import wait_for


@pytest.fixture
def raw(redis_mode: str) -> Redis:
    client = Redis.from_url(redis_mode, decode_responses=True)
    yield client  # type: ignore[misc]
    client.close()


def test_added_events_are_read_in_order_and_pending_until_acked(raw: Redis) -> None:
    producer = EventStream("orders")
    events = [{"n": i, "s": "ü"} for i in range(10)]
    ids = producer.add_many(events)
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    consumer = EventStream("orders", "billing")
    got = consumer.read(count=100, block_ms=10)
    assert [e.event for e in got] == events and [e.id for e in got] == ids
    assert consumer.pending() == 10
    assert consumer.ack(*ids[:4]) == 4
    assert consumer.pending() == 6
    assert consumer.ack(*ids[:4]) == 0  # acking twice is harmless


def test_add_keeps_the_stream_bounded_and_refreshes_its_idle_ttl(raw: Redis) -> None:
    s = EventStream("bounded", maxlen=100, ttl=60)
    for i in range(10):
        s.add_many({"n": i * 100 + j} for j in range(100))
    assert 100 <= raw.xlen(s.key) < 300  # MAXLEN ~ trims whole macro nodes
    raw.pexpire(s.key, 5000)
    s.add({"n": -1})
    assert 55_000 < raw.pttl(s.key) <= 60_000
    assert s.key.startswith("mcp:stream:")


def test_a_stream_without_ttl_is_refused_naming_it(raw: Redis) -> None:
    # Every key the library writes expires: a stream too (a long ttl for a quiet one).
    with pytest.raises(InvalidArgument, match="ttl"):
        EventStream("forever", "g", ttl=None, maxlen=10)
    assert raw.keys("*forever*") == []


def test_group_creation_is_idempotent_and_the_new_stream_expires(raw: Redis) -> None:
    a = EventStream("s", "g", ttl=30)
    assert a.ensure_group() is True
    assert EventStream("s", "g").ensure_group() is False
    assert 0 < raw.pttl(a.key) <= 30_000  # MKSTREAM's empty stream has a TTL too
    assert [g["name"] for g in raw.xinfo_groups(a.key)] == ["g"]


def test_every_group_sees_every_event_and_consumers_of_a_group_share_them(raw: Redis) -> None:
    ids = EventStream("s").add_many({"n": i} for i in range(20))
    for group in ("g1", "g2"):
        EventStream("s", group).ensure_group()
    c1, c2 = EventStream("s", "g1", "c1"), EventStream("s", "g1", "c2")
    first, second = c1.read(count=12, block_ms=0), c2.read(count=100, block_ms=0)
    assert [e.id for e in first] + [e.id for e in second] == ids
    assert [e.id for e in EventStream("s", "g2").read(count=100, block_ms=0)] == ids


def test_a_raising_handler_leaves_the_entry_pending_and_it_is_redelivered(raw: Redis) -> None:
    s = EventStream("s", "g", "c", min_idle_ms=50, claim_interval=0.01)
    s.add_many([{"n": 1}, {"n": 2}])
    calls: List[int] = []

    def flaky(event: Dict[str, Any]) -> None:
        calls.append(event["n"])
        if event["n"] == 2 and calls.count(2) == 1:
            raise RuntimeError("transient")

    assert s.process(flaky, block_ms=0) == (1, 1)
    assert s.pending() == 1
    wait_for(lambda: s.process(flaky, block_ms=0)[0] == 1, 10, what="re-delivery via XAUTOCLAIM")
    assert calls == [1, 2, 2] and s.pending() == 0
    assert METRICS.counter("events_handler_errors_total", kind="stream") == 1


def test_a_background_consumers_handler_raising_system_exit_leaves_the_entry_pending_and_the_consumer_alive(
        raw: Redis, caplog: pytest.LogCaptureFixture) -> None:
    """`SystemExit` from a handler would end the consumer's thread, silently, its entries left."""
    s = EventStream("s", "g", "c")
    seen: List[int] = []

    def handler(event: Dict[str, Any]) -> None:
        seen.append(event["n"])
        if event["n"] == 0:
            raise SystemExit(3)

    caplog.set_level(logging.ERROR, logger="mcp_redis.events")
    consumer = s.run_in_thread(handler, block_ms=50)
    s.add_many([{"n": 0}, {"n": 1}])
    wait_for(lambda: consumer.handled == 1, what="the next entry handled")
    assert consumer.alive and s.pending() == 1 and seen == [0, 1]
    assert "SystemExit" in caplog.text
    consumer.close()


def test_consume_in_the_callers_thread_lets_keyboard_interrupt_through_and_leaves_the_entry_pending(
        raw: Redis) -> None:
    s = EventStream("s", "g", "c")
    s.add({"n": 0})

    def handler(event: Dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.consume(handler, block_ms=10, max_events=1)
    assert s.pending() == 1


def test_a_dead_consumers_pending_entries_are_claimed_by_another(raw: Redis) -> None:
    ids = EventStream("s").add_many({"n": i} for i in range(5))
    dead = EventStream("s", "g", "dead")
    assert len(dead.read(count=5, block_ms=0)) == 5  # read, never acked: then it "dies"
    alive = EventStream("s", "g", "alive", min_idle_ms=100, claim_interval=0.01)
    claimed: List[Any] = []
    wait_for(lambda: claimed.extend(alive.read(count=10, block_ms=0)) or len(claimed) >= 5, 10,
             interval=0.02, what="claimed entries")
    assert [e.id for e in claimed] == ids and all(e.claimed for e in claimed)
    assert alive.ack(*ids) == 5 and alive.pending() == 0
    assert alive.claimed == 5


def test_a_consumer_restarted_under_its_name_rereads_its_own_pending_first(raw: Redis) -> None:
    ids = EventStream("s").add_many({"n": i} for i in range(3))
    before = EventStream("s", "g", "worker-1")
    assert len(before.read(count=3, block_ms=0)) == 3
    EventStream("s").add({"n": 3})
    after = EventStream("s", "g", "worker-1")  # same name, as after a process restart
    assert [e.id for e in after.read(count=10, block_ms=0)] == ids  # own pending first
    assert [e.event for e in after.read(count=10, block_ms=0)] == [{"n": 3}]


def test_trimmed_or_unreadable_entries_are_acked_and_skipped(raw: Redis) -> None:
    s = EventStream("s", "g", "c", min_idle_ms=0, claim_interval=0)
    s.ensure_group()
    raw.xadd(s.key, {"e": "not json"})
    raw.xadd(s.key, {"other": "field"})
    raw.xadd(s.key, {"e": b"\xff not utf-8"})  # a foreign producer: read undecoded, never a decode error
    raw.xadd(s.key, {"e": '{"n": NaN}'})  # not strict JSON
    raw.xadd(s.key, {"e": '{"a":' + "[" * 5000 + "]" * 5000 + "}"})  # deeper than json's recursion limit
    raw.xadd(s.key, {"e": '{"a":' + "[" * 300 + "]" * 300 + "}"})  # deeper than the library ever writes
    s.add({"ok": 1})
    got: List[Any] = []
    assert s.process(got.append, block_ms=0) == (7, 0)
    assert got == [{"ok": 1}] and s.pending() == 0
    s.add({"ok": 2})
    assert s.process(got.append, block_ms=0) == (1, 0), "the group reads on past them"


def test_consume_loop_stops_on_max_events_and_run_in_thread_closes(raw: Redis) -> None:
    s = EventStream("s", "g")
    s.add_many({"n": i} for i in range(30))
    got: List[Any] = []
    assert s.consume(got.append, count=7, block_ms=10, max_events=30) == 30
    assert [e["n"] for e in got] == list(range(30))
    more: List[Any] = []
    consumer = s.run_in_thread(more.append, block_ms=50)
    s.add({"n": 30})
    wait_for(lambda: more == [{"n": 30}], what="background consumer")
    consumer.close()
    assert not consumer.alive and consumer.handled == 1


def test_consumer_thread_survives_a_redis_restart_and_recreates_the_group(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    s = EventStream("s", "g", min_idle_ms=1000)
    got: List[Any] = []
    lock = threading.Lock()
    consumer = s.run_in_thread(lambda e: (lock.acquire(), got.append(e), lock.release()), block_ms=100)
    try:
        s.add({"n": 0})
        wait_for(lambda: got == [{"n": 0}], what="first event")
        server.restart()  # empty: stream and group are gone
        wait_for(lambda: _try_add(s, {"n": 1}), 20, interval=0.05, what="an add after the restart")
        wait_for(lambda: {"n": 1} in got, 20, what="an event after the restart")
    finally:
        consumer.close()
    assert s.recreated >= 1 and consumer.handled >= 2


def test_a_group_starting_at_new_entries_still_gets_those_added_after_a_redis_restart(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    s = EventStream("s", "g", start_id="$")
    s.ensure_group()
    s.add({"n": 0})
    got: List[Any] = []
    assert s.process(got.append, block_ms=0) == (1, 0)
    server.restart()  # empty: stream and group are gone
    wait_for(lambda: _try_add(s, {"n": 1}), 20, interval=0.05, what="an add after the restart")
    s.add({"n": 2})
    wait_for(lambda: s.process(got.append, block_ms=0)[0] > 0 or len(got) >= 3, 20, what="the reads after it")
    assert got == [{"n": 0}, {"n": 1}, {"n": 2}], "recreated at the stream's start, not at '$'"
    assert s.recreated == 1


def _try_add(s: EventStream, event: Dict[str, Any]) -> bool:
    try:
        s.add(event)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("event,error", [
    (["x"], InvalidArgumentType),
    ({"a": object()}, InvalidArgumentType),
    ({"a": float("inf")}, InvalidArgument),
])
def test_bad_events_raise_naming_the_argument_before_anything_is_written(
        raw: Redis, event: Any, error: type) -> None:
    s = EventStream("s")
    with pytest.raises(error, match="^event:"):
        s.add(event)
    with pytest.raises(error, match="^events:"):
        s.add_many([{"ok": 1}, event])  # validated as a whole: the good one is not written either
    assert not raw.exists(s.key)


def test_bad_arguments_raise_naming_the_argument(raw: Redis) -> None:
    for kwargs, argument in [
        ({"name": ""}, "name"), ({"name": 5}, "name"), ({"name": "s", "group": ""}, "group"),
        ({"name": "s", "maxlen": 0}, "maxlen"), ({"name": "s", "maxlen": True}, "maxlen"),
        ({"name": "s", "ttl": 0}, "ttl"), ({"name": "s", "min_idle_ms": -1}, "min_idle_ms"),
        ({"name": "s", "start_id": "latest"}, "start_id"), ({"name": "s", "consumer": ""}, "consumer"),
    ]:
        with pytest.raises((InvalidArgument, InvalidArgumentType), match=f"^{argument}:"):
            EventStream(**kwargs)
    with pytest.raises(InvalidArgument, match="^group:"):
        EventStream("s").read()
    with pytest.raises(InvalidArgument, match="^block_ms:"):
        EventStream("s", "g").read(block_ms=5000)  # would outlive the 2 s socket timeout
    with pytest.raises(InvalidArgumentType, match="^handler:"):
        EventStream("s", "g").run_in_thread("nope")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="^ids:"):
        EventStream("s", "g").ack("not-an-id")
    # Numbers Redis cannot take (a reviewer: raw ResponseErrors, and a consumer loop
    # restarting every second on a start_id past 64 bits).
    for kwargs, argument in [({"name": "s", "maxlen": 2**70}, "maxlen"),
                             ({"name": "s", "start_id": "99999999999999999999999-0"}, "start_id"),
                             ({"name": "s", "start_id": "1-18446744073709551616"}, "start_id")]:
        with pytest.raises(InvalidArgument, match=f"^{argument}:"):
            EventStream(**kwargs)
    with pytest.raises(InvalidArgument, match="^ids:"):
        EventStream("s", "g").ack("99999999999999999999999-0")
    for count, error in [(True, InvalidArgumentType), ("5", InvalidArgumentType), (10**9, InvalidArgument)]:
        with pytest.raises(error, match="^count:"):
            EventStream("s", "g").claim(count=count)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match="^events:"):
        EventStream("s").add_many(None)  # type: ignore[arg-type]
    assert raw.keys("*") == []
    # The bounds themselves are Redis's: the largest of each is taken.
    big = EventStream("s", "g", maxlen=2**63 - 1, start_id="18446744073709551615-18446744073709551615")
    assert big.add({"n": 1}) and big.ack("18446744073709551615-18446744073709551615") == 0


def test_an_event_holding_a_lone_surrogate_is_delivered_as_added(raw: Redis) -> None:
    # The client encodes lone surrogates (a file name from os.listdir, say); the
    # consumer decoded strictly, acked the entry as unreadable and lost it.
    event = {"file": "caf\udce9.txt"}
    producer = EventStream("surrogates")
    eid = producer.add(event)
    consumer = EventStream("surrogates", "g")
    got: List[Dict[str, Any]] = []
    assert consumer.process(got.append, block_ms=10) == (1, 0)
    assert got == [event] and consumer.pending() == 0
    assert [e.id for e in consumer.read(block_ms=10)] == []
    assert producer.add_many([event, {"ok": 1}]) and eid


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_workers_forked_from_one_stream_consume_under_names_of_their_own(raw: Redis) -> None:
    # A stream made before fork (module level in a pre-fork server) gave every
    # worker its name: each re-read the batch a sibling was still handling as
    # its own pending entries, and every entry was handled twice.
    import os

    stream = EventStream("forked", "g")
    stream.add_many({"n": i} for i in range(40))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            entries = stream.read(count=20, block_ms=10)  # left pending: the child is still on them
            os.write(write_fd, f"{stream.consumer} {len(entries)}".encode())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.close(write_fd)
    child_name, child_read = os.read(read_fd, 200).decode().split()
    os.close(read_fd)
    assert os.waitstatus_to_exitcode(status) == 0 and int(child_read) == 20
    assert child_name != stream.consumer
    ours = stream.read(count=100, block_ms=10)
    assert len(ours) == 20 and not ({e.event["n"] for e in ours} & set(range(20)))  # type: ignore[index]


def test_streams_need_redis() -> None:
    with pytest.raises(ConfigurationError):
        EventStream("s").add({"a": 1})


def test_a_poison_event_goes_to_the_dead_letter_stream_after_max_deliveries(raw: Redis) -> None:
    s = EventStream("s", "g", "c", min_idle_ms=0, claim_interval=0, max_deliveries=2, ttl=60)
    entry_id = s.add({"poison": True})
    s.add({"fine": True})
    calls: List[Any] = []

    def handler(event: Dict[str, Any]) -> None:
        calls.append(event)
        if event.get("poison"):
            raise ValueError("cannot handle")

    assert s.process(handler, block_ms=0) == (1, 1)  # delivery 1
    assert s.process(handler, block_ms=0) == (0, 1)  # delivery 2 (claimed)
    assert s.process(handler, block_ms=0) == (0, 0)  # delivery 3: dead-lettered instead
    assert calls.count({"poison": True}) == 2
    assert s.pending() == 0 and s.dead_lettered == 1
    assert s.dead_letters() == [StreamEntry(entry_id, {"poison": True})]
    assert 0 < raw.pttl(s.dead_letter_key) <= 60_000


def test_prune_consumers_forgets_idle_consumers_with_nothing_pending(raw: Redis) -> None:
    EventStream("s").add_many([{"n": 1}, {"n": 2}])
    done = EventStream("s", "g", "done")
    done.ack(*[e.id for e in done.read(count=1, block_ms=0)])
    busy = EventStream("s", "g", "busy")
    assert len(busy.read(count=1, block_ms=0)) == 1  # still pending: must be kept
    me = EventStream("s", "g", "me")
    assert me.prune_consumers(min_idle_ms=0) == 1
    assert sorted(c["name"] for c in raw.xinfo_consumers(me.key, "g")) == ["busy"]


def test_block_ms_is_bounded_by_the_socket_timeout_of_the_streams_own_client(redis_url: str) -> None:
    # The process-wide settings allow 1,000 ms (2 s socket timeout); this client's 0.5 s allows 250.
    with mcp_redis.Client(redis_url=redis_url, socket_timeout=0.5) as client:
        stream = EventStream("bounded", "g", client=client)
        with pytest.raises(InvalidArgument) as info:
            stream.read(count=1, block_ms=1000)
        assert info.value.argument == "block_ms"
        assert stream.read(count=1, block_ms=250) == []


def test_consumer_threads_stop_when_their_client_closes(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    on_default = EventStream("owned", "g").run_in_thread(lambda event: None, block_ms=10)
    with mcp_redis.Client(redis_url=redis_url) as client:
        on_mine = EventStream("owned", "g2", client=client).run_in_thread(lambda event: None, block_ms=10)
        mcp_redis.reset()  # closes the default client only
        assert not on_default.alive
        assert on_mine.alive
    assert not on_mine.alive
