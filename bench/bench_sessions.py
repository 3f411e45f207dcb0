"""Session store latency against raw redis-py on the same server, in one run.

    python -m bench.bench_sessions [--n 5000] [--rounds 5]

Starts its own redis-server (mcp_redis.testing.RedisServer) and, when
PostgreSQL answers on 127.0.0.1:5432, a throwaway database. Cases run
interleaved in blocks of 20 calls so machine noise hits all of them alike; the table
gives per-call medians/p99 in µs and the ratio of each median to the raw
redis-py GET's. The headline target: `SessionStore.get` ≤ 1.2× raw GET.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Optional, Tuple

import redis

import mcp_redis
from bench.common import percentile as _p
from bench.common import sample as _sample
from mcp_redis.connections import get_redis
from mcp_redis.testing import PostgresDatabase, RedisServer

Case = Tuple[str, Callable[[], object]]


def _run(cases: List[Case], n: int, rounds: int, block: int = 20) -> Dict[str, List[float]]:
    """`n` × `rounds` timed calls per case, interleaved in blocks of `block` calls
    with a rotating order, so a burst of machine noise hits every case alike."""
    samples: Dict[str, List[float]] = {name: [] for name, _ in cases}
    for _, fn in cases:  # warm-up: connections, script caches
        _sample(fn, min(500, n))
    blocks = max(1, n // block)
    for r in range(rounds):
        for b in range(blocks):
            shift = (r * blocks + b) % len(cases)
            for name, fn in cases[shift:] + cases[:shift]:
                samples[name].extend(_sample(fn, block))
    return samples


def _table(samples: Dict[str, List[float]], baseline: str, notes: Dict[str, str]) -> str:
    base = statistics.median(samples[baseline])
    lines = ["| case | median µs | p99 µs | ratio to raw GET (median) |", "|---|---:|---:|---:|"]
    for name, values in samples.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med * 1e6:.1f} | {_p(values, 0.99) * 1e6:.1f} | {med / base:.2f}× |")
    for name, note in notes.items():
        lines.append(f"| {name} | – | – | {note} |")
    return "\n".join(lines)


def _dogpile_case(url: str) -> Optional[Case]:
    try:
        from dogpile.cache import make_region
    except ImportError:
        return None
    region = make_region().configure("dogpile.cache.redis", arguments={"url": url, "redis_expiration_time": 3600})
    region.set("dogpile-session", "agent-123")
    return ("peer: dogpile.cache redis `region.get` (pickle)", lambda: region.get("dogpile-session"))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    pg: Optional[PostgresDatabase] = PostgresDatabase()
    if pg is not None and not pg.available():
        pg = None
    with RedisServer() as server:
        if pg is not None:
            pg.create()
        try:
            raw = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
            session_id = "c0ffee00-1234-4cde-8f00-aabbccddeeff"
            agent = "agent-7f3a9c2e-0000-4000-8000-000000000001"

            # Redis only.
            mcp_redis.configure(redis_url=server.url)
            store = mcp_redis.SessionStore()
            store.bind(session_id, agent)
            lib_client = get_redis().client
            key = "mcp:session:" + session_id
            raw.set("raw-session", agent, ex=3600)
            cases: List[Case] = [
                ("raw redis-py GET (default client)", lambda: raw.get("raw-session")),
                ("raw redis-py GET (library's pool)", lambda: lib_client.get(key)),
                ("**SessionStore.get** (redis)", lambda: store.get(session_id)),
                ("raw redis-py GETEX PX", lambda: raw.getex("raw-session", px=3_600_000)),
                ("SessionStore.touch (GETEX; refresh throttled)", lambda: store.touch(session_id)),
                ("raw redis-py SET EX", lambda: raw.set("raw-session", agent, ex=3600)),
                ("SessionStore.bind (redis: one Lua call)", lambda: store.bind(session_id, agent)),
            ]
            notes: Dict[str, str] = {}
            peer = _dogpile_case(server.url)
            if peer is not None:
                cases.append(peer)
            else:
                notes["peer: dogpile.cache redis `region.get`"] = "not installed"
            samples = _run(cases, args.n, args.rounds)
            print(f"## Sessions, Redis only (n={args.n} × {args.rounds} rounds, interleaved in blocks of 20)\n")
            print(_table(samples, "raw redis-py GET (default client)", notes))
            raw_get = statistics.median(samples["raw redis-py GET (default client)"])

            # The library's own cost, without the network: the connection's GET (what
            # SessionStore.get sends through, `RedisConnection.get`) stubbed out.
            mcp_redis.configure(redis_url=server.url, key_prefix="mcp:")  # fresh client and tiers
            stub_conn = get_redis()

            def stub_get(name: str) -> str:
                return agent

            stub_conn.get = stub_get  # type: ignore[method-assign]
            overhead = _run([
                ("stubbed GET (no I/O)", lambda: stub_conn.get(key)),
                ("SessionStore.get over the stubbed GET", lambda: store.get(session_id)),
            ], args.n * 4, args.rounds)
            bare = statistics.median(overhead["stubbed GET (no I/O)"])
            ours = statistics.median(overhead["SessionStore.get over the stubbed GET"])
            print("\n## Python cost of SessionStore.get (client stubbed, no I/O)\n")
            print("| case | median µs |\n|---|---:|")
            print(f"| stubbed GET | {bare * 1e6:.2f} |\n| SessionStore.get over it | {ours * 1e6:.2f} |")
            print(f"| **overhead** | **{(ours - bare) * 1e6:.2f}** "
                  f"(= {(ours - bare) / raw_get:.1%} of this run's raw GET median) |")
            mcp_redis.configure(redis_url=server.url, key_prefix="mcp:")

            if pg is None:
                print("\nPostgreSQL not reachable: write-through cases skipped.")
                return
            # Write-through: hits are the same single GET; misses read PostgreSQL.
            mcp_redis.configure(redis_url=server.url, database_url=pg.url)
            wt = mcp_redis.SessionStore()
            wt.bind(session_id, agent)
            counter = [0]

            def miss_then_repair() -> object:
                counter[0] += 1
                sid = f"repair-{counter[0] % 200}"
                lib_client.delete("mcp:session:" + sid)
                return wt.get(sid)

            for i in range(200):
                wt.bind(f"repair-{i}", agent)
            small = max(200, args.n // 10)
            wt_cases: List[Case] = [
                ("raw redis-py GET (default client)", lambda: raw.get("raw-session")),
                ("**SessionStore.get** (write-through, Redis hit)", lambda: wt.get(session_id)),
                ("SessionStore.get, Redis miss → PostgreSQL + read repair", miss_then_repair),
                ("SessionStore.bind (write-through: PostgreSQL upsert + Lua)", lambda: wt.bind(session_id, agent)),
            ]
            samples = _run(wt_cases, small, args.rounds)
            print(f"\n## Sessions, write-through to PostgreSQL (n={small} × {args.rounds} rounds)\n")
            print(_table(samples, "raw redis-py GET (default client)", {}))

            server.stop()  # Redis down: reads and writes go to PostgreSQL
            down_cases: List[Case] = [
                ("SessionStore.get, Redis down (breaker open → PostgreSQL)", lambda: wt.get(session_id)),
                ("SessionStore.bind, Redis down (PostgreSQL, flagged for replay)", lambda: wt.bind(session_id, agent)),
            ]
            down = _run(down_cases, small // 2, 1)
            print("\n## Redis down\n")
            print("| case | median µs | p99 µs |\n|---|---:|---:|")
            for name, values in down.items():
                print(f"| {name} | {statistics.median(values) * 1e6:.1f} | {_p(values, 0.99) * 1e6:.1f} |")
        finally:
            mcp_redis.reset(configuration=True)
            if pg is not None:
                pg.drop()


if __name__ == "__main__":
    main()
