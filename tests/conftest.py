"""Shared fixtures: real redis-server processes and a throwaway PostgreSQL DB.

A test that needs a server skips with a clear reason when it is missing,
unless ``MCP_REDIS_REQUIRE_SERVERS=1`` (set by ``.ci/run``), which turns the
skip into a failure. Every test starts from a clean configuration.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List

import pytest

import mcp_redis
from mcp_redis.config import ENVIRONMENT_VARIABLES
from mcp_redis.metrics import METRICS
from mcp_redis.testing import PostgresDatabase, RedisServer, redis_binary, servers_required

# sentinel_topology, cluster_topology, redis_topology, any_redis_url, any_redis_mode.
pytest_plugins = ["tests.topologies"]


def missing_server(reason: str) -> None:
    """Skip (or fail, when servers are required) for a missing server."""
    if servers_required():
        pytest.fail(f"required server missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def clean_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test starts with no library env vars, no overrides, no clients."""
    for var, _ in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MCP_REDIS_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))
    mcp_redis.reset(configuration=True)
    METRICS.clear()
    yield
    mcp_redis.reset(configuration=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run (flushed before each test that uses it)."""
    if redis_binary() is None:
        missing_server("redis-server binary not found")
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared test server, emptied first."""
    if not redis_server.running:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    """Make extra redis-servers (for kill/restart tests); all cleaned up after."""
    if redis_binary() is None:
        missing_server("redis-server binary not found")
    factory = RedisFactory()
    yield factory
    factory.cleanup()


class RedisFactory:
    def __init__(self) -> None:
        self.servers: List[RedisServer] = []

    def __call__(self, **kwargs: object) -> RedisServer:
        server = RedisServer(**kwargs)  # type: ignore[arg-type]
        self.servers.append(server)
        return server.start()

    def cleanup(self) -> None:
        for s in self.servers:
            s.cleanup()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PostgresDatabase]:
    """A uniquely named PostgreSQL database for the run, dropped after."""
    db = PostgresDatabase()
    if not db.available():
        missing_server(f"PostgreSQL not usable at 127.0.0.1:5432 (or MCP_REDIS_TEST_PG_ADMIN_DSN): {db.error}")
    db.create()
    yield db
    db.drop()


@pytest.fixture
def database_url(pg_database: PostgresDatabase) -> str:
    """DSN of the run's database, with the library's tables emptied."""
    import psycopg2

    conn = psycopg2.connect(pg_database.dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('mcp_redis.sessions'), to_regclass('mcp_redis.rate_limits')")
            sessions, limits = cur.fetchone()
            if sessions:
                cur.execute("TRUNCATE mcp_redis.sessions")
            if limits:
                cur.execute("TRUNCATE mcp_redis.rate_limits")
    finally:
        conn.close()
    return pg_database.url


@pytest.fixture
def redis_mode(redis_url: str) -> str:
    """The library configured against the shared test redis-server."""
    mcp_redis.configure(redis_url=redis_url)
    return redis_url


# MCP_REDIS_SERVER_TESTS_ONLY=1 (the Valkey pass of .ci/run): a test that talks to no Redis-protocol
# server proves nothing new on a second server, so it is skipped there. Known once its fixtures
# are set up (the contract tests ask for a server by parameter, through getfixturevalue); a module
# that starts servers itself is always run.
_SERVER_FIXTURES = frozenset({
    "redis_server", "redis_url", "redis_factory", "redis_mode", "sentinel_topology", "cluster_topology",
    "sentinel_topology_session", "cluster_topology_session", "redis_topology", "any_redis_url", "any_redis_mode",
})
_STARTS_SERVERS = ("RedisServer(", "redis_binary(", "ClusterTopology(", "SentinelTopology(")
_module_starts_servers: Dict[str, bool] = {}


def _talks_to_a_server(item: pytest.Item) -> bool:
    # pytest's record of every fixture the test set up, those asked for by name at run time too.
    dynamic = getattr(getattr(item, "_request", None), "_fixture_defs", None)
    if dynamic is None:
        return True  # pytest's internals changed: run the test rather than guess
    if (set(getattr(item, "fixturenames", ())) | set(dynamic)) & _SERVER_FIXTURES:
        return True
    path = str(item.path)
    if path not in _module_starts_servers:
        with open(path, encoding="utf-8") as source:
            text = source.read()
        _module_starts_servers[path] = any(marker in text for marker in _STARTS_SERVERS)
    return _module_starts_servers[path]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if os.environ.get("MCP_REDIS_SERVER_TESTS_ONLY") == "1" and not _talks_to_a_server(item):
        pytest.skip("talks to no Redis-protocol server (MCP_REDIS_SERVER_TESTS_ONLY=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if os.environ.get("MCP_REDIS_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="MCP_REDIS_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
