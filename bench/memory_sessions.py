"""Bytes per session binding in Redis, indexes included: `SessionStore` beside a raw SETEX.

    python -m bench.memory_sessions [--n 20000]

Each case runs on a fresh redis-server (mcp_redis.testing.RedisServer):
``INFO memory`` ``used_memory`` before and after `n` bindings, divided by
`n`. Cases: the naive layout (``SETEX session:<32 hex> <uuid>``), then
`SessionStore.bind` (Redis-only mode: the binding with its packed record and
the session index) with one session per agent and with ten, each without
and with caller fields (``client_type="sse"``, a small ``client_info``).
`measure_raw` and `measure_store` are importable (bench/bench_memory.py).
``--cpu`` adds the Redis CPU per `bind` and `get` (``INFO commandstats``:
the scripts' own ``usec``, plus the commands the index sweep sends), on
`n` distinct agents.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Dict, List, Optional

import redis

import mcp_redis
from mcp_redis.testing import RedisServer

FIELDS: Dict[str, object] = {"client_type": "sse", "client_info": {"name": "claude-code", "version": "1.0"}}


def _used(client: redis.Redis[str]) -> int:
    return int(client.info("memory")["used_memory"])


def measure_raw(n: int = 20_000) -> float:
    """Bytes per binding of ``SETEX session:<32 hex> 86400 <uuid>`` (the naive layout)."""
    with RedisServer() as server:
        client: redis.Redis[str] = redis.Redis(port=server.port, decode_responses=True)
        before = _used(client)
        pipe = client.pipeline(transaction=False)
        for _ in range(n):
            pipe.setex("session:" + uuid.uuid4().hex, 86_400, str(uuid.uuid4()))
        pipe.execute()
        return (_used(client) - before) / n


def measure_store(n: int = 20_000, per_agent: int = 1, fields: bool = False) -> float:
    """Bytes per binding of `SessionStore.bind` (Redis only), `per_agent` sessions per agent."""
    with RedisServer() as server:
        mcp_redis.configure(redis_url=server.url)
        try:
            store = mcp_redis.SessionStore(ttl=86_400)
            client: redis.Redis[str] = redis.Redis(port=server.port, decode_responses=True)
            agents = [str(uuid.uuid4()) for _ in range(max(1, n // per_agent))]
            extra = FIELDS if fields else {}
            store.bind("warm-up", "warm-up")  # scripts loaded, the index key exists
            store.unbind("warm-up")
            before = _used(client)
            for i in range(n):
                store.bind(uuid.uuid4().hex, agents[i // per_agent], **extra)
            return (_used(client) - before) / n
        finally:
            mcp_redis.reset()


def redis_cpu_per_call(n: int = 10_000) -> Dict[str, float]:
    """Redis CPU µs per `SessionStore.bind` and `.get` (Redis only), from ``INFO commandstats``."""
    with RedisServer() as server:
        mcp_redis.configure(redis_url=server.url)
        try:
            store = mcp_redis.SessionStore(ttl=3600)
            client: redis.Redis[str] = redis.Redis(port=server.port, decode_responses=True)
            pairs = [(uuid.uuid4().hex, str(uuid.uuid4())) for _ in range(n)]
            store.bind("warm-up", "warm-up")
            out: Dict[str, float] = {}
            for name, run in (("bind", lambda: [store.bind(s, a) for s, a in pairs]),
                              ("get", lambda: [store.get(s) for s, _ in pairs])):
                client.config_resetstat()
                run()
                stats = client.info("commandstats")
                # Commands run inside a script are counted in the script's own usec too.
                top = ("cmdstat_evalsha", "cmdstat_get", "cmdstat_mget", "cmdstat_zrangebylex")
                out[name] = sum(float(stats[k]["usec"]) for k in top if k in stats) / n
            return out
        finally:
            mcp_redis.reset()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="bindings per case")
    parser.add_argument("--cpu", action="store_true", help="also Redis CPU µs per bind / get")
    args = parser.parse_args(argv)
    raw = measure_raw(args.n)
    print(f"| layout ({args.n:,} bindings, INFO memory delta) | bytes/binding | × raw SETEX |")
    print("|---|---:|---:|")
    print(f"| raw `SETEX session:<32 hex> <uuid>` | {raw:.0f} | 1.00× |")
    for per_agent in (1, 10):
        for fields in (False, True):
            got = measure_store(args.n, per_agent, fields)
            label = f"`SessionStore.bind`, {per_agent} session(s)/agent, " + ("with" if fields else "no") + " caller fields"
            print(f"| {label} | {got:.0f} | {got / raw:.2f}× |")
    if args.cpu:
        cpu = redis_cpu_per_call(min(args.n, 10_000))
        print(f"\nRedis CPU per call (INFO commandstats): bind {cpu['bind']:.1f} µs, get {cpu['get']:.1f} µs")


if __name__ == "__main__":
    main()
