"""Shared round trips over a slow link: calls per second by `trips_in_flight`, in one process.

    python -m bench.bench_trips_latency [--threads 8] [--seconds 4] [--latency 0,0.0005,0.002]
                                        [--lanes 1,2,4] [--rounds 2]

One process, `--threads` threads calling ``RateLimiter.hit`` (the limit never
reached) for `--seconds`, against a redis-server of its own; with a latency
other than 0, through `mcp_redis.testing.faultproxy.FaultProxy` adding that
many seconds to every reply (loopback has no such delay, and the machine has
no netem). Each `--lanes` value is a `trips_in_flight` setting; the baseline
is the same hits with `trips_in_flight` equal to the thread count, where every
call goes at once on a connection of its own (no call ever queues), as before
trips were shared. Rounds interleave the cases; the table gives medians.

The proxy is a Python process of its own, with a cost per request: at small
latencies it, not the link, can bound the baseline (which sends one request
per call), so read the 0 ms column without it (calls go straight to the
server) and the others as a slow link's shape, not as a network's figures.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Dict, List, Tuple

import mcp_redis
from mcp_redis.connections import get_redis
from mcp_redis.testing import RedisServer
from mcp_redis.testing.faultproxy import FaultProxy


def trial(url: str, lanes: int, threads: int, seconds: float) -> Tuple[float, float]:
    """(hits per second, calls per trip) of `threads` threads at `lanes`."""
    mcp_redis.configure(redis_url=url, trips_in_flight=lanes)
    limiter = mcp_redis.RateLimiter("bench-trips", 10**9, 60)
    limiter.hit("warm-up")
    trips = get_redis().trips
    before = trips.stats()
    counts = [0] * threads
    start = threading.Event()
    stop_at: List[float] = []

    def work(t: int) -> None:
        start.wait()
        key = f"k{t}"
        n = 0
        while time.monotonic() < stop_at[0]:
            limiter.hit(key)
            n += 1
        counts[t] = n

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    began = time.monotonic()
    stop_at.append(began + seconds)
    start.set()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - began
    after = trips.stats()
    calls = after["calls"] - before["calls"]
    return sum(counts) / elapsed, calls / max(1, after["trips"] - before["trips"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--latency", default="0,0.0005,0.002", help="seconds added to every reply")
    parser.add_argument("--lanes", default="1,2,4", help="trips_in_flight values")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    latencies = [float(x) for x in args.latency.split(",")]
    lanes = [int(x) for x in args.lanes.split(",")] + [args.threads]
    results: Dict[Tuple[float, int], List[Tuple[float, float]]] = {}
    with RedisServer() as server:
        for latency in latencies:
            with FaultProxy("127.0.0.1", server.port) as proxy:
                if latency:
                    proxy.add_latency(latency)
                url = proxy.url() if latency else server.url
                for _ in range(args.rounds):
                    for n in lanes:
                        results.setdefault((latency, n), []).append(trial(url, n, args.threads, args.seconds))
    mcp_redis.reset()
    print(f"{args.threads} threads in one process, {args.seconds:g} s trials, medians of {args.rounds} rounds; "
          f"RateLimiter.hit (fixed limit never reached); baseline: trips_in_flight = {args.threads} "
          "(every call at once on its own connection)\n")
    print("| reply latency | trips_in_flight | hits/s | calls per trip | × baseline |")
    print("|---|---:|---:|---:|---:|")
    for latency in latencies:
        base = statistics.median(r[0] for r in results[(latency, args.threads)])
        for n in lanes:
            rate = statistics.median(r[0] for r in results[(latency, n)])
            per_trip = statistics.median(r[1] for r in results[(latency, n)])
            label = f"{n} (baseline)" if n == args.threads else str(n)
            print(f"| {latency * 1000:g} ms | {label} | {rate:,.0f} | {per_trip:.2f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
