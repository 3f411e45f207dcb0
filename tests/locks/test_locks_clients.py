"""Locks per `mcp_redis.Client`: each client's holds, reentrancy and watchdog are its own."""

from __future__ import annotations

import threading
from typing import Any, Set

import pytest
import redis

import mcp_redis


def test_agent_lock_through_another_deployment_is_taken_there_not_reentered(redis_factory: Any) -> None:
    first, second = redis_factory(), redis_factory()
    with mcp_redis.Client(redis_url=first.url) as a, mcp_redis.Client(redis_url=second.url) as b:
        with mcp_redis.agent_lock("shared-name", timeout=30, client=a) as on_a:
            # The same name on another deployment is another lock: it must be
            # taken in `b`'s Redis, not "re-entered" from the hold in `a`'s.
            with mcp_redis.agent_lock("shared-name", timeout=30, client=b) as on_b:
                assert redis.Redis.from_url(second.url).exists(on_b.key) == 1
            assert redis.Redis.from_url(second.url).exists(on_b.key) == 0
            assert on_a.owned()  # leaving b's block left a's hold alone
        assert redis.Redis.from_url(first.url).exists(on_a.key) == 0


def _watchdog_threads() -> Set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "mcp_redis-lock-watchdog"}


def test_closing_a_client_ends_its_watchdog_and_refuses_further_lock_calls(redis_url: str) -> None:
    before = _watchdog_threads()
    client = mcp_redis.Client(redis_url=redis_url)
    held = mcp_redis.agent_lock("closed-client", timeout=30, client=client)
    held.acquire()
    started = _watchdog_threads() - before
    assert len(started) == 1  # the client's own renewer
    client.close()
    (thread,) = started
    thread.join(10)
    assert not thread.is_alive()
    # A closed client serves no call; the hold's lease runs out in Redis.
    with pytest.raises(mcp_redis.ConfigurationError, match="client: closed"):
        held.release()
    assert redis.Redis.from_url(redis_url).pttl(held.key) > 0
