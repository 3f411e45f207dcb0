"""When Redis draws a lock's fencing token, on a real redis-server.

An uncontended grant is one plain ``SET`` (no script, no fencing counter);
the token is drawn on first read of `fencing_token` while the lock is held,
or with the grant (``fencing=True``, pipelined in the same round trip).
Either way tokens strictly increase per name, and a hold that ended before
its token was drawn never gets one.
"""

from __future__ import annotations

import threading
from typing import Any, List

import pytest

import mcp_redis
from mcp_redis import BackendUnavailable, BlockingCallInEventLoop, LockNotOwned
from mcp_redis.testing import wait_for
from tests.locks.test_locks import evalsha_calls, raw


def test_an_uncontended_grant_runs_no_script_and_writes_no_fencing_counter(redis_mode: str) -> None:
    r = raw(redis_mode)
    held = mcp_redis.lock("plain", timeout=5)
    with held:  # warm: the process's liveness key is written before the first grant
        pass
    before = evalsha_calls(r)
    for _ in range(5):
        with mcp_redis.agent_lock("plain-agent"):
            pass
        with held:
            pass
    assert evalsha_calls(r) - before == 10  # the releases only
    assert r.keys("*#fence") == []


def test_a_token_drawn_on_read_rises_above_every_earlier_token_of_the_name(redis_mode: str) -> None:
    r = raw(redis_mode)
    lazy = mcp_redis.lock("mixed", timeout=5)
    eager = mcp_redis.lock("mixed", timeout=5, fencing=True)
    with lazy:  # the server learns the script first (NOSCRIPT, load, run: three EVALSHAs)
        tokens: List[int] = [lazy.fencing_token or 0]
    for step in range(9):
        with (eager if step % 3 == 1 else lazy) as held:
            if step % 3 == 2:
                continue  # a hold whose token nobody reads: it draws none
            before = evalsha_calls(r)
            first = held.fencing_token
            assert first is not None and held.fencing_token == first
            assert evalsha_calls(r) == before + (0 if held is eager else 1)  # drawn once, or with the grant
            tokens.append(first)
    assert tokens == sorted(set(tokens)) and len(tokens) == 7
    assert int(r.get(lazy.key + "#fence")) == tokens[-1]


def test_agent_lock_with_fencing_draws_the_token_in_the_grant_round_trip(redis_mode: str) -> None:
    r = raw(redis_mode)
    with mcp_redis.agent_lock("eager", fencing=True):  # the server learns the script first
        pass
    with mcp_redis.agent_lock("eager", fencing=True) as outer:
        calls = evalsha_calls(r)
        token = outer.fencing_token
        with mcp_redis.agent_lock("eager") as inner:  # re-entered: the same hold, the same token
            assert inner.fencing_token == token
        assert evalsha_calls(r) == calls
    with mcp_redis.agent_lock("eager", fencing=True) as again:
        assert again.fencing_token is not None and token is not None and again.fencing_token > token


def test_reading_the_token_of_a_lost_hold_raises_and_marks_it_lost(redis_mode: str) -> None:
    r = raw(redis_mode)
    stale = mcp_redis.lock("lost-draw", timeout=0.2)
    assert stale.acquire()
    wait_for(lambda: not r.exists(stale.key), timeout=5, what="the lease to run out")
    successor = mcp_redis.lock("lost-draw", timeout=5)
    assert successor.acquire(blocking_timeout=0)
    token = successor.fencing_token
    with pytest.raises(LockNotOwned, match="lost before its fencing token was read"):
        stale.fencing_token
    assert stale.lost and not successor.lost
    assert successor.fencing_token == token
    assert int(r.get(stale.key + "#fence")) == token  # the stale read drew nothing
    successor.release()


def test_a_token_is_read_after_release_only_if_it_was_drawn_while_held(redis_mode: str) -> None:
    read = mcp_redis.lock("after-release", timeout=5)
    with read:
        token = read.fencing_token
    assert read.fencing_token == token
    unread = mcp_redis.lock("after-release", timeout=5)
    with unread:
        pass
    with pytest.raises(LockNotOwned, match="ended before its fencing token was read"):
        unread.fencing_token
    assert mcp_redis.lock("never-held").fencing_token is None


def test_threads_sharing_one_hold_draw_one_token(redis_mode: str) -> None:
    r = raw(redis_mode)
    shared = mcp_redis.lock("shared-draw", timeout=10, thread_local=False)
    with mcp_redis.lock("shared-draw-warm") as warm:  # the server learns the script first
        assert warm.fencing_token
    assert shared.acquire()
    before = evalsha_calls(r)
    barrier = threading.Barrier(8)
    seen: List[int] = []

    def read() -> None:
        barrier.wait()
        token = shared.fencing_token
        assert token is not None
        seen.append(token)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 8 and len(set(seen)) == 1
    assert evalsha_calls(r) - before == 1
    shared.release()


def test_a_token_not_yet_drawn_needs_redis_and_one_drawn_with_the_grant_does_not(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=1)
    lazy = mcp_redis.lock("outage-lazy", timeout=30)
    eager = mcp_redis.lock("outage-eager", timeout=30, fencing=True)
    assert lazy.acquire() and eager.acquire()
    server.stop()
    with pytest.raises(BackendUnavailable):  # fails closed: no token without the counter
        lazy.fencing_token
    assert isinstance(eager.fencing_token, int)


@pytest.mark.parametrize("fallback", ["postgres", "local"])
def test_with_a_fallback_every_redis_grant_draws_its_token(redis_factory: Any, database_url: str, fallback: str,
                                                           tmp_path: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, database_url=database_url, lock_fallback=fallback,
                        lock_dir=str(tmp_path), retry_attempts=1, breaker_failure_threshold=1_000_000)
    r = raw(server.url)
    with mcp_redis.agent_lock("gated") as first:  # (postgres: opens the name's gate, reconciling a token)
        pass
    fence_key = first.key + "#fence"
    before = int(r.get(fence_key))
    held = mcp_redis.agent_lock("gated")  # no fencing=True; the gate is open now
    assert held.acquire()
    drawn = int(r.get(fence_key))
    assert drawn > before  # this grant drew its own token, before any read
    server.stop()
    assert held.fencing_token == drawn  # and has it with Redis gone (its lease runs out)


def test_a_token_still_to_draw_is_never_drawn_on_an_event_loop_thread(redis_mode: str) -> None:
    import asyncio

    lazy = mcp_redis.lock("loop-draw", timeout=10, thread_local=False)  # shared: the loop's thread sees the hold
    eager = mcp_redis.lock("loop-draw-eager", timeout=10, thread_local=False, fencing=True)
    assert lazy.acquire() and eager.acquire()

    async def read() -> Any:
        with pytest.raises(BlockingCallInEventLoop, match="fencing=True"):
            lazy.fencing_token
        return eager.fencing_token  # drawn with the grant: no round trip, allowed

    assert isinstance(asyncio.run(read()), int)
    assert isinstance(lazy.fencing_token, int)  # off the loop, the draw runs
    lazy.release()
    eager.release()
