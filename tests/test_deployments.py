"""Per-feature Redis deployments: caches on an evicting server, state on a `noeviction` one.

Two real redis-servers: every feature writes its keys on its own deployment,
cache invalidations travel on the cache server, and `health()` warns when
locks, sessions or rate limits sit on an instance that evicts.
"""

from __future__ import annotations

import queue
from typing import Any, Iterator, List, Tuple

import pytest

import mcp_redis
from mcp_redis.client import Client, default_client
from mcp_redis.testing import RedisServer


@pytest.fixture
def two_servers(redis_factory: Any) -> Iterator[Tuple[RedisServer, RedisServer]]:
    """(state server with noeviction, cache server with allkeys-lru)."""
    state = redis_factory(args=["--maxmemory-policy", "noeviction"])
    cache = redis_factory(args=["--maxmemory-policy", "allkeys-lru", "--maxmemory", "64mb"])
    yield state, cache


def _keys(server: RedisServer) -> List[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in server.client().scan_iter("*"))


def test_each_feature_writes_its_keys_on_its_own_deployment(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    state, cache = two_servers
    mcp_redis.configure(redis_url=state.url, cache_url=cache.url)

    with mcp_redis.agent_lock("agent-1"):
        pass
    with mcp_redis.lock("job-1", timeout=30):
        assert any("job-1" in k for k in _keys(state))
    assert mcp_redis.RateLimiter("calls", 5, 60).hit("user-1").allowed
    mcp_redis.SessionStore().bind("session-1", "agent-1")
    assert mcp_redis.SessionStore().get("session-1") == "agent-1"

    @mcp_redis.cached_metadata(ttl=60)
    def metadata(agent_id: str) -> dict[str, str]:
        return {"id": agent_id}

    assert metadata("agent-1") == {"id": "agent-1"}

    state_keys, cache_keys = _keys(state), _keys(cache)
    assert cache_keys, "the cache wrote nothing on the cache server"
    assert all(":session" not in k and "ratelimit" not in k and ":lock" not in k for k in cache_keys), cache_keys
    assert not any("metadata" in k or ":cache" in k for k in state_keys), state_keys
    assert any("session" in k for k in state_keys)
    assert any("calls" in k for k in state_keys)


def test_cache_invalidation_is_published_on_the_cache_deployment(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    state, cache = two_servers
    mcp_redis.configure(redis_url=state.url, cache_url=cache.url)

    @mcp_redis.cached_metadata(ttl=60)
    def metadata(agent_id: str) -> dict[str, str]:
        return {"id": agent_id}

    metadata("agent-1")
    # Another process listens on the cache server: subscribe there as it would.
    watchers = {name: server.client().pubsub() for name, server in (("state", state), ("cache", cache))}
    for ps in watchers.values():
        ps.psubscribe("*")
        assert ps.get_message(timeout=5)["type"] == "psubscribe"
    metadata.invalidate("agent-1")

    seen: queue.Queue[str] = queue.Queue()
    message = watchers["cache"].get_message(ignore_subscribe_messages=True, timeout=5)
    if message is not None:
        seen.put("cache")
    assert watchers["state"].get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    assert seen.get_nowait() == "cache"
    for ps in watchers.values():
        ps.close()


def test_health_warns_about_state_on_an_evicting_instance(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    state, cache = two_servers
    mcp_redis.configure(redis_url=cache.url, cache_url=cache.url, sessions_url=state.url)
    report = mcp_redis.health()
    assert report["ok"] is True
    by_policy = {d["maxmemory_policy"]: d["features"] for d in report["deployments"]}
    assert set(by_policy["allkeys-lru"]) >= {"locks", "rate_limits", "metadata_cache"}
    assert by_policy["noeviction"] == ["sessions"]
    evicting = [w for w in report["warnings"] if "maxmemory-policy" in w]
    assert len(evicting) == 1
    assert "locks" in evicting[0] and "rate_limits" in evicting[0] and "sessions" not in evicting[0]


def test_health_does_not_flag_a_cache_on_an_evicting_instance(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    state, cache = two_servers
    mcp_redis.configure(redis_url=state.url, cache_url=cache.url)
    report = mcp_redis.health()
    assert report["ok"] is True
    assert not [w for w in report["warnings"] if "maxmemory-policy" in w]
    assert len(report["deployments"]) == 2


@pytest.mark.parametrize("refused", ["CONFIG", "INFO"])
def test_health_reads_the_policy_when_one_of_info_and_config_is_refused(redis_factory: Any, refused: str) -> None:
    server = redis_factory(args=["--maxmemory-policy", "volatile-lru", "--rename-command", refused, '""'])
    mcp_redis.configure(redis_url=server.url)
    report = mcp_redis.health()
    assert report["deployments"][0]["maxmemory_policy"] == "volatile-lru"
    assert any("volatile-lru" in w for w in report["warnings"])


def test_feature_urls_are_redacted_in_settings_and_client_reprs() -> None:
    client = Client(redis_url="redis://:hunter2@127.0.0.1:1/0", locks_url="redis://u:s3cret@127.0.0.1:2/0")
    assert "hunter2" not in repr(client) and "s3cret" not in repr(client)
    assert "s3cret" not in repr(client.settings)
    client.close()


def test_a_client_keeps_one_connection_per_distinct_url(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    state, cache = two_servers
    with Client(redis_url=state.url, cache_url=cache.url) as client:
        assert client.redis("locks") is client.redis("sessions") is client.redis()
        assert client.redis("metadata_cache") is not client.redis("locks")
        assert len(client.redis_connections()) == 2
    with pytest.raises(mcp_redis.ConfigurationError):
        client.redis("locks")


def test_a_feature_without_a_redis_url_raises_configuration_error() -> None:
    with Client() as client, pytest.raises(mcp_redis.ConfigurationError):
        client.redis("locks")


def test_singleton_is_built_once_and_closed_with_the_client() -> None:
    closed: List[str] = []

    class Thing:
        def close(self) -> None:
            closed.append("thing")

    client = Client()
    built = [client.singleton("thing", Thing) for _ in range(3)]
    assert built[0] is built[1] is built[2]
    client.close()
    assert closed == ["thing"]


def test_configure_replaces_the_default_client(redis_url: str) -> None:
    first = default_client()
    mcp_redis.configure(redis_url=redis_url)
    assert default_client() is not first
    assert default_client().settings.redis_url == redis_url


def test_features_given_a_client_use_its_server_not_the_default_ones(two_servers: Tuple[RedisServer, RedisServer]) -> None:
    default, other = two_servers
    mcp_redis.configure(redis_url=default.url)
    with Client(redis_url=other.url) as client:
        with mcp_redis.agent_lock("agent-c", client=client):
            assert any("agent-c" in k for k in _keys(other))
        with mcp_redis.lock("job-c", client=client):
            assert any("job-c" in k for k in _keys(other))
        assert mcp_redis.RateLimiter("calls-c", 5, 60, client=client).hit("u").allowed
        store = mcp_redis.SessionStore(client=client)
        store.bind("session-c", "agent-c")
        assert store.get("session-c") == "agent-c"
        assert mcp_redis.SessionStore().get("session-c") is None  # the default client's server
        backend = mcp_redis.RedisBackend(client)
        backend.set_session("session-d", "agent-d")
        assert backend.check_rate_limit("u", 5, 60)
        stream = mcp_redis.EventStream("audit-c", client=client)
        stream.add({"n": 1})
        assert mcp_redis.EventBus(client=client).publish("ch", {"n": 1}) == 0
        assert mcp_redis.health(client=client)["redis"]["url"] == client.redis().url
        assert mcp_redis.stats(client=client)["redis"]["url"] == client.redis().url
    other_keys = _keys(other)
    assert any("calls-c" in k for k in other_keys)
    assert any("session-c" in k or "session" in k for k in other_keys)
    assert any("audit-c" in k for k in other_keys)
    assert _keys(default) == []


def test_a_feature_object_made_before_configure_follows_the_new_configuration(
        two_servers: Tuple[RedisServer, RedisServer]) -> None:
    first, second = two_servers
    mcp_redis.configure(redis_url=first.url)
    limiter = mcp_redis.RateLimiter("moving", 5, 60)
    store = mcp_redis.SessionStore()
    limiter.hit("u")
    mcp_redis.configure(redis_url=second.url)
    limiter.hit("u")
    store.bind("s", "a")
    assert any("moving" in k for k in _keys(second))
    assert not any("session" in k for k in _keys(first))


def test_a_client_argument_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(mcp_redis.InvalidArgumentType, match="client"):
        mcp_redis.lock("x", client="redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(mcp_redis.InvalidArgumentType, match="client"):
        mcp_redis.RateLimiter("x", 1, 1, client=object())  # type: ignore[arg-type]
    with pytest.raises(mcp_redis.InvalidArgumentType, match="client"):
        mcp_redis.SessionStore(client=1)  # type: ignore[arg-type]
    with pytest.raises(mcp_redis.InvalidArgumentType, match="client"):
        mcp_redis.EventBus(client=1)  # type: ignore[arg-type]


def test_a_forked_child_forgets_the_clients_connections_and_singletons(redis_url: str) -> None:
    import os

    with Client(redis_url=redis_url) as client:
        parent_conn = client.redis()
        parent_conn.client.ping()
        thing = client.singleton("thing", object)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: fresh objects, its own socket
            try:
                fresh = client.redis() is not parent_conn and client.singleton("thing", object) is not thing
                ok = fresh and client.redis().client.ping()
                os.write(write_end, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read_end, 1) == b"1"
        assert client.redis() is parent_conn and parent_conn.client.ping()  # the parent's still work
        assert client.singleton("thing", object) is thing


def test_the_per_feature_variables_are_known_to_the_unknown_variable_warning() -> None:
    from mcp_redis.config import warn_unknown_variables

    names = ["MCP_REDIS_LOCKS_URL", "MCP_REDIS_SESSIONS_URL", "MCP_REDIS_RATE_LIMITS_URL", "MCP_REDIS_CACHE_URL",
             "MCP_REDIS_EVENTS_URL", "MCP_REDIS_EVENTS_BACKEND"]
    assert warn_unknown_variables({name: "x" for name in names}) == []


def test_events_switched_off_raise_feature_disabled() -> None:
    mcp_redis.configure(events="off")
    with pytest.raises(mcp_redis.FeatureDisabled):
        mcp_redis.EventBus().publish("ch", {"n": 1})
