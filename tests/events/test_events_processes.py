"""Events across processes, on real redis-servers (the issue's Done-when points).

* Pub/sub: three subscriber processes each receive 10,000 events in publish
  order; after redis-server restarts (empty), they receive new events without
  being recreated. Events published during the gap are lost (at-most-once):
  the test counts them, it does not forbid them.
* Streams: a consumer SIGKILLed mid-batch (its batch read, not acked) — its
  pending entries reach the other consumers through XAUTOCLAIM; none of
  10,000 is lost (every id is acked by someone); duplicates are counted.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import uuid
from typing import Any, List

import pytest

import mcp_redis
from mcp_redis.errors import BackendUnavailable
from mcp_redis.events import EventBus, EventStream
from mcp_redis.testing import wait_for
from tests import workers_events as w

pytestmark = pytest.mark.slow

CTX = mp.get_context("spawn")
N = 10_000


def test_three_subscriber_processes_receive_10000_events_in_order_and_resume_after_restart(
        redis_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server = redis_factory()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    mcp_redis.configure(redis_url=server.url, key_prefix=prefix)
    stop = CTX.Event()
    workers = []
    for _ in range(3):
        ready = CTX.Event()
        stats = CTX.Array("q", 5, lock=False)
        proc = CTX.Process(target=w.pubsub_subscriber, args=(server.url, prefix, "agent:updates", ready, stop, stats),
                           daemon=True)
        proc.start()
        workers.append((proc, ready, stats))
    try:
        for _, ready, _ in workers:
            assert ready.wait(60), "subscriber process did not become active"
        bus = EventBus()
        for seq in range(N):
            assert bus.publish("agent:updates", {"phase": 0, "seq": seq}) == 3
        try:
            wait_for(lambda: all(s[w.BEFORE] == N for _, _, s in workers), 60, what="10,000 events everywhere")
        except TimeoutError:
            pytest.fail(f"received {[s[w.BEFORE] for _, _, s in workers]} of {N}; "
                        f"order errors {[s[w.ORDER_ERRORS] for _, _, s in workers]}")

        server.restart()  # empty: no persistence; every subscriber's socket drops
        published_after = 0
        seq = 0
        deadline_hit = threading.Event()
        timer = threading.Timer(20, deadline_hit.set)
        timer.start()
        try:
            # Keep publishing until every subscriber has one post-restart event.
            while not all(s[w.AFTER] >= 1 for _, _, s in workers):
                assert not deadline_hit.is_set(), "subscribers did not resume within 20 s"
                try:
                    bus.publish("agent:updates", {"phase": 1, "seq": seq})
                    published_after += 1
                except BackendUnavailable:
                    pass
                seq += 1
                deadline_hit.wait(0.002)  # pacing only
        finally:
            timer.cancel()
        # Everyone is subscribed again: from here on nothing is lost.
        for _ in range(1000):
            assert bus.publish("agent:updates", {"phase": 1, "seq": seq}) == 3
            seq += 1
        last = seq - 1
        wait_for(lambda: all(s[w.LAST_AFTER] == last for _, _, s in workers), 60, what="post-restart events")
    finally:
        stop.set()
        for proc, _, _ in workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    for proc, _, stats in workers:
        assert proc.exitcode == 0
        assert stats[w.BEFORE] == N
        assert stats[w.ORDER_ERRORS] == 0
        assert stats[w.AFTER] >= 1000
        assert stats[w.RECONNECTS] >= 1
    lost = [published_after + 1000 - s[w.AFTER] for _, _, s in workers]
    with capsys.disabled():
        print(f"\n[pubsub restart] published during reconnect gap: {published_after}; lost per subscriber: {lost}")


def test_consumer_killed_mid_batch_loses_nothing_of_10000(redis_factory: Any, tmp_path: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    server = redis_factory()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    mcp_redis.configure(redis_url=server.url, key_prefix=prefix)
    producer = EventStream("work", maxlen=50_000)
    ids = producer.add_many({"n": i} for i in range(N))
    assert len(set(ids)) == N

    batch, hold_after = 100, 250  # two batches acked, killed in the third
    holding = CTX.Event()
    acked_path = str(tmp_path / "victim_acked.txt")
    victim = CTX.Process(target=w.stream_victim,
                         args=(server.url, prefix, "work", "g", hold_after, batch, holding, acked_path), daemon=True)
    victim.start()
    try:
        assert holding.wait(60), "victim never reached its mid-batch hold"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
    finally:
        if victim.is_alive():
            victim.kill()
    victim_acked = open(acked_path, encoding="utf-8").read().split()
    assert len(victim_acked) == 2 * batch
    raw = server.client()
    stranded = raw.xpending_range(producer.key, "g", "-", "+", 1000, consumername="victim")
    assert len(stranded) == batch  # read, never acked
    stranded_ids = {p["message_id"] for p in stranded}

    handled: List[str] = []
    lock = threading.Lock()

    def handler(entry_id: str, event: Any) -> None:
        with lock:
            handled.append(entry_id)

    survivors = [EventStream("work", "g", f"s{i}", min_idle_ms=1000) for i in range(2)]
    threads = [s.run_in_thread(handler, count=batch, block_ms=200, with_id=True) for s in survivors]
    try:
        try:
            wait_for(lambda: len(set(handled) | set(victim_acked)) == N and survivors[0].pending() == 0,
                     60, interval=0.05, what="every event acked")
        except TimeoutError:
            pytest.fail(f"not all acked: handled {len(set(handled))}+{len(victim_acked)} of {N}, "
                        f"pending {raw.xpending(producer.key, 'g')}, "
                        f"consumers {[(t.alive, t.handled, s.claimed) for t, s in zip(threads, survivors)]}")
    finally:
        for t in threads:
            t.close()
    assert set(handled) | set(victim_acked) == set(ids)  # 0 lost
    assert survivors[0].pending() == 0  # every id acked by someone
    assert stranded_ids <= set(handled)  # the dead consumer's entries reached another consumer
    assert sum(s.claimed for s in survivors) >= batch
    # Duplicates: ids acked twice (none expected here), plus the events the
    # victim's handler had already run on before it died (re-run elsewhere).
    duplicates = len(handled) + len(victim_acked) - N + (hold_after - 2 * batch)
    with capsys.disabled():
        print(f"\n[streams kill] {N} events, 0 lost, {len(stranded)} re-delivered, "
              f"{duplicates} handled twice, claimed {sum(s.claimed for s in survivors)}")
