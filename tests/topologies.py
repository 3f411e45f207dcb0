"""Fixtures for running tests on every Redis topology: single, Sentinel, Cluster.

``tests/conftest.py`` loads them as a plugin::

    pytest_plugins = ["tests.topologies"]

- ``sentinel_topology`` / ``cluster_topology``: one real topology per test
  session (started on first use), healed and emptied before each test that
  asks for it.
- ``redis_topology``: parametrised over the topologies, so a test that uses
  it (or ``any_redis_url`` / ``any_redis_mode``) runs once per topology, with
  the ``sentinel`` / ``cluster`` marks on the matching runs (``-m "not
  cluster"`` deselects them). ``MCP_REDIS_TOPOLOGIES=single,cluster`` narrows
  the set for a run.

A missing binary skips (or fails, under ``MCP_REDIS_REQUIRE_SERVERS=1``) as
``missing_server`` does in conftest.

Each topology is started once per process (the instances are kept in
``_running``) and stopped at exit.
"""

from __future__ import annotations

import atexit
import os
from typing import Callable, Dict, Iterator, List, TypeVar, Union

import pytest

import mcp_redis
from mcp_redis.testing import redis_binary, servers_required
from mcp_redis.testing.topology import ClusterTopology, SentinelTopology

__all__ = [
    "TOPOLOGIES",
    "sentinel_topology_session",
    "cluster_topology_session",
    "sentinel_topology",
    "cluster_topology",
    "redis_topology",
    "any_redis_url",
    "any_redis_mode",
]

ALL_TOPOLOGIES = ("single", "sentinel", "cluster")
Topology = Union[SentinelTopology, ClusterTopology]
T = TypeVar("T", SentinelTopology, ClusterTopology)
_running: Dict[str, Topology] = {}


_failed: Dict[str, str] = {}


def _shared(name: str, make: Callable[[], T]) -> T:
    """The process's one running topology called `name` (started on first use).

    A topology that failed to start is not tried again in this run: every
    test that needs it fails at once with the first error.
    """
    if name in _failed:
        pytest.fail(f"{name} topology did not start earlier in this run: {_failed[name]}", pytrace=False)
    topology = _running.get(name)
    if topology is None:
        try:
            topology = _running[name] = make().start()
        except Exception as exc:
            _failed[name] = f"{type(exc).__name__}: {exc}"
            raise
    return topology  # type: ignore[return-value]


def _stop(name: str) -> None:
    topology = _running.pop(name, None)
    if topology is not None:
        topology.cleanup()


@atexit.register
def _stop_all() -> None:  # an interrupted run leaves no redis-server behind
    for name in list(_running):
        _stop(name)


def _selected() -> List[str]:
    raw = os.environ.get("MCP_REDIS_TOPOLOGIES", "")
    chosen = [t.strip() for t in raw.split(",") if t.strip()] or list(ALL_TOPOLOGIES)
    unknown = sorted(set(chosen) - set(ALL_TOPOLOGIES))
    if unknown:
        raise pytest.UsageError(f"MCP_REDIS_TOPOLOGIES: unknown {unknown}; choose from {list(ALL_TOPOLOGIES)}")
    return [t for t in ALL_TOPOLOGIES if t in chosen]


TOPOLOGIES = _selected()


def _missing(reason: str) -> None:
    if servers_required():
        pytest.fail(f"required server missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sentinel_topology_session() -> Iterator[SentinelTopology]:
    """One master, two replicas, three Sentinels for the whole run (unhealed, not flushed)."""
    if redis_binary() is None:
        _missing("redis-server binary not found (needed for Sentinel)")
    yield _shared("sentinel", SentinelTopology)
    _stop("sentinel")


@pytest.fixture(scope="session")
def cluster_topology_session() -> Iterator[ClusterTopology]:
    """Three masters with a replica each for the whole run (unhealed, not flushed)."""
    if redis_binary() is None or redis_binary("redis-cli") is None:
        _missing("redis-server or redis-cli binary not found (needed for Cluster)")
    yield _shared("cluster", lambda: ClusterTopology(masters=3, replicas=1))
    _stop("cluster")


@pytest.fixture
def sentinel_topology(sentinel_topology_session: SentinelTopology) -> SentinelTopology:
    """The run's Sentinel topology, back at full strength and empty.

    A test may kill the master: the next test gets the old master back as a
    replica of the new one (the master's port can differ from test to test).
    """
    topology = sentinel_topology_session
    if not topology.healthy():
        topology.heal()
    topology.flushall()
    return topology


@pytest.fixture
def cluster_topology(cluster_topology_session: ClusterTopology) -> ClusterTopology:
    """The run's cluster, healthy (no half-moved slot) and empty."""
    topology = cluster_topology_session
    if not topology.healthy():
        topology.heal()
    topology.flushall()
    return topology


@pytest.fixture(
    params=[
        pytest.param(name, marks=[getattr(pytest.mark, name)] if name != "single" else [], id=name)
        for name in TOPOLOGIES
    ]
)
def redis_topology(request: pytest.FixtureRequest) -> str:
    """The topology this run of the test is on: ``single``, ``sentinel`` or ``cluster``."""
    return str(request.param)


@pytest.fixture
def any_redis_url(redis_topology: str, request: pytest.FixtureRequest) -> str:
    """An empty Redis of the current topology, as a ``REDIS_URL``.

    Only the topologies a run actually uses are started (lazily).
    """
    if redis_topology == "single":
        return str(request.getfixturevalue("redis_url"))
    topology = request.getfixturevalue(f"{redis_topology}_topology")
    return str(topology.url)


@pytest.fixture
def any_redis_mode(any_redis_url: str) -> str:
    """The library configured against the current topology (like conftest's ``redis_mode``)."""
    mcp_redis.configure(redis_url=any_redis_url)
    return any_redis_url
