"""Locks on every Redis topology: single server, Sentinel (master_for) and Cluster.

A lock's keys share one hash slot, so its scripts and its waiters' BLPOPs
run on one cluster node.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest
from redis.crc import key_slot

import mcp_redis
from mcp_redis import LockNotOwned
from mcp_redis.connections import get_redis
from mcp_redis.testing import wait_for
from mcp_redis.testing.topology import SlotMigration


def test_lock_handoff_fencing_and_ownership_on_every_topology(any_redis_mode: str) -> None:
    holder = mcp_redis.agent_lock("topo", timeout=5)
    holder.acquire()
    first = holder.fencing_token
    entered: List[float] = []

    def wait() -> None:
        with mcp_redis.agent_lock("topo", timeout=5, blocking_timeout=10) as held:
            assert first is not None and held.fencing_token is not None and held.fencing_token > first
            entered.append(time.perf_counter())

    t = threading.Thread(target=wait)
    t.start()
    client = get_redis().client
    deadline = time.monotonic() + 10
    while client.llen(holder.key + "#queue") == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert holder.extend(1) and holder.owned() and holder.locked()
    holder.release()
    released = time.perf_counter()
    t.join(10)
    assert entered and entered[0] - released < 0.5
    try:
        holder.release()
        raise AssertionError("a second release must raise")
    except LockNotOwned:
        pass
    slots = {key_slot(k.encode()) for k in (holder.key, holder.key + "#fence", holder.key + "#queue")}
    assert len(slots) == 1


@pytest.mark.cluster
def test_waiter_follows_its_lock_when_the_slot_migrates(cluster_topology: Any) -> None:
    mcp_redis.configure(redis_url=cluster_topology.url)
    holder = mcp_redis.lock("moving", timeout=10)
    assert holder.acquire()
    entered: List[bool] = []
    t = threading.Thread(target=lambda: entered.append(mcp_redis.lock("moving").acquire(blocking_timeout=20)))
    t.start()
    client = get_redis().client
    deadline = time.monotonic() + 10
    while client.llen(holder.key + "#queue") == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    before = cluster_topology.owner_of(holder.key).port
    cluster_topology.migrate_slot(key_slot(holder.key.encode()))
    assert cluster_topology.owner_of(holder.key).port != before
    holder.release()
    t.join(20)
    assert entered == [True]


# -- opt-in WAIT acknowledgement ------------------------------------------------------------
@pytest.mark.cluster
def test_release_and_extend_while_the_lock_slot_is_being_migrated(cluster_topology: Any) -> None:
    # A slot marked MIGRATING with keys still on its source: Redis refuses a
    # script's undeclared key that is not on the node yet. The release (whose
    # queued waiter's signal list is such a key) and an additive extend (whose
    # retry record was one) must neither fail halfway nor raise a raw error.
    mcp_redis.configure(redis_url=cluster_topology.url)
    holder = mcp_redis.agent_lock("migrating", timeout=10)
    holder.acquire()
    entered: List[bool] = []
    t = threading.Thread(target=lambda: entered.append(
        mcp_redis.agent_lock("migrating", timeout=10).acquire(blocking_timeout=20)))
    t.start()
    client = get_redis().client
    wait_for(lambda: client.llen(holder.key + "#queue") > 0, 10, what="the waiter to queue")
    migration = SlotMigration(cluster_topology, key_slot(holder.key.encode()))
    migration.begin()
    holder.release()  # freed; the waiter takes it at its next try
    migration.finish()
    t.join(20)
    assert entered == [True]

    extended = mcp_redis.agent_lock("extended", timeout=10)
    extended.acquire()
    migration = SlotMigration(cluster_topology, key_slot(extended.key.encode()))
    migration.begin()
    finishing = threading.Timer(0.1, migration.finish)  # TRYAGAIN until the keys have moved
    finishing.start()
    try:
        assert extended.extend(5) is True
    finally:
        finishing.join()
    assert 10_000 < client.pttl(extended.key) <= 15_000
    extended.release()


def test_lock_with_min_replicas_is_granted_once_a_replica_acknowledges(redis_factory: Any) -> None:
    master = redis_factory()
    replica = redis_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 10,
             what="the replica to sync")
    mcp_redis.configure(redis_url=master.url)
    held = mcp_redis.lock("replicated", timeout=10, min_replicas=1, replica_timeout=1.0)
    assert held.acquire(blocking_timeout=0)
    wait_for(lambda: replica.client().get(held.key) is not None, 5, what="the grant on the replica")
    held.release()


def test_lock_without_enough_replicas_is_released_and_raises(redis_mode: str) -> None:
    held = mcp_redis.lock("lonely", timeout=10, min_replicas=1, replica_timeout=0.05)
    with pytest.raises(mcp_redis.LockNotReplicated) as info:
        held.acquire(blocking_timeout=0)
    assert (info.value.acknowledged, info.value.required) == (0, 1)
    assert isinstance(info.value, mcp_redis.LockError)
    assert not held.locked()  # undone: nobody is left blocked by it
    assert mcp_redis.lock("lonely", timeout=10).acquire(blocking_timeout=0)


@pytest.mark.parametrize("bad", [-1, 65, 1.5, True, "1"])
def test_min_replicas_must_be_a_small_int(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="min_replicas"):
        mcp_redis.lock("x", min_replicas=bad)
