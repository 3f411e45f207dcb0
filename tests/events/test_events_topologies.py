"""Events on every Redis topology: single server, Sentinel, Cluster.

Pub/sub uses global PUBLISH/SUBSCRIBE (broadcast over the cluster bus), so a
subscriber connected to any node receives every event; a stream is one key,
so every stream command lands on one shard.
"""

from __future__ import annotations

import threading
from typing import Any, List

import mcp_redis
from mcp_redis.events import EventBus, EventStream
from mcp_redis.testing import wait_for
from mcp_redis.testing.topology import ClusterTopology


def test_channel_and_pattern_subscribers_receive_every_event_in_order(any_redis_mode: str) -> None:
    bus = EventBus()
    plain: List[Any] = []
    pattern: List[Any] = []
    lock = threading.Lock()
    bus.subscribe("agent:updates", lambda e: plain.append(e))
    bus.psubscribe("agent:*", lambda c, e: (lock.acquire(), pattern.append((c, e)), lock.release()),
                   with_channel=True)
    events = [{"i": i} for i in range(200)]
    for e in events:
        assert bus.publish("agent:updates", e) >= 1  # cluster: counts this node's subscribers only
    wait_for(lambda: len(plain) == 200 and len(pattern) == 200, 10, what="every event")
    assert plain == events
    assert pattern == [("agent:updates", e) for e in events]
    bus.close()


def test_stream_round_trip_and_claim(any_redis_mode: str) -> None:
    ids = EventStream("orders").add_many({"n": i} for i in range(50))
    dead = EventStream("orders", "g", "dead")
    assert [e.id for e in dead.read(count=20, block_ms=0)] == ids[:20]
    alive = EventStream("orders", "g", "alive", min_idle_ms=50, claim_interval=0.01)
    handled: List[str] = []
    wait_for(lambda: alive.process(lambda i, e: handled.append(i), block_ms=0, with_id=True) and
             set(handled) == set(ids), 10, interval=0.02, what="all 50 handled")
    assert alive.pending() == 0 and alive.claimed == 20


def test_a_cluster_subscription_that_hears_nothing_pings_and_reconnects(cluster_topology: ClusterTopology) -> None:
    """The liveness probe on a Cluster too (its connections are built without redis-py's health
    check). Every node paused for 3 s (`CLIENT PAUSE ALL`: the cluster bus runs on, no failover)
    answers the probe's PING late, past `socket_timeout`: the listener reconnects; so would it
    from a node whose link went silent, which it could not tell from this."""
    mcp_redis.configure(redis_url=cluster_topology.url, health_check_interval=1, socket_timeout=1.0)
    bus = EventBus()
    got: List[Any] = []
    sub = bus.subscribe("probe", got.append)
    bus.publish("probe", {"n": 0})
    wait_for(lambda: got == [{"n": 0}], what="the first event")
    for node in [*cluster_topology.masters, *cluster_topology.replicas]:
        node.client().execute_command("CLIENT", "PAUSE", 3000, "ALL")
    wait_for(lambda: sub.reconnects >= 1, 15, what="the reconnect")
    assert sub.wait_active(15)
    wait_for(lambda: (bus.publish("probe", {"n": 1}), {"n": 1} in got)[1], 15, interval=0.1,
             what="delivery after the reconnect")
    bus.close()
