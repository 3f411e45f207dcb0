"""Events benchmark: EventBus against raw redis-py pub/sub, and EventStream.

    python -m bench.bench_events [--n 20000] [--latency-n 2000]

Starts its own throwaway redis-server on loopback. Measures, in one run:

* latency: publish -> handler called, one event in flight at a time (p50/p99);
* throughput: N events published back to back, until the last is handled;
* the same for raw redis-py (``client.publish`` + a ``PubSub.get_message``
  loop on a thread) as the baseline;
* streams: ``add_many`` + ``consume`` throughput, and add -> handler latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any, Callable, Dict, List

import redis

import mcp_redis
from bench.common import percentile as pct
from mcp_redis.events import EventBus, EventStream
from mcp_redis.testing import RedisServer


def summary(name: str, lat: List[float], n: int, seconds: float) -> Dict[str, Any]:
    return {
        "case": name,
        "p50_us": round(pct(lat, 0.50) * 1e6, 1),
        "p99_us": round(pct(lat, 0.99) * 1e6, 1),
        "mean_us": round(statistics.fmean(lat) * 1e6, 1),
        "throughput_per_s": round(n / seconds),
    }


class Waiter:
    """Counts handled events; lets the publisher wait for the k-th."""

    def __init__(self) -> None:
        self.count = 0
        self.cond = threading.Condition()
        self.stamps: List[float] = []

    def hit(self) -> None:
        now = time.perf_counter()
        with self.cond:
            self.count += 1
            self.stamps.append(now)
            self.cond.notify_all()

    def wait(self, k: int, timeout: float = 30.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.count >= k, timeout):
                raise TimeoutError(f"only {self.count} of {k} events handled")


def run_case(publish: Callable[[int], None], waiter: Waiter, latency_n: int, n: int) -> tuple[List[float], float]:
    lat: List[float] = []
    for i in range(latency_n):
        start = time.perf_counter()
        publish(i)
        waiter.wait(i + 1)
        lat.append(waiter.stamps[-1] - start)
    base = waiter.count
    start = time.perf_counter()
    for i in range(n):
        publish(i)
    waiter.wait(base + n, timeout=120)
    return lat, time.perf_counter() - start


def bench_bus(url: str, latency_n: int, n: int) -> Dict[str, Any]:
    mcp_redis.configure(redis_url=url)
    bus = EventBus()
    waiter = Waiter()
    sub = bus.subscribe("bench", lambda event: waiter.hit())
    lat, seconds = run_case(lambda i: bus.publish("bench", {"i": i, "agent_id": "a1"}), waiter, latency_n, n)
    sub.close()
    return summary("EventBus publish -> handler", lat, n, seconds)


def bench_raw(url: str, latency_n: int, n: int) -> Dict[str, Any]:
    client = redis.Redis.from_url(url, decode_responses=True, protocol=2)
    waiter = Waiter()
    ps = client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("raw:bench")
    while ps.get_message(timeout=1.0) is None and not ps.subscribed:
        pass
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            msg = ps.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is not None and msg["type"] == "message":
                json.loads(msg["data"])  # same decoding work as the bus
                waiter.hit()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()

    def publish(i: int) -> None:
        client.publish("raw:bench", json.dumps({"i": i, "agent_id": "a1"}))

    lat, seconds = run_case(publish, waiter, latency_n, n)
    stop.set()
    thread.join()
    ps.close()
    client.close()
    return summary("raw redis-py publish -> get_message", lat, n, seconds)


def bench_stream(url: str, latency_n: int, n: int) -> Dict[str, Any]:
    mcp_redis.configure(redis_url=url)
    stream = EventStream("bench", "g", maxlen=max(n * 2, 1000))
    stream.ensure_group()
    waiter = Waiter()
    consumer = stream.run_in_thread(lambda event: waiter.hit(), count=500, block_ms=100)
    lat: List[float] = []
    for i in range(latency_n):
        start = time.perf_counter()
        stream.add({"i": i})
        waiter.wait(i + 1)
        lat.append(waiter.stamps[-1] - start)
    base = waiter.count
    start = time.perf_counter()
    for i in range(0, n, 500):
        stream.add_many({"i": j} for j in range(i, min(n, i + 500)))
    waiter.wait(base + n, timeout=120)
    seconds = time.perf_counter() - start
    consumer.close()
    return summary("EventStream add -> handler (+ack)", lat, n, seconds)


def median_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(rows[0])
    for field in ("p50_us", "p99_us", "mean_us", "throughput_per_s"):
        out[field] = statistics.median(r[field] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="events per throughput case")
    parser.add_argument("--latency-n", type=int, default=2_000, help="events per latency case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (cases interleaved); medians reported")
    args = parser.parse_args()
    results: Dict[str, List[Dict[str, Any]]] = {}
    with RedisServer() as server:
        for _ in range(args.rounds):
            for case in (bench_raw, bench_bus, bench_stream):
                row = case(server.url, args.latency_n, args.n)
                results.setdefault(row["case"], []).append(row)
                server.client().flushall()
    mcp_redis.reset(configuration=True)
    rows = [median_row(r) for r in results.values()]
    width = max(len(r["case"]) for r in rows)
    print(f"medians of {args.rounds} interleaved rounds; n={args.n}, latency-n={args.latency_n}")
    print(f"{'case':<{width}}  {'p50 µs':>8}  {'p99 µs':>8}  {'mean µs':>8}  {'events/s':>9}")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['p50_us']:>8}  {r['p99_us']:>8}  {r['mean_us']:>8}  {r['throughput_per_s']:>9}")
    raw, bus = rows[0], rows[1]
    print(f"\nEventBus / raw: p50 latency x{bus['p50_us'] / raw['p50_us']:.2f}, "
          f"throughput x{bus['throughput_per_s'] / raw['throughput_per_s']:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
