"""Bytes per session binding in Redis, indexes included: `SessionStore` beside a raw SETEX.

    python -m bench.memory_sessions [--n 20000]

Each case runs on a fresh redis-server (mcp_redis.testing.RedisServer):
``INFO memory`` ``used_memory`` before and after `n` bindings, divided by
`n`. Cases: the naive layout (``SETEX session:<32 hex> <uuid>``), then
`SessionStore.bind` (Redis-only mode: the binding with its packed record and
the session index) with one session per agent and with ten, each without
and with caller fields (``client_type="sse"``, a small ``client_info``).
`measure_raw` and `measure_store` are importable (bench/bench_memory.py).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Dict, List, Optional

import redis

import mcp_redis
from mcp_redis.testing import RedisServer

FIELDS: Dict[str, object] = {"client_type": "sse", "client_info": {"name": "claude-code", "version": "1.0"}}


def _used(client: "redis.Redis[str]") -> int:
    return int(client.info("memory")["used_memory"])


def measure_raw(n: int = 20_000) -> float:
    """Bytes per binding of ``SETEX session:<32 hex> 86400 <uuid>`` (the naive layout)."""
    with RedisServer() as server:
        client: "redis.Redis[str]" = redis.Redis(port=server.port, decode_responses=True)
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
            client: "redis.Redis[str]" = redis.Redis(port=server.port, decode_responses=True)
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="bindings per case")
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


if __name__ == "__main__":
    main()
