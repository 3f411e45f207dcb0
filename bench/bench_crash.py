"""Crash recovery: SIGKILL a process holding a lock; how long until another process enters?

    python -m bench.bench_crash [--trials 10] [--peer-lease 5]

Starts its own redis-server (mcp_redis.testing.RedisServer). Per trial a
spawned process takes the lock and reports; this process SIGKILLs it and
times, from the kill, its own blocking acquire of the same lock:

* mcp_redis ``agent_lock`` with default settings (30 s lease, renewed; the
  holder's process liveness key lapses `LIVENESS_TTL` after its last beat);
* redis-py ``Lock`` (``timeout=--peer-lease``, no renewal: it must cover the
  longest section, so real deployments set it far higher);
* python-redis-lock (``expire=--peer-lease``, ``auto_renewal=True``,
  ``acquire(blocking=True)``: it re-checks every ``expire`` seconds).

Prints p50 and max (s) per library over the trials.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import time
from typing import Any, Callable, Dict, List

import redis

import mcp_redis
from mcp_redis.locks.redis import LIVENESS_TTL
from mcp_redis.testing import RedisServer

try:
    import redis_lock  # python-redis-lock
except ImportError:  # pragma: no cover - optional peer
    redis_lock = None

SPAWN = multiprocessing.get_context("spawn")


def _take(kind: str, url: str, name: str, lease: float) -> Callable[[float], bool]:
    """A blocking acquire of `name` with library `kind`; returns acquire(wait) -> bool."""
    if kind == "mcp_redis":
        mcp_redis.configure(redis_url=url)
        return lambda wait: mcp_redis.agent_lock(name, blocking_timeout=wait).acquire()
    client = redis.Redis.from_url(url, socket_timeout=300)  # python-redis-lock BLPOPs for the whole wait
    if kind == "redis-py":
        return lambda wait: bool(client.lock(name, timeout=lease, sleep=0.01).acquire(blocking_timeout=wait))
    lock = redis_lock.Lock(client, name, expire=int(lease), auto_renewal=True)
    # Its documented blocking call: with a timeout it would BLPOP all of it (nobody signals a
    # dead holder's expiry); without, it looks again every `expire` seconds.
    return lambda wait: bool(lock.acquire(blocking=True))


def holder(kind: str, url: str, name: str, lease: float, ready: Any) -> None:
    """Take the lock, say so, and hold it until killed."""
    acquire = _take(kind, url, name, lease)
    assert acquire(60)
    ready.put(os.getpid())
    while True:
        time.sleep(3600)


def trial(kind: str, url: str, name: str, lease: float) -> float:
    ready = SPAWN.Queue()
    proc = SPAWN.Process(target=holder, args=(kind, url, name, lease, ready), daemon=True)
    proc.start()
    ready.get(timeout=60)
    acquire = _take(kind, url, name, lease)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    if not acquire(120):
        raise RuntimeError(f"{kind}: not acquired within 120 s of the kill")
    entered = time.monotonic() - killed
    proc.join(10)
    return entered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--peer-lease", type=float, default=5.0)
    parser.add_argument("--only", default="", help="comma-separated libraries to run (default: all)")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        kinds = ["mcp_redis", "redis-py"] + (["python-redis-lock"] if redis_lock is not None else [])
        if args.only:
            kinds = [k for k in kinds if k in args.only.split(",")]
        results: Dict[str, List[float]] = {}
        for kind in kinds:
            times = []
            for t in range(args.trials):
                server.client().flushall()
                times.append(trial(kind, server.url, f"crash-{t}", args.peer_lease))
                mcp_redis.reset(configuration=True)
            results[kind] = times
            print(f"{kind}: {', '.join(f'{t:.3f}' for t in times)}", flush=True)
        print(f"SIGKILL of the holder -> another process enters ({args.trials} trials; "
              f"mcp_redis LIVENESS_TTL {LIVENESS_TTL} s, default 30 s lease; peers' lease {args.peer_lease} s)")
        print(f"{'library':<20} {'p50 s':>8} {'max s':>8}")
        for kind, times in results.items():
            print(f"{kind:<20} {statistics.median(times):>8.3f} {max(times):>8.3f}")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
