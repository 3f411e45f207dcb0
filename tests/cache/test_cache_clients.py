"""`cached_metadata(client=...)`: a cached function on its own `mcp_redis.Client`.

Two real redis-servers: the default client on one, an explicit client on the
other. A function's keys, its invalidations and its listener belong to its
client; closing the client stops that listener and empties the function's L1.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import mcp_redis
from mcp_redis.cache import CachedFunction, cached_metadata, invalidation, wait_for_listener
from mcp_redis.client import Client, default_client
from mcp_redis.testing import RedisServer, wait_for


@pytest.fixture
def two_servers(redis_factory: Any) -> Iterator[Tuple[RedisServer, RedisServer]]:
    """(the default client's server, the explicit client's server)."""
    yield redis_factory(), redis_factory()


def _cache_keys(server: RedisServer) -> List[str]:
    return sorted(k.decode() if isinstance(k, bytes) else k for k in server.client().scan_iter("mcp:cache:*"))


class Source:
    def __init__(self) -> None:
        self.loads: List[str] = []

    def __call__(self, agent_id: str) -> Dict[str, Any]:
        self.loads.append(agent_id)
        return {"agent_id": agent_id, "load": len(self.loads)}


def test_a_function_with_its_own_client_writes_only_on_that_clients_deployment(
        two_servers: Tuple[RedisServer, RedisServer]) -> None:
    default_server, own_server = two_servers
    mcp_redis.configure(redis_url=default_server.url)
    with Client(redis_url=own_server.url) as own:
        load = cached_metadata(ttl=60, namespace="tests.clients", client=own)(Source())
        assert load("a1")["agent_id"] == "a1"
        load.invalidate("a2")
        load.invalidate_all()
        assert _cache_keys(own_server), "nothing written on the function's own deployment"
        assert _cache_keys(default_server) == []
        assert default_client().peek(("cache", "invalidation")) is None  # the default client was not used


def test_an_invalidation_on_a_clients_deployment_reaches_only_that_clients_functions(
        two_servers: Tuple[RedisServer, RedisServer]) -> None:
    default_server, own_server = two_servers
    mcp_redis.configure(redis_url=default_server.url)
    with Client(redis_url=own_server.url) as own:
        on_own, on_default = Source(), Source()
        own_load = CachedFunction(on_own, ttl=60, namespace="tests.clients", client=own)
        default_load = CachedFunction(on_default, ttl=60, namespace="tests.clients")
        own_load("a1")
        default_load("a1")
        assert wait_for_listener(10, client=own) and wait_for_listener(10)
        own_load("a1")
        default_load("a1")  # both in L1 again after their listener's first flush
        assert own_load.cache_info().l1_size == 1 and default_load.cache_info().l1_size == 1

        # What another process's invalidate("a1") on the explicit client's deployment sends:
        own_server.client().publish("mcp:cache:invalidate", json.dumps(
            {"o": "elsewhere", "n": "tests.clients", "op": "k", "k": '["a1"]'}))
        wait_for(lambda: own_load.cache_info().l1_size == 0, 5, what="the own client's L1 entry dropped")
        assert default_load.cache_info().l1_size == 1  # its client listens on the other server


def test_closing_a_client_stops_its_listener_and_empties_its_functions_l1(
        two_servers: Tuple[RedisServer, RedisServer]) -> None:
    _, own_server = two_servers
    own = Client(redis_url=own_server.url)
    load = cached_metadata(ttl=60, namespace="tests.clients", client=own)(Source())
    load("a1")
    assert wait_for_listener(10, client=own)
    load("a1")
    listener = invalidation.of(own)
    subscriber = listener.subscriber
    assert subscriber is not None and load.cache_info().l1_size == 1
    own.close()
    assert listener.subscriber is None and not subscriber.active
    assert load.cache_info().l1_size == 0


def test_client_must_be_a_client_and_nothing_is_decorated_otherwise() -> None:
    with pytest.raises(mcp_redis.InvalidArgumentType, match="client"):
        cached_metadata(client="redis://127.0.0.1:6379")(Source())  # type: ignore[arg-type]
