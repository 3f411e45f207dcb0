"""Worker functions for the multi-process rate-limit tests (importable under spawn)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional


def _count_in_threads(threads: int, calls_per_thread: int, call: Callable[[int, int], bool]) -> int:
    """Start `threads` threads together; each makes `calls_per_thread` calls ``call(thread, n)``.

    Returns how many calls returned True; re-raises the first error a thread hit.
    """
    counted: List[int] = [0] * threads
    errors: List[Optional[BaseException]] = [None] * threads
    start = threading.Barrier(threads)

    def run(i: int) -> None:
        try:
            start.wait()
            for n in range(calls_per_thread):
                if call(i, n):
                    counted[i] += 1
        except BaseException as exc:  # reported to the caller below
            errors[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return sum(counted)


def hammer(
    config: Dict[str, Any], name: str, key: str, limit: int, window: float, algorithm: str,
    threads: int, calls_per_thread: int,
) -> int:
    """Configure the library, start `threads` threads each calling `hit` `calls_per_thread` times; count admissions."""
    import mcp_redis

    mcp_redis.configure(**config)
    limiter = mcp_redis.RateLimiter(name, limit, window, algorithm=algorithm)
    admitted = _count_in_threads(threads, calls_per_thread, lambda i, n: limiter.hit(key).allowed)
    backends = {limiter.peek(key).backend}
    mcp_redis.reset(configuration=True)
    if backends != {config.get("rate_limits", "redis")}:
        raise AssertionError(f"ran on {backends}, not {config.get('rate_limits')}")
    return admitted


def ping(_: object = None) -> bool:
    """Warm a pool process up (imports done)."""
    import mcp_redis  # noqa: F401

    return True


def transitions(config: Dict[str, Any], name: str, key: str, limit: int, window: float, pipe: Any) -> None:
    """One server process of the transition tests, driven over a pipe.

    ``("hit", n)`` makes `n` calls and replies ``{backend: admitted}`` (refused
    calls are not listed); ``("wait_redis",)`` peeks (consuming nothing) until
    Redis answers again and replies True (False after 20 s).
    """
    import time

    import mcp_redis

    mcp_redis.configure(**config)
    limiter = mcp_redis.RateLimiter(name, limit, window)
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command[0] == "stop":
            break
        if command[0] == "hit":
            admitted: Dict[str, int] = {}
            for _ in range(command[1]):
                result = limiter.hit(key)
                if result.allowed:
                    admitted[result.backend] = admitted.get(result.backend, 0) + 1
            pipe.send(admitted)
        elif command[0] == "wait_redis":
            deadline = time.monotonic() + 20
            while limiter.peek(key).backend != "redis" and time.monotonic() < deadline:
                time.sleep(0.01)
            pipe.send(limiter.peek(key).backend == "redis")


def hammer_refunds(
    config: Dict[str, Any], name: str, key: str, limit: int, window: float, algorithm: str,
    threads: int, calls_per_thread: int,
) -> int:
    """`threads` threads each make `calls_per_thread` calls of a ``refund_on`` function, every other one failing.

    Returns how many calls succeeded (admitted and did not raise).
    """
    import mcp_redis

    mcp_redis.configure(**config)

    @mcp_redis.rate_limited(name, limit, window, algorithm=algorithm, key="agent_id", refund_on=(RuntimeError,))
    def store(agent_id: str, fail: bool) -> None:
        if fail:
            raise RuntimeError("the store failed")

    def call(i: int, n: int) -> bool:
        try:
            store(key, fail=(n + i) % 2 == 0)
        except (RuntimeError, mcp_redis.RateLimitExceeded):
            return False
        return True

    succeeded = _count_in_threads(threads, calls_per_thread, call)
    mcp_redis.reset(configuration=True)
    return succeeded


def legacy_requests(config: Dict[str, Any], key: str, threads: int, calls_per_thread: int) -> int:
    """`threads` threads each call ``compat.RateLimiter(10, 1000).check_rate_limit(key)``; count admissions."""
    import mcp_redis
    from mcp_redis import compat

    mcp_redis.configure(**config)
    admitted = _count_in_threads(
        threads, calls_per_thread, lambda i, n: bool(compat.RateLimiter(10, 1000).check_rate_limit(key)[0]))
    mcp_redis.reset(configuration=True)
    return admitted
