"""`@rate_limited` and `@cached_metadata` on ``async def`` handlers (the legacy server's MCP handlers).

Counted and cached when awaited, never when the coroutine is created; the
awaited value is what is cached; Redis is waited for in a worker thread, so
the event loop keeps running; the wrapper is still a coroutine function, so
the MCP SDK sees an async handler.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from typing import Any, Dict, List

import pytest

import mcp_redis
from mcp_redis import RateLimitExceeded, cached_metadata, rate_limited
from mcp_redis.cache import CachedFunction
from mcp_redis.errors import InvalidArgumentType
from mcp_redis.ratelimit.redis import RedisBackend


def loop_keeps_running_while(patch_target: Any, attribute: str, monkeypatch: pytest.MonkeyPatch,
                             call: Any) -> List[str]:
    """Await `call()` while `patch_target.attribute` (the blocking step) is held
    until another coroutine on the same loop has run; returns the order of
    events: ``["loop ran", "blocking step done"]`` when the loop was free."""
    original = getattr(patch_target, attribute)
    started, release = threading.Event(), threading.Event()
    order: List[str] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(10)  # only a bound on the deadlock a blocked loop would cause
        order.append("blocking step done")
        return original(*args, **kwargs)

    monkeypatch.setattr(patch_target, attribute, held)

    async def other_coroutine() -> None:
        while not started.is_set():
            await asyncio.sleep(0.001)
        order.append("loop ran")
        release.set()

    async def scenario() -> None:
        await asyncio.gather(call(), other_coroutine())

    asyncio.run(scenario())
    return order


# -- rate limits ----------------------------------------------------------------------
def limited_handler() -> Any:
    @rate_limited("async_tool", limit=2, window=3600, key="agent_id")
    async def handler(agent_id: str) -> str:
        await asyncio.sleep(0)
        return f"done {agent_id}"

    return handler


def test_rate_limited_coroutine_function_stays_a_coroutine_function(redis_mode: str) -> None:
    handler = limited_handler()
    assert inspect.iscoroutinefunction(handler)
    assert handler.__name__ == "handler" and handler.limiter.name == "async_tool"


def test_coroutines_created_but_never_awaited_use_no_slot(redis_mode: str) -> None:
    handler = limited_handler()
    never_awaited = [handler("a1") for _ in range(3)]
    for coro in never_awaited:
        coro.close()
    assert asyncio.run(handler("a1")) == "done a1"
    assert handler.limiter.peek("a1").remaining == 1


def test_third_awaited_call_over_a_limit_of_two_raises(redis_mode: str) -> None:
    handler = limited_handler()

    async def three_calls() -> List[str]:
        return [await handler("a1"), await handler("a1")]

    assert asyncio.run(three_calls()) == ["done a1", "done a1"]
    with pytest.raises(RateLimitExceeded) as refused:
        asyncio.run(handler("a1"))
    assert refused.value.limit == 2 and refused.value.retry_after > 0


def test_refused_coroutine_does_not_run_and_async_on_limited_is_awaited(redis_mode: str) -> None:
    ran: List[str] = []

    async def fallback(error: RateLimitExceeded, agent_id: str) -> str:
        await asyncio.sleep(0)
        return f"limited {agent_id} ({error.limit})"

    @rate_limited("async_hook", limit=1, window=3600, on_limited=fallback)
    async def handler(agent_id: str) -> str:
        ran.append(agent_id)
        return "ran"

    assert asyncio.run(handler("a1")) == "ran"
    assert asyncio.run(handler("a1")) == "limited a1 (1)"
    assert ran == ["a1"]


def test_rate_limit_hit_waits_for_redis_off_the_event_loop(redis_mode: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    handler = limited_handler()
    handler.limiter.peek("warm-up")  # the storage exists: its acquire is the Redis round trip
    order = loop_keeps_running_while(RedisBackend, "acquire", monkeypatch, lambda: handler("a1"))
    assert order == ["loop ran", "blocking step done"]
    assert handler.limiter.peek("a1").remaining == 1  # and the call was counted, in Redis


def test_rate_limited_refuses_generator_functions_at_decoration() -> None:
    with pytest.raises(InvalidArgumentType, match="fn"):
        @rate_limited("gen", limit=1, window=60)
        async def stream(agent_id: str) -> Any:
            yield agent_id


class AsyncTool:
    """A handler object whose ``__call__`` is an ``async def`` (how some MCP servers register tools)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, agent_id: str) -> str:
        await asyncio.sleep(0)
        self.calls += 1
        if agent_id == "fails":
            raise RuntimeError("tool failed")
        return f"done {agent_id}"


def test_rate_limited_async_callable_object_is_counted_when_awaited_and_refunded(redis_mode: str) -> None:
    """An object with an ``async def __call__`` (or a partial of an ``async def``) is an
    ``async def`` to the decorator: counted when awaited, its refund_on honoured (it used
    to be counted when the coroutine was created, and never refunded)."""
    tool = AsyncTool()
    handler = rate_limited("async_object", limit=2, window=3600, key="agent_id", refund_on=RuntimeError)(tool)
    assert inspect.iscoroutinefunction(handler)
    for coro in [handler("a1") for _ in range(3)]:
        coro.close()
    assert handler.limiter.peek("a1").remaining == 2 and tool.calls == 0
    assert asyncio.run(handler("a1")) == "done a1"
    with pytest.raises(RuntimeError):
        asyncio.run(handler("fails"))
    assert handler.limiter.peek("fails").remaining == 2  # given back

    async def plain(agent_id: str, suffix: str) -> str:
        return agent_id + suffix

    partial_handler = rate_limited("async_partial", limit=1, window=3600,
                                   key=lambda agent_id: agent_id)(functools.partial(plain, suffix="!"))
    assert inspect.iscoroutinefunction(partial_handler)
    partial_handler("a1").close()
    assert asyncio.run(partial_handler("a1")) == "a1!"


def test_decorators_refuse_generator_callable_objects() -> None:
    class Stream:
        def __call__(self, agent_id: str) -> Any:
            yield agent_id

    for decorate in (rate_limited("gen_object", limit=1, window=60), cached_metadata):
        with pytest.raises(InvalidArgumentType, match="fn"):
            decorate(Stream())


def test_decorators_above_staticmethod_keep_it_static_and_async_and_refuse_classmethod(redis_mode: str) -> None:
    # A staticmethod object is callable since Python 3.10: both decorators took it for a plain
    # function, counting its coroutines at creation and caching nothing (a reviewer); over a
    # classmethod, @cached_metadata blamed `ttl`.
    loads: List[str] = []

    class Tools:
        @rate_limited("static_async", limit=2, window=60)
        @staticmethod
        async def handler(agent_id: str) -> str:
            return "ran"

        @cached_metadata(ttl=60, namespace="tests.static_async")
        @staticmethod
        async def load(agent_id: str) -> Dict[str, str]:
            loads.append(agent_id)
            return {"id": agent_id}

        @cached_metadata(ttl=60, namespace="tests.static_sync")
        @staticmethod
        def load_sync(agent_id: str) -> str:
            return agent_id.upper()

    tools = Tools()
    assert inspect.iscoroutinefunction(tools.handler) and inspect.iscoroutinefunction(tools.load)
    for _ in range(3):
        tools.handler("a").close()  # never awaited: no slot used

    async def main() -> None:
        assert await tools.handler("a") == "ran" and await Tools.handler("a") == "ran"
        with pytest.raises(RateLimitExceeded):
            await tools.handler("a")
        for _ in range(3):
            assert await tools.load("x") == {"id": "x"}

    asyncio.run(main())
    assert loads == ["x"]
    assert tools.load_sync("y") == "Y" and isinstance(Tools.load_sync, CachedFunction)
    for decorate in (rate_limited("cm", limit=1, window=60), cached_metadata, cached_metadata(ttl=60)):
        with pytest.raises(InvalidArgumentType, match="^fn: .*below @classmethod"):
            decorate(classmethod(lambda cls, agent_id: agent_id))


# -- metadata cache -------------------------------------------------------------------
class AsyncSource:
    """An async loader's source of truth; counts loads."""

    def __init__(self) -> None:
        self.rows: Dict[str, Any] = {}
        self.loads: List[str] = []

    async def load(self, agent_id: str) -> Any:
        await asyncio.sleep(0)
        self.loads.append(agent_id)
        return self.rows.get(agent_id, {"agent_id": agent_id, "version": 0})


def cached_handler(source: AsyncSource) -> Any:
    @cached_metadata(namespace="tests.async_meta")
    async def get_agent_metadata(agent_id: str) -> Any:
        return await source.load(agent_id)

    return get_agent_metadata


def test_cached_coroutine_function_stays_a_coroutine_function(redis_mode: str) -> None:
    load = cached_handler(AsyncSource())
    assert inspect.iscoroutinefunction(load)
    assert load.__name__ == "get_agent_metadata" and load.namespace == "tests.async_meta"


def test_cached_coroutine_caches_the_awaited_value_in_both_tiers(redis_mode: str) -> None:
    source = AsyncSource()
    load = cached_handler(source)

    async def twice() -> List[Any]:
        return [await load("a1"), await load("a1")]

    first, second = asyncio.run(twice())
    assert first == second == {"agent_id": "a1", "version": 0}
    assert source.loads == ["a1"]
    info = load.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # L1, or L2 if the listener's first subscription flushed L1
    stored = [json.loads(v)["v"] for v in _values(redis_mode).values()]
    assert stored == [{"agent_id": "a1", "version": 0}]  # the awaited value, never a coroutine
    other_process = cached_handler(source)  # a fresh L1 over the same L2
    load.cache_clear()
    assert asyncio.run(other_process("a1")) == first and source.loads == ["a1"]


def test_cached_coroutine_invalidate_and_refresh_reach_the_loader_again(redis_mode: str) -> None:
    source = AsyncSource()
    load = cached_handler(source)
    asyncio.run(load("a1"))
    source.rows["a1"] = {"agent_id": "a1", "version": 1}
    load.invalidate("a1")
    assert asyncio.run(load("a1"))["version"] == 1
    source.rows["a1"] = {"agent_id": "a1", "version": 2}
    assert asyncio.run(load.refresh("a1"))["version"] == 2
    assert asyncio.run(load.get_many(["a1", "a2"])) == {"a1": source.rows["a1"],
                                                        "a2": {"agent_id": "a2", "version": 0}}
    assert source.loads == ["a1", "a1", "a1", "a2"]
    assert load.cache_info().invalidations == 2


def test_cached_coroutine_loader_error_propagates_and_is_not_cached(redis_mode: str) -> None:
    calls: List[str] = []

    @cached_metadata(namespace="tests.async_fail")
    async def flaky(agent_id: str) -> Any:
        calls.append(agent_id)
        if len(calls) == 1:
            raise LookupError("first load fails")
        return {"agent_id": agent_id}

    with pytest.raises(LookupError):
        asyncio.run(flaky("a1"))
    assert asyncio.run(flaky("a1")) == {"agent_id": "a1"}


def test_cache_miss_waits_for_redis_off_the_event_loop(redis_mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = AsyncSource()
    load = cached_handler(source)
    order = loop_keeps_running_while(CachedFunction, "_miss", monkeypatch, lambda: load("a1"))
    assert order == ["loop ran", "blocking step done"]
    assert source.loads == ["a1"]


def test_cached_async_callable_object_caches_the_awaited_value(redis_mode: str) -> None:
    source = AsyncSource()

    class Loader:
        async def __call__(self, agent_id: str) -> Any:
            return await source.load(agent_id)

    load = cached_metadata(namespace="tests.async_object")(Loader())
    assert inspect.iscoroutinefunction(load)

    async def twice() -> List[Any]:
        return [await load("a1"), await load("a1")]

    assert asyncio.run(twice()) == [{"agent_id": "a1", "version": 0}] * 2
    assert source.loads == ["a1"]


def test_cached_metadata_refuses_generator_functions_at_decoration() -> None:
    with pytest.raises(InvalidArgumentType, match="fn"):
        @cached_metadata
        async def stream(agent_id: str) -> Any:
            yield agent_id


def test_cached_coroutine_in_local_mode_caches_the_awaited_value() -> None:
    mcp_redis.configure(metadata_cache="local")
    source = AsyncSource()
    load = cached_handler(source)

    async def twice() -> List[Any]:
        return [await load("a1"), await load("a1")]

    assert asyncio.run(twice()) == [{"agent_id": "a1", "version": 0}] * 2
    assert source.loads == ["a1"]


def _values(url: str) -> Dict[str, str]:
    """Every L2 value key (not epochs, generations or locks) and its raw envelope."""
    import redis

    conn = redis.Redis.from_url(url, decode_responses=True)
    return {k: conn.get(k) for k in conn.keys("mcp:cache:*") if "#" not in k}
