"""Child-process bodies for the metadata-cache tests and benchmark (spawn context).

Each child configures the library itself, builds the same cached loader as
its parent (same explicit namespace, so both share L2 and invalidations) and
talks to the parent over a `multiprocessing` pipe.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Optional

import mcp_redis
from mcp_redis.cache import CachedFunction, cached_metadata, wait_for_listener

NAMESPACE = "tests.agent_meta"
TABLE = "cache_test_agents"


class PgAgents:
    """The source of truth: a PostgreSQL table of agent metadata; counts queries."""

    def __init__(self, dsn: str) -> None:
        import psycopg2

        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.lock = threading.Lock()
        self.queries = 0

    def create(self, agents: int = 0) -> None:
        with self.lock, self.conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
            cur.execute(f"CREATE TABLE {TABLE} (agent_id TEXT PRIMARY KEY, meta TEXT NOT NULL)")
            if agents:
                cur.execute(
                    f"INSERT INTO {TABLE} SELECT 'agent-' || i, '{{\"n\": ' || i || '}}' "
                    "FROM generate_series(0, %s - 1) AS i",
                    (agents,),
                )

    def load(self, agent_id: str) -> Optional[Dict[str, Any]]:
        import json

        with self.lock, self.conn.cursor() as cur:
            self.queries += 1
            cur.execute(f"SELECT meta FROM {TABLE} WHERE agent_id = %s", (agent_id,))
            row = cur.fetchone()
        return None if row is None else dict(json.loads(row[0]), agent_id=agent_id)

    def update(self, agent_id: str, meta: Dict[str, Any]) -> None:
        import json

        with self.lock, self.conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {TABLE} VALUES (%s, %s) ON CONFLICT (agent_id) DO UPDATE SET meta = EXCLUDED.meta",
                (agent_id, json.dumps(meta)),
            )

    def close(self) -> None:
        self.conn.close()


def cached_loader(db: PgAgents, **options: Any) -> CachedFunction[Optional[Dict[str, Any]]]:
    """The cached `get_agent_metadata` both sides of a test use."""

    @cached_metadata(namespace=NAMESPACE, **options)
    def get_agent_metadata(agent_id: str) -> Optional[Dict[str, Any]]:
        return db.load(agent_id)

    return get_agent_metadata


def reader(url: str, dsn: str, pipe: Any) -> None:
    """Process A: serves ``("read", id)`` and ``("watch", id, field, value)``.

    ``watch`` acknowledges, then reads every ~0.2 ms (L1 hits) until the
    field has the expected value and replies with the wall-clock time it saw it.
    """
    mcp_redis.configure(redis_url=url)
    db = PgAgents(dsn)
    load = cached_loader(db, ttl=300)
    load("agent-warmup")
    wait_for_listener(10)
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            break
        if command[0] == "read":
            pipe.send(load(command[1]))
        elif command[0] == "info":
            pipe.send(tuple(load.cache_info()))
        elif command[0] == "watch":
            _, agent_id, field, expected = command
            pipe.send("watching")
            deadline = time.monotonic() + 10
            seen = None
            while time.monotonic() < deadline:
                value = load(agent_id)
                if value is not None and value.get(field) == expected:
                    seen = time.time()
                    break
                time.sleep(0.0002)  # a server thread does other work between reads (and frees the GIL)
            pipe.send(seen)
    db.close()


def invalidator(url: str, dsn: str, agent_id: str, meta: Dict[str, Any]) -> None:
    """Process B: update PostgreSQL, then invalidate the cached entry."""
    mcp_redis.configure(redis_url=url)
    db = PgAgents(dsn)
    load = cached_loader(db, ttl=300)
    db.update(agent_id, meta)
    load.invalidate(agent_id)
    db.close()


def zipf_reader(url: str, dsn: str, ids: Any, result: Any, cached: bool, passes: int = 1) -> None:
    """One server process of the Zipf workload: read every id `passes` times
    (the first pass starts cold), reporting the PostgreSQL queries of each."""
    mcp_redis.configure(redis_url=url, metadata_cache="redis" if cached else "off")
    db = PgAgents(dsn)
    load = cached_loader(db, ttl=300, maxsize=4096)
    started = time.perf_counter()
    queries = []
    for _ in range(passes):
        before = db.queries
        for agent_id in ids:
            load(agent_id)
        queries.append(db.queries - before)
    result.put((queries, time.perf_counter() - started, tuple(load.cache_info())))
    db.close()


def writer_only(url: str, dsn: str, pipe: Any) -> None:
    """A process that only writes: updates PostgreSQL and invalidates, never
    reads the cache (so it has no L2 read and no listener to replay from).

    ``("update", id, meta)`` replies with the number of Redis errors absorbed;
    ``("state",)`` with (invalidations still pending, replayer thread alive).
    """
    from mcp_redis.cache import invalidation
    from mcp_redis.client import default_client

    mcp_redis.configure(redis_url=url, socket_connect_timeout=0.5, socket_timeout=0.5, retry_attempts=1)
    db = PgAgents(dsn)
    load = cached_loader(db, ttl=300)
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            break
        if command[0] == "update":
            _, agent_id, meta = command
            db.update(agent_id, meta)
            load.invalidate(agent_id)
            pipe.send(load.cache_info().errors)
        elif command[0] == "state":
            inv = invalidation.of(default_client())
            thread = inv.thread
            pipe.send((len(load._pending) + load._pending_all, thread is not None and thread.is_alive(),
                       inv.subscriber is not None))
    db.close()
