"""The lock contract: one behaviour, asserted on every backend that excludes.

Each test runs against ``redis`` (a private redis-server), ``postgres``
(advisory locks in a throwaway database) and ``file`` (``locks=local``:
fcntl file locks), each through its own explicit `mcp_redis.Client`. ``off``
excludes nothing by design and is covered in test_locks_local.py.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, List, Tuple

import pytest
import redis

import mcp_redis
from mcp_redis import LockNotOwned, LockTimeout
from mcp_redis.locks import advisory_key

BACKENDS = ["redis", "postgres", "file"]


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` in another thread (locks are owned per thread); its result or exception."""
    out: List[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed back to the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out, "the other thread did not finish"
    return out[0]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Tuple[str, mcp_redis.Client, Callable[[str], None]]]:
    """(backend label, a client using it, lose(key): makes the store drop the hold of `key`)."""
    kind = request.param
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        client = mcp_redis.Client(redis_url=url, locks="redis")
        raw = redis.Redis.from_url(url)

        def lose(key: str) -> None:
            raw.delete(key)  # the lease ended and nobody renewed it

    elif kind == "postgres":
        database_url = request.getfixturevalue("database_url")
        client = mcp_redis.Client(redis_url=None, database_url=database_url, locks="postgres")

        def lose(key: str) -> None:
            import psycopg2

            conn = psycopg2.connect(database_url)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:  # the holder's session dies, and its advisory lock with it
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = "
                        "(%s::bigint & x'ffffffffffffffff'::bigint)",
                        (advisory_key(key),),
                    )
                    assert cur.fetchall(), "no session held the advisory lock"
            finally:
                conn.close()

    else:
        client = mcp_redis.Client(redis_url=None, locks="local", lock_dir=str(tmp_path / "locks"))

        def lose(key: str) -> None:
            pytest.skip("a file lock cannot be lost while its process lives (the kernel keeps the flock)")

    try:
        yield ("local" if kind == "file" else kind), client, lose
    finally:
        client.close()


def test_acquire_holds_and_release_frees(backend: Any) -> None:
    label, client, _ = backend
    lk = mcp_redis.lock("contract-basic", timeout=30, client=client)
    assert lk.acquire() is True
    assert lk.backend == label
    assert lk.owned() and lk.locked()
    assert _in_thread(lambda: mcp_redis.lock("contract-basic", client=client).locked()) is True
    lk.release()
    assert not lk.owned() and not lk.locked()


def test_held_lock_times_out_another_thread_with_lock_timeout(backend: Any) -> None:
    _, client, _ = backend
    with mcp_redis.agent_lock("contract-timeout", timeout=30, client=client):

        def enter() -> None:
            with mcp_redis.agent_lock("contract-timeout", blocking_timeout=0.2, client=client):
                pass

        error = _in_thread(enter)
    assert isinstance(error, LockTimeout)
    assert isinstance(error, TimeoutError) and isinstance(error, mcp_redis.McpRedisError)
    assert isinstance(error, redis.exceptions.LockError)


def test_non_blocking_acquire_of_a_held_lock_returns_false(backend: Any) -> None:
    _, client, _ = backend
    lk = mcp_redis.lock("contract-nonblocking", timeout=30, client=client)
    assert lk.acquire()
    try:
        other = mcp_redis.lock("contract-nonblocking", client=client)
        assert _in_thread(lambda: other.acquire(blocking=False)) is False
        assert _in_thread(lambda: other.acquire(blocking_timeout=0)) is False
    finally:
        lk.release()
    assert _in_thread(lambda: mcp_redis.lock("contract-nonblocking", client=client).acquire(blocking=False)) is True


def test_fencing_tokens_strictly_increase_per_name(backend: Any) -> None:
    _, client, _ = backend
    lk = mcp_redis.lock("contract-fence", timeout=30, client=client)
    tokens: List[int] = []
    for _ in range(5):
        assert lk.acquire()
        assert isinstance(lk.fencing_token, int)
        tokens.append(lk.fencing_token)
        lk.release()
    assert all(a < b for a, b in zip(tokens, tokens[1:])), tokens


def test_owned_is_per_thread_while_locked_is_for_everyone(backend: Any) -> None:
    _, client, _ = backend
    lk = mcp_redis.lock("contract-owned", timeout=30, client=client)
    assert not lk.owned() and not lk.locked()
    assert lk.acquire()
    try:
        assert lk.owned()
        assert _in_thread(lk.owned) is False
        assert _in_thread(lk.locked) is True
    finally:
        lk.release()


def test_release_by_a_thread_not_holding_raises_and_keeps_the_lock(backend: Any) -> None:
    _, client, _ = backend
    lk = mcp_redis.lock("contract-foreign", timeout=30, client=client)
    with pytest.raises(LockNotOwned):
        lk.release()
    assert lk.acquire()
    try:
        assert isinstance(_in_thread(lk.release), LockNotOwned)
        assert lk.owned() and lk.locked()
    finally:
        lk.release()


def test_release_after_the_hold_was_lost_raises_lock_not_owned(backend: Any) -> None:
    _, client, lose = backend
    lk = mcp_redis.lock("contract-lost", timeout=30, client=client)
    assert lk.acquire()
    lose(lk.key)
    assert not lk.owned()
    with pytest.raises(LockNotOwned):
        lk.release()
    assert lk.lost
    # The name is free again for the next holder.
    assert _in_thread(lambda: mcp_redis.lock("contract-lost", client=client).acquire(blocking=False)) is True


def test_agent_lock_is_reentrant_in_its_thread_only(backend: Any) -> None:
    _, client, _ = backend
    with mcp_redis.agent_lock("contract-reentrant", timeout=30, client=client) as outer:
        fence = outer.fencing_token
        with mcp_redis.agent_lock("contract-reentrant", blocking_timeout=0, client=client) as inner:
            assert inner.fencing_token == fence
        assert outer.owned()  # leaving the inner block keeps the outer hold

        def enter() -> None:
            with mcp_redis.agent_lock("contract-reentrant", blocking_timeout=0, client=client):
                pass

        assert isinstance(_in_thread(enter), LockTimeout)
    assert not outer.locked()
