"""The metadata cache across real processes, a real PostgreSQL, and a redis-server
that dies and comes back (the issue's "done when" list)."""

from __future__ import annotations

import multiprocessing
import random
import statistics
import threading
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import mcp_redis
from mcp_redis.cache import cached_metadata, wait_for_listener
from mcp_redis.connections import get_redis
from mcp_redis.testing import PostgresDatabase, wait_for
from tests import workers_cache
from tests.workers_cache import PgAgents

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def agents(pg_database: PostgresDatabase) -> Iterator[PgAgents]:
    db = PgAgents(pg_database.dsn)
    db.create()
    yield db
    db.close()


@pytest.fixture
def reader_process(redis_url: str, pg_database: PostgresDatabase) -> Iterator[Any]:
    """Process A: a cached reader of the agents table, driven over a pipe."""
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=workers_cache.reader, args=(redis_url, pg_database.dsn, child), daemon=True)
    proc.start()
    assert parent.poll(60), "reader process did not start"
    assert parent.recv() == "ready"
    yield parent
    parent.send(("stop",))
    proc.join(10)
    if proc.is_alive():
        proc.kill()


@pytest.mark.slow
def test_update_and_invalidate_in_b_is_seen_by_a_within_100_ms(
        redis_url: str, agents: PgAgents, reader_process: Any) -> None:
    """B updates PostgreSQL and invalidates; A (L1-hot) sees the new row.

    Latency = A's first read of the new value minus the moment B called
    invalidate (wall clock, same host). Asserted on the median of 7 trials
    (robust on a loaded 2-core box); every trial must stay under 1 s.
    """
    mcp_redis.configure(redis_url=redis_url)
    load = workers_cache.cached_loader(agents, ttl=300)
    agents.update("agent-1", {"version": 0})
    reader_process.send(("read", "agent-1"))
    assert reader_process.recv()["version"] == 0
    latencies = []
    for version in range(1, 8):
        reader_process.send(("watch", "agent-1", "version", version))
        assert reader_process.recv() == "watching"  # A now reads in a loop (L1 hits)
        agents.update("agent-1", {"version": version})
        started = time.time()
        load.invalidate("agent-1")
        seen = reader_process.recv()
        assert seen is not None, f"A never saw version {version}"
        latencies.append(seen - started)
    print(f"invalidation seen by A after (ms): {[round(x * 1000, 2) for x in latencies]}")
    assert statistics.median(latencies) <= 0.100, latencies
    assert max(latencies) < 1.0, latencies
    reader_process.send(("info",))
    info = reader_process.recv()
    assert info[0] > 0  # A really served from L1 between invalidations


@pytest.mark.slow
def test_invalidate_from_another_process_during_load_never_writes_back_stale_value(
        redis_url: str, agents: PgAgents, pg_database: PostgresDatabase) -> None:
    """A's loader has read the old row when B (a real process) updates and
    invalidates; A's load finishes afterwards and must fill neither tier."""
    mcp_redis.configure(redis_url=redis_url)
    agents.update("agent-1", {"version": 0})
    loading, release = threading.Event(), threading.Event()

    @cached_metadata(namespace=workers_cache.NAMESPACE, ttl=300)
    def get_agent_metadata(agent_id: str) -> Any:
        value = agents.load(agent_id)
        if agent_id == "agent-1" and not loading.is_set():
            loading.set()
            assert release.wait(30)
        return value

    get_agent_metadata("agent-warmup")
    assert wait_for_listener(10)
    result: List[Any] = []
    thread = threading.Thread(target=lambda: result.append(get_agent_metadata("agent-1")))
    thread.start()
    assert loading.wait(10)
    b = SPAWN.Process(target=workers_cache.invalidator,
                      args=(redis_url, pg_database.dsn, "agent-1", {"version": 1}))
    b.start()
    b.join(60)
    assert b.exitcode == 0
    release.set()
    thread.join(10)
    assert result == [{"version": 0, "agent_id": "agent-1"}]
    client = get_redis().client
    assert [k for k in client.keys("mcp:cache:*agent-1*") if "#" not in k] == []  # L2 refused it
    assert get_agent_metadata("agent-1") == {"version": 1, "agent_id": "agent-1"}  # and L1 too


@pytest.mark.slow
def test_redis_killed_then_restarted_reads_keep_working_and_l2_comes_back(redis_factory: Any) -> None:
    """Killed: reads return loader values; once the breaker is open each read
    adds < 5 ms (median of 50 reads, each an L1 miss). Restarted on the same
    port: L2 is used again within 5 s, without restarting the process."""
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)
    loads: List[str] = []

    @cached_metadata(namespace="tests.outage", ttl=300)
    def get_agent_metadata(agent_id: str) -> Dict[str, str]:
        loads.append(agent_id)
        return {"agent_id": agent_id}

    get_agent_metadata("before")
    assert wait_for_listener(10)
    conn = get_redis()
    server.kill()

    n = 0

    def read() -> float:
        nonlocal n
        n += 1
        started = time.perf_counter()
        assert get_agent_metadata(f"down-{n}") == {"agent_id": f"down-{n}"}
        return time.perf_counter() - started

    for _ in range(10):
        read()
        if not conn.policy.available:
            break
    assert not conn.policy.available, "breaker never opened"
    overheads = [read() for _ in range(50)]  # the loader itself costs microseconds
    print(f"breaker open: median read {statistics.median(overheads) * 1000:.3f} ms, max {max(overheads) * 1000:.3f} ms")
    assert statistics.median(overheads) < 0.005, overheads
    assert len(loads) == n + 1  # every read was served by the loader

    server.start()
    restarted = time.monotonic()

    def l2_in_use() -> bool:
        key = f"up-{time.monotonic()}"
        get_agent_metadata(key)
        get_agent_metadata.cache_clear()
        before = get_agent_metadata.cache_info().l2_hits
        get_agent_metadata(key)
        return get_agent_metadata.cache_info().l2_hits == before + 1

    wait_for(l2_in_use, 5, interval=0.05, what="L2 hits after the restart")
    print(f"L2 in use again {time.monotonic() - restarted:.2f} s after the restart")
    assert time.monotonic() - restarted < 5
    assert wait_for_listener(5)  # the invalidation listener resubscribed too


@pytest.mark.slow
def test_listener_flushes_l1_after_resubscribing(redis_factory: Any) -> None:
    """Invalidations published while the listener was away are lost, so a
    resubscription empties L1."""
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url)

    @cached_metadata(namespace="tests.flush", ttl=300)
    def get_agent_metadata(agent_id: str) -> Dict[str, str]:
        return {"agent_id": agent_id}

    get_agent_metadata("x")
    assert wait_for_listener(10)
    get_agent_metadata.cache_clear()
    get_agent_metadata("a1")
    assert get_agent_metadata.cache_info().l1_size == 1
    server.restart()
    wait_for(lambda: get_agent_metadata.cache_info().l1_size == 0, 10, what="L1 flushed on resubscribe")


def zipf_ids(agents: int, reads: int, s: float, seed: int) -> List[str]:
    rng = random.Random(seed)
    weights = [1.0 / (k ** s) for k in range(1, agents + 1)]
    ranks = list(range(agents))
    rng.shuffle(ranks)  # popularity is not correlated with the id
    return [f"agent-{ranks[i]}" for i in rng.choices(range(agents), weights=weights, k=reads)]


@pytest.mark.slow
def test_zipf_workload_over_10000_agents_cuts_postgres_queries_by_95_percent(
        redis_url: str, agents: PgAgents, pg_database: PostgresDatabase) -> None:
    """200,000 Zipf(s=1.1) reads over 10,000 agents from 2 processes sharing
    L2 (cold start included). Without the cache every read is one query; a
    2,000-read sample in `off` mode checks that, the rest is arithmetic."""
    agents.create(10_000)
    ids = zipf_ids(10_000, 200_000, 1.1, seed=5)
    results: multiprocessing.Queue[Tuple[List[int], float, Tuple[int, ...]]] = SPAWN.Queue()
    procs = [SPAWN.Process(target=workers_cache.zipf_reader,
                           args=(redis_url, pg_database.dsn, ids[i::2], results, True)) for i in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
    cached_queries = sum(o[0][0] for o in outcomes)

    sample = SPAWN.Process(target=workers_cache.zipf_reader,
                           args=(redis_url, pg_database.dsn, ids[:2000], results, False))
    sample.start()
    uncached_sample = results.get(timeout=120)[0][0]
    sample.join(10)
    assert uncached_sample == 2000  # off: one query per read
    reduction = 1 - cached_queries / len(ids)
    print(f"zipf: {cached_queries} queries for {len(ids)} reads with the cache ({reduction:.2%} fewer)")
    assert reduction >= 0.95, (cached_queries, outcomes)


def test_writer_only_process_delivers_an_invalidation_made_during_a_blip(
        redis_url: str, redis_server: Any, agents: PgAgents, pg_database: PostgresDatabase,
        reader_process: Any) -> None:
    """A writer-only process (no L2 reads, no listener) invalidates while it
    cannot reach Redis; once Redis answers again, the reader sees the new
    row within the documented bound without the writer doing anything more."""
    from mcp_redis.testing.faultproxy import FaultProxy

    agents.update("agent-1", {"version": 0})
    reader_process.send(("read", "agent-1"))
    assert reader_process.recv()["version"] == 0  # in the reader's L1 and in L2
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        parent, child = SPAWN.Pipe()
        writer = SPAWN.Process(target=workers_cache.writer_only, args=(proxy.url(), pg_database.dsn, child),
                               daemon=True)
        writer.start()
        try:
            assert parent.poll(60) and parent.recv() == "ready"
            proxy.drop()  # the writer's Redis blip: every connection closed at once
            parent.send(("update", "agent-1", {"version": 1}))
            assert parent.recv() >= 1  # the invalidation did not reach Redis
            reader_process.send(("read", "agent-1"))
            assert reader_process.recv()["version"] == 0  # readers still serve the old value
            reader_process.send(("watch", "agent-1", "version", 1))
            assert reader_process.recv() == "watching"
            healed = time.time()
            proxy.pass_through()  # from here on the writer is sent nothing until the reader has seen it
            seen = reader_process.recv()
            # docs/cache.md: MCP_REDIS_BREAKER_RESET_TIMEOUT (1 s) + the longest pause (2 s) + one
            # attempt (the writer's 0.5 s socket timeouts).
            bound = 1.0 + 2.0 + 0.5
            assert seen is not None and seen - healed <= bound, (seen and seen - healed)
            parent.send(("state",))
            pending, _, listening = parent.recv()
            assert pending == 0 and not listening  # delivered by the replayer, not a listener or a read
        finally:
            parent.send(("stop",))
            writer.join(10)
            if writer.is_alive():
                writer.kill()
