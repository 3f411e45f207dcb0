"""Lock latency and fairness beside redis-py's Lock and python-redis-lock, in one run.

    python -m bench.bench_locks [--n 2000] [--rounds 5] [--handoffs 40]

Starts its own redis-server (mcp_redis.testing.RedisServer); every library
talks to that same server from this one process.

1. Uncontended acquire+release (ours with the token read, drawn with the
   grant by ``fencing=True``, and without reading it): cases run
   interleaved in blocks so machine noise hits all alike; medians/p99 in µs
   and the ratio of each median to redis-py's ``Lock`` (target ≤ 1.0×).
2. Handoff: one holder, one waiter blocked in ``acquire()``; the gap from
   ``release()`` returning to the waiter holding the lock (median/p99 ms).
3. Contention: 8 threads take one lock 100 times each with no pause; wall
   time and the longest run of one thread taking it back to back.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis

import mcp_redis
from bench.common import percentile as _p
from bench.common import sample as _sample
from bench.common import server_cpu_us
from mcp_redis.connections import get_redis
from mcp_redis.testing import RedisServer

try:
    import redis_lock  # python-redis-lock
except ImportError:  # pragma: no cover - optional peer
    redis_lock = None

Case = Tuple[str, Callable[[], object]]
server_side: Dict[str, float] = {}  # case -> µs of Redis CPU per iteration


# -- 1. uncontended ------------------------------------------------------------------
def uncontended(server: RedisServer, n: int, rounds: int) -> Dict[str, List[float]]:
    client = get_redis().client  # the library's own client: same pool type for everyone
    raw_bytes = redis.Redis(host="127.0.0.1", port=server.port)
    ours = mcp_redis.lock("bench-ours", timeout=30, fencing=True)
    ours_plain = mcp_redis.lock("bench-ours-plain", timeout=30)
    theirs = client.lock("bench-redis-py", timeout=30)
    cad = client.register_script(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    )

    def ours_once() -> None:
        ours.acquire()
        assert ours.fencing_token
        ours.release()

    def ours_plain_once() -> None:
        ours_plain.acquire()
        ours_plain.release()

    def agent_once() -> None:
        with mcp_redis.agent_lock("bench-agent"):
            pass

    def theirs_once() -> None:
        theirs.acquire()
        theirs.release()

    def theirs_new_once() -> None:
        with client.lock("bench-redis-py-new", timeout=30):
            pass

    def minimal_once() -> None:
        client.set("bench-minimal", "t", nx=True, px=30000)
        cad(keys=["bench-minimal"], args=["t"])

    cases: List[Case] = [
        ("PING (one round trip)", client.ping),
        ("SET NX PX + compare-and-delete (minimal)", minimal_once),
        ("redis-py Lock (object reused)", theirs_once),
        ("mcp_redis.lock (object reused, token not read)", ours_plain_once),
        ("mcp_redis.lock(fencing=True) + token read (object reused)", ours_once),
        ("redis-py Lock (new object, with)", theirs_new_once),
        ("mcp_redis.agent_lock (new object, with, renewing)", agent_once),
    ]
    if redis_lock is not None:
        prl = redis_lock.Lock(raw_bytes, "bench-prl", expire=30)

        def prl_once() -> None:
            prl.acquire()
            prl.release()

        cases.append(("python-redis-lock (object reused)", prl_once))
    samples: Dict[str, List[float]] = {name: [] for name, _ in cases}
    for _, fn in cases:
        _sample(fn, min(300, n))
    server_side.clear()
    for name, fn in cases:  # Redis's own CPU per iteration (INFO cpu: its commands, Lua and socket work)
        server_side[name] = server_cpu_us(client, fn, 2000)
    block = 100
    for r in range(rounds):
        for start in range(0, n, block):
            order = cases if (r + start // block) % 2 == 0 else list(reversed(cases))
            for name, fn in order:
                samples[name].extend(_sample(fn, min(block, n - start)))
    return samples


# -- 2. handoff --------------------------------------------------------------------------
def handoff(make: Callable[[], Tuple[Callable[[], Any], Callable[[], Any]]], trials: int,
            blocked: Callable[[], bool]) -> List[float]:
    """`make()` -> (acquire, release) of a fresh handle on one shared name."""
    gaps: List[float] = []
    for _ in range(trials):
        h_acquire, h_release = make()
        w_acquire, w_release = make()
        h_acquire()
        entered: List[float] = []

        def wait() -> None:
            w_acquire()
            entered.append(time.perf_counter())
            w_release()

        t = threading.Thread(target=wait)
        t.start()
        deadline = time.monotonic() + 2
        while not blocked() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.02)  # let the waiter settle into its wait
        h_release()
        released = time.perf_counter()
        t.join(10)
        gaps.append(entered[0] - released)
    return gaps


def handoffs(server: RedisServer, trials: int) -> Dict[str, List[float]]:
    client = get_redis().client
    raw_bytes = redis.Redis(host="127.0.0.1", port=server.port)
    out: Dict[str, List[float]] = {}

    def ours() -> Tuple[Callable[[], Any], Callable[[], Any]]:
        lk = mcp_redis.lock("hand-ours", timeout=30, blocking_timeout=10)
        return lk.acquire, lk.release

    queue_key = mcp_redis.lock("hand-ours").key + "#queue"
    out["mcp_redis.lock"] = handoff(ours, trials, lambda: client.llen(queue_key) > 0)

    def rp() -> Tuple[Callable[[], Any], Callable[[], Any]]:
        lk = client.lock("hand-redis-py", timeout=30, blocking_timeout=10)
        return lk.acquire, lk.release

    out["redis-py Lock"] = handoff(rp, trials, lambda: True)
    if redis_lock is not None:
        def prl() -> Tuple[Callable[[], Any], Callable[[], Any]]:
            lk = redis_lock.Lock(raw_bytes, "hand-prl", expire=30)
            return (lambda: lk.acquire(timeout=10)), lk.release

        out["python-redis-lock"] = handoff(prl, trials, lambda: True)
    return out


# -- 3. contention -------------------------------------------------------------------------
def contention(make: Callable[[], Tuple[Callable[[], Any], Callable[[], Any]]], threads: int = 8,
               rounds: int = 100) -> Tuple[float, int, int]:
    order: List[int] = []
    barrier = threading.Barrier(threads)

    def run(n: int) -> None:
        acquire, release = make()
        barrier.wait()
        for _ in range(rounds):
            acquire()
            order.append(n)
            release()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - start
    longest = streak = 1
    switches = 0
    for a, b in zip(order, order[1:]):
        streak = streak + 1 if a == b else 1
        switches += a != b
        longest = max(longest, streak)
    return wall, longest, switches


def contentions(server: RedisServer) -> Dict[str, Tuple[float, int, int]]:
    client = get_redis().client
    raw_bytes = redis.Redis(host="127.0.0.1", port=server.port)
    out: Dict[str, Tuple[float, int, int]] = {}

    def ours() -> Tuple[Callable[[], Any], Callable[[], Any]]:
        lk = mcp_redis.lock("cont-ours", timeout=30, blocking_timeout=60)
        return lk.acquire, lk.release

    out["mcp_redis.lock"] = contention(ours)

    def rp() -> Tuple[Callable[[], Any], Callable[[], Any]]:
        lk = client.lock("cont-redis-py", timeout=30, blocking_timeout=60)
        return lk.acquire, lk.release

    out["redis-py Lock"] = contention(rp)
    if redis_lock is not None:
        def prl() -> Tuple[Callable[[], Any], Callable[[], Any]]:
            lk = redis_lock.Lock(raw_bytes, "cont-prl", expire=30)
            return (lambda: lk.acquire(timeout=30)), lk.release

        out["python-redis-lock"] = contention(prl)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="iterations per case per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handoffs", type=int, default=40)
    args = parser.parse_args(argv)
    with RedisServer() as server:
        mcp_redis.configure(redis_url=server.url)
        samples = uncontended(server, args.n, args.rounds)
        base = statistics.median(samples["redis-py Lock (object reused)"])
        print(f"## Uncontended acquire+release ({args.rounds} rounds × {args.n}, interleaved blocks of 100)\n")
        print("| case | median µs | p99 µs | ratio to redis-py Lock (median) | Redis CPU µs |")
        print("|---|---:|---:|---:|---:|")
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"| {name} | {med * 1e6:.1f} | {_p(values, 0.99) * 1e6:.1f} | {med / base:.2f}× | "
                  f"{server_side.get(name, 0.0):.1f} |")
        if redis_lock is None:
            print("| python-redis-lock | not installed | | |")

        gaps = handoffs(server, args.handoffs)
        base_gap = statistics.median(gaps["redis-py Lock"])
        print(f"\n## Handoff: release() returning → blocked waiter holds the lock ({args.handoffs} trials)\n")
        print("| library | median ms | p99 ms | max ms | ratio to redis-py (median) |")
        print("|---|---:|---:|---:|---:|")
        for name, values in gaps.items():
            med = statistics.median(values)
            print(f"| {name} | {med * 1e3:.3f} | {_p(values, 0.99) * 1e3:.3f} | {max(values) * 1e3:.3f} | "
                  f"{med / base_gap:.3f}× |")
        if redis_lock is None:
            print("| python-redis-lock | not installed | | | |")

        stats = contentions(server)
        print("\n## Contention: 8 threads × 100 acquisitions, no pause between sections\n")
        print("| library | wall s | longest same-thread streak | cross-thread handoffs |")
        print("|---|---:|---:|---:|")
        for name, (wall, longest, switches) in stats.items():
            print(f"| {name} | {wall:.3f} | {longest} | {switches} |")
        if redis_lock is None:
            print("| python-redis-lock | not installed | | |")


if __name__ == "__main__":
    main()
