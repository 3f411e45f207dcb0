"""Managed Redis quirks (issue 20), on a real redis-server whose ACL refuses
what managed services commonly refuse: ``CONFIG``, ``CLIENT SETNAME``,
``CLIENT SETINFO``, ``SCAN`` and ``KEYS`` (the rule below).

- every feature runs; the library sends none of the refused commands except
  one ``CLIENT SETNAME`` per server (refused once, then connections stay
  unnamed), and `health()` reads ``maxmemory_policy`` from ``INFO memory``;
- the paths that need ``SCAN`` (the Redis-only session mapping view, the
  legacy rate-limit ``reset()`` of every key, ``stats`` key counts) fail with
  a message naming the call and the grant, or report the counts as missing;
- a database other than 0 in a cluster URL: tests/test_topology.py.

One redis-server for the module: the ACL is set once.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator

import pytest

import mcp_redis
from mcp_redis import connections
from mcp_redis.testing import RedisServer, redis_binary
from tests.conftest import missing_server
from tests.test_cli import run_cli
from tests.test_security import exercise_every_feature

PASSWORD = "managed-pw"
# What a managed service refuses, as an ACL rule (every key and channel, every other command).
PROVIDER_RULE = ["on", f">{PASSWORD}", "~*", "&*", "+@all",
                 "-config", "-client|setname", "-client|setinfo", "-scan", "-keys"]
REFUSED = {"config", "client|setname", "client|setinfo", "scan", "keys"}


@pytest.fixture(scope="module")
def managed_server() -> Iterator[RedisServer]:
    if redis_binary() is None:
        missing_server("redis-server binary not found")
    server = RedisServer().start()
    import redis

    try:
        server.client().execute_command("ACL", "SETUSER", "app", *PROVIDER_RULE)
    except redis.exceptions.ResponseError:  # Redis 7.0 has no CLIENT SETINFO to refuse
        server.client().execute_command("ACL", "SETUSER", "app", *[r for r in PROVIDER_RULE if "setinfo" not in r])
    yield server
    server.cleanup()


@pytest.fixture
def managed_url(managed_server: RedisServer) -> str:
    admin = managed_server.client()
    admin.flushall()
    admin.execute_command("ACL", "LOG", "RESET")
    connections._SETNAME_REFUSED.clear()  # each test sees its first refusal
    return f"redis://app:{PASSWORD}@127.0.0.1:{managed_server.port}/0"


def _denials(server: RedisServer) -> Dict[str, int]:
    return {str(e["object"]): int(e["count"]) for e in server.client().execute_command("ACL", "LOG")}


def test_every_feature_runs_when_config_setname_setinfo_scan_and_keys_are_refused(
    managed_server: RedisServer, managed_url: str, database_url: str
) -> None:
    mcp_redis.configure(redis_url=managed_url)
    seen = exercise_every_feature(database_url)
    assert seen["ping"] is True and seen["health"] is True
    report = mcp_redis.health()
    assert report["ok"] is True
    assert report["redis"]["maxmemory_policy"] == "noeviction"  # from INFO memory: CONFIG is refused
    # The only refused command the library sent: one CLIENT SETNAME, after which connections stay unnamed.
    assert _denials(managed_server) == {"client|setname": 1}
    names = {c.get("name") for c in managed_server.client().client_list() if c.get("user") == "app"}
    assert names == {""}, names


def test_the_calls_that_need_scan_say_so_when_it_is_refused(
    managed_server: RedisServer, managed_url: str
) -> None:
    mcp_redis.configure(redis_url=managed_url)  # no DATABASE_URL: sessions live in Redis only
    store = mcp_redis.SessionStore()
    store.bind("s1", "agent-1")
    with pytest.raises(mcp_redis.ConfigurationError, match=r"session_keys\(\).*needs SCAN.*\+scan"):
        list(store.session_keys())
    limiter = mcp_redis.RateLimiter("managed", limit=5, window=60)
    assert limiter.hit("k").backend == "redis"
    with pytest.raises(mcp_redis.ConfigurationError, match=r"clear_all\(\) needs SCAN.*\+scan"):
        limiter._reset_all()  # the legacy RateLimiter.reset() of every key

    report = mcp_redis.stats()["redis"]
    assert report["ok"] is True and report["keys"] is None and "used_memory" in report
    assert "need SCAN" in report["keys_error"] and "+scan" in report["keys_error"]
    env = {"REDIS_URL": managed_url}
    for command in (["stats", "--json"], ["health", "--json"]):
        done = run_cli(*command, env=env)
        assert "Traceback" not in done.stdout + done.stderr and PASSWORD not in done.stdout + done.stderr
        assert done.returncode == 0, (command, done.stdout[-500:], done.stderr[-500:])
    shown = json.loads(run_cli("stats", "--json", env=env).stdout)
    assert "need SCAN" in shown["redis"]["keys_error"]
    assert set(_denials(managed_server)) <= REFUSED - {"config", "client|setinfo", "keys"}


def test_without_the_fallback_a_refused_setname_would_fail_every_connect(managed_server: RedisServer) -> None:
    """Why the library names connections itself: redis-py's ``client_name`` fails the connect."""
    import redis

    plain = redis.Redis(host="127.0.0.1", port=managed_server.port, username="app", password=PASSWORD,
                        client_name="mcp_redis", protocol=2)
    with pytest.raises(redis.exceptions.ResponseError, match="(?i)permission"):
        plain.ping()
    plain.close()
