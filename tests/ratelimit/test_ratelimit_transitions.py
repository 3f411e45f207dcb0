"""What a caller can rely on across transitions: a Redis restart without
persistence, the `local` and `postgres` fallbacks, and the return from them.

docs/ratelimit.md ("Across restarts and fallbacks") states the bound for
the default sliding window, in any span of `window` seconds, with limit L and
P processes: Redis contributes at most L per copy of its data (a restart
without persistence starts a new copy), the `postgres` fallback at most L
(its table is shared), the `local` fallback at most L per process. Each test
below runs one window's worth of a transition on real servers and real
processes and checks that sum exactly.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Dict, Iterator, List

import pytest

import mcp_redis
from mcp_redis import RateLimiter
from mcp_redis.testing import RedisServer
from tests import workers_ratelimit

SPAWN = multiprocessing.get_context("spawn")
LIMIT = 20
PROCESSES = 3
WINDOW = 3600.0  # every test runs well inside one window
FAST_RECOVERY: Dict[str, Any] = dict(retry_attempts=2, breaker_reset_timeout=0.1, socket_connect_timeout=0.3,
                                     socket_timeout=0.3)


class Fleet:
    """`PROCESSES` server processes sharing one limiter name and key."""

    def __init__(self, config: Dict[str, Any]) -> None:
        self.pipes: List[Any] = []
        self.procs: List[Any] = []
        for _ in range(PROCESSES):
            parent, child = SPAWN.Pipe()
            proc = SPAWN.Process(target=workers_ratelimit.transitions,
                                 args=(config, "kg_store", "agent-7", LIMIT, WINDOW, child), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        for pipe in self.pipes:
            assert pipe.poll(60) and pipe.recv() == "ready"

    def hit(self, calls: int = LIMIT + 5) -> Dict[str, int]:
        """Every process makes `calls` calls in turn; admitted calls per backend, summed."""
        total: Dict[str, int] = {}
        for pipe in self.pipes:
            pipe.send(("hit", calls))
            for backend, n in pipe.recv().items():
                total[backend] = total.get(backend, 0) + n
        return total

    def wait_for_redis(self) -> None:
        for pipe in self.pipes:
            pipe.send(("wait_redis",))
            assert pipe.recv(), "a process never used Redis again"

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(("stop",))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture
def server(redis_factory: Any) -> RedisServer:
    """A private redis-server without persistence (a restart wipes it)."""
    return redis_factory()  # type: ignore[no-any-return]


@pytest.fixture
def fleet_config(server: RedisServer) -> Dict[str, Any]:
    return dict(redis_url=server.url, **FAST_RECOVERY)


def run_fleet(config: Dict[str, Any]) -> Iterator[Fleet]:
    fleet = Fleet(config)
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def local_fleet(fleet_config: Dict[str, Any]) -> Iterator[Fleet]:
    yield from run_fleet(dict(fleet_config, rate_limit_fallback="local"))


@pytest.fixture
def postgres_fleet(fleet_config: Dict[str, Any], database_url: str) -> Iterator[Fleet]:
    yield from run_fleet(dict(fleet_config, rate_limit_fallback="postgres", database_url=database_url))


def test_redis_restart_without_persistence_admits_at_most_twice_the_limit_in_a_window(server: RedisServer) -> None:
    mcp_redis.configure(redis_url=server.url, **FAST_RECOVERY)
    limiter = RateLimiter("kg_store", LIMIT, WINDOW)
    before = [limiter.hit("agent-7") for _ in range(LIMIT + 5)]
    assert sum(r.allowed for r in before) == LIMIT and {r.backend for r in before} == {"redis"}
    server.restart()  # no persistence: the counts are gone
    after = [limiter.hit("agent-7") for _ in range(LIMIT + 5)]
    assert sum(r.allowed for r in after) == LIMIT and {r.backend for r in after} == {"redis"}
    # 2 x LIMIT in one window: one limit per copy of Redis's data.


def test_local_fallback_and_restart_with_three_processes_admit_limit_plus_limit_per_process_plus_limit(
        server: RedisServer, local_fleet: Fleet) -> None:
    assert local_fleet.hit() == {"redis": LIMIT}  # shared by the three processes
    server.stop()
    assert local_fleet.hit() == {"local": PROCESSES * LIMIT}  # each process counts alone
    server.start()  # without persistence: empty
    local_fleet.wait_for_redis()
    assert local_fleet.hit() == {"redis": LIMIT}
    # A second outage in the same window: each process's own counts are still there.
    server.stop()
    assert local_fleet.hit() == {}
    # In all: (PROCESSES + 2) x LIMIT = 100 in one window, and never more.


def test_local_fallback_while_redis_keeps_its_counts_admits_limit_plus_limit_per_process(
        server: RedisServer, local_fleet: Fleet) -> None:
    assert local_fleet.hit() == {"redis": LIMIT}
    server.pause()  # unreachable, its data intact
    try:
        assert local_fleet.hit() == {"local": PROCESSES * LIMIT}
    finally:
        server.resume()
    local_fleet.wait_for_redis()
    assert local_fleet.hit() == {}  # Redis still holds the first LIMIT
    # In all: (PROCESSES + 1) x LIMIT = 80 in one window.


def test_postgres_fallback_and_restart_admit_one_limit_per_tier(server: RedisServer, postgres_fleet: Fleet) -> None:
    assert postgres_fleet.hit() == {"redis": LIMIT}
    server.stop()
    assert postgres_fleet.hit() == {"postgres": LIMIT}  # exact across the processes
    server.start()  # without persistence: empty
    postgres_fleet.wait_for_redis()
    assert postgres_fleet.hit() == {"redis": LIMIT}
    server.stop()  # a second episode in the same window: the table still holds its LIMIT
    assert postgres_fleet.hit() == {}
    # In all: 3 x LIMIT = 60 in one window (2 x LIMIT when Redis keeps its data).
