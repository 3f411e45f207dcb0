"""Per-check latency of mcp_redis rate limiting beside its peers, in one process.

    python -m bench.bench_ratelimit [--calls 1000] [--rounds 15] [--quick]

Starts its own redis-server (mcp_redis.testing.RedisServer) and measures,
single-threaded on one key on the admitted path, every case against the same
server: the floor (a raw EVALSHA of ``return 1``), PING, mcp_redis's four
algorithms (full result: allowed, remaining, retry_after, reset_after) and
a two-limit call, `limits` (moving window, sliding-window counter, fixed
window; with and without ``get_window_stats``), and pyrate-limiter's Redis
bucket (sliding log) and GCRA state bucket. Rounds rotate the case order.
In every block, each call of the case is paired with a call of the floor,
the two in turn (floor first, then the case first): a block's two medians
see the same load, however fast it drifts. (Blocks of the floor run just
before each block, as this bench paired them until the eleventh session,
read the floor against itself anywhere from 0.83× to 1.17× per round on a
noisy VM, and 1.11× as the median of one run; interleaved, the floor's own
row reads 1.00×.)
The table shows the median of the per-round medians (and of the p99s), the
median of the per-round ratios to the floor, and where the time goes: this
process's CPU per call and the server's (``INFO cpu``: parsing, the script
and its socket work), best of three blocks each. Peers that are not
installed are marked so.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import mcp_redis
from bench.common import server_cpu_us
from mcp_redis import Algorithm, RateLimiter
from mcp_redis.connections import get_redis
from mcp_redis.testing import RedisServer

Case = Tuple[str, Optional[Callable[[], object]], str]
BIG = 10_000_000  # a limit never reached during the run: the admitted path


def build_cases(server: RedisServer) -> List[Case]:
    import redis

    mcp_redis.configure(redis_url=server.url)
    plain = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    trivial = plain.register_script("return 1")
    trivial()
    cases: List[Case] = [
        ("floor: redis-py EVALSHA 'return 1'", lambda: plain.evalsha(trivial.sha, 0), "1 trip"),
        ("redis-py PING", plain.ping, "1 trip"),
    ]
    # The same trivial script through the pooled-connection path the limiter
    # uses (RedisConnection.run_script): what the round trip costs without
    # redis-py's per-command wrapper, i.e. the part of the gain that is not Lua.
    conn = get_redis()
    lean = conn.client.register_script("return 1")
    cases.append(("EVALSHA 'return 1' via mcp_redis run_script", lambda: conn.run_script(lean, [], []), "1 trip"))
    # Where a trip's client time goes: the same packed EVALSHA on a connection held throughout
    # (no pool at all), and with redis-py's own BlockingConnectionPool's get and release around
    # it (what ReadyCheckedPool's parked connections skip).
    packed = conn._pack_evalsha(conn._encoder, lean.sha, [], [])
    held = conn.client.connection_pool.get_connection()

    def on_held() -> object:
        held.send_packed_command([packed])
        return held.read_response()

    redis_pys = redis.BlockingConnectionPool(host="127.0.0.1", port=server.port, max_connections=4)

    def through_redis_pys_pool() -> object:
        connection = redis_pys.get_connection()
        try:
            connection.send_packed_command([packed])
            return connection.read_response()
        finally:
            redis_pys.release(connection)

    cases.append(("the same EVALSHA on a connection held throughout (no pool)", on_held, "1 trip"))
    cases.append(("the same EVALSHA, redis-py's BlockingConnectionPool get + release around it",
                  through_redis_pys_pool, "1 trip"))
    for algorithm in (Algorithm.SLIDING_WINDOW, Algorithm.SLIDING_WINDOW_COUNTER, Algorithm.FIXED_WINDOW,
                      Algorithm.GCRA):
        limiter = RateLimiter(f"bench-{algorithm.value}", BIG, 60, algorithm=algorithm)
        cases.append((f"mcp_redis {algorithm.value} hit (full result)",
                      lambda limiter=limiter: limiter.hit("k"), "1 trip"))
    two = RateLimiter("bench-two", limits=[(BIG, 3600), (BIG, 60)])
    cases.append(("mcp_redis sliding_window, 2 limits at once", lambda: two.hit("k"), "1 trip"))

    try:
        from limits import RateLimitItemPerMinute
        from limits.storage import storage_from_string
        from limits.strategies import (
            FixedWindowRateLimiter,
            MovingWindowRateLimiter,
            SlidingWindowCounterRateLimiter,
        )
    except ImportError:
        for name in ("moving window", "sliding-window counter", "fixed window"):
            cases.append((f"limits {name}", None, "not installed"))
    else:
        storage = storage_from_string(f"redis://127.0.0.1:{server.port}/0")
        item = RateLimitItemPerMinute(BIG)
        for label, cls in (("moving window", MovingWindowRateLimiter),
                           ("sliding-window counter", SlidingWindowCounterRateLimiter),
                           ("fixed window", FixedWindowRateLimiter)):
            strategy = cls(storage)
            k1, k2 = f"{label}-1", f"{label}-2"
            cases.append((f"limits {label} hit (bool)", lambda s=strategy, k=k1: s.hit(item, k), "1 trip"))
            cases.append((f"limits {label} hit + get_window_stats",
                          lambda s=strategy, k=k2: (s.hit(item, k), s.get_window_stats(item, k)), "2+ trips"))

    try:
        from pyrate_limiter import Duration, Limiter, Rate, RedisBucket, RedisStateStore, StateBucket
    except ImportError:
        cases.append(("pyrate-limiter RedisBucket", None, "not installed"))
    else:
        bucket = RedisBucket.init([Rate(BIG, Duration.MINUTE)], plain, "bench-pyrate")
        pyrate = Limiter(bucket)
        cases.append(("pyrate-limiter RedisBucket (sliding log) via Limiter",
                      lambda: pyrate.try_acquire("k", blocking=False), "1 trip"))
        gcra = Limiter(StateBucket([Rate(BIG, Duration.MINUTE)], store=RedisStateStore(plain, "bench-pyrate-gcra")))
        cases.append(("pyrate-limiter StateBucket GCRA (RedisStateStore)",
                      lambda: gcra.try_acquire("k", blocking=False), "1 trip"))
    return cases


def measure(floor: Callable[[], object], fn: Callable[[], object], calls: int) -> Tuple[float, float, float]:
    """`calls` calls of `fn`, each paired with one of `floor`, which of the two goes first
    alternating: (floor's median, fn's median, fn's p99), in µs."""
    for _ in range(100):
        floor()
        fn()
    ours: List[float] = []
    base: List[float] = []
    clock = time.perf_counter
    gc.disable()
    try:
        for i in range(calls):
            first, then, first_times, then_times = (fn, floor, ours, base) if i & 1 else (floor, fn, base, ours)
            t0 = clock()
            first()
            t1 = clock()
            then()
            t2 = clock()
            first_times.append(t1 - t0)
            then_times.append(t2 - t1)
    finally:
        gc.enable()
    ours.sort()
    return statistics.median(base) * 1e6, statistics.median(ours) * 1e6, ours[int(len(ours) * 0.99)] * 1e6


def cpu_split(server: RedisServer, cases: List[Case], calls: int) -> Dict[str, Tuple[float, float]]:
    """(client CPU, Redis CPU) in µs per call, best of three blocks.

    Client: this process's CPU time (Python, packing, parsing, syscalls).
    Server: Redis's own CPU time from ``INFO cpu`` (everything it does for a call).
    """
    admin = server.client()
    out: Dict[str, Tuple[float, float]] = {}
    for name, fn, _ in cases:
        assert fn is not None
        best_client = best_server = float("inf")
        for _ in range(3):
            start = time.process_time()
            server_us = server_cpu_us(admin, fn, calls)
            best_client = min(best_client, (time.process_time() - start) / calls * 1e6)
            best_server = min(best_server, server_us)
        out[name] = (best_client, best_server)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per block")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a short run: 3 rounds x 300 calls (rough ratios)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 3, 300
    with RedisServer() as server:
        cases = build_cases(server)
        floor_name, floor_fn, _ = cases[0]
        assert floor_fn is not None
        runnable = [c for c in cases if c[1] is not None]
        medians: Dict[str, List[float]] = {name: [] for name, _, _ in runnable}
        p99s: Dict[str, List[float]] = {name: [] for name, _, _ in runnable}
        ratios: Dict[str, List[float]] = {name: [] for name, _, _ in runnable}
        for r in range(args.rounds):
            order = runnable[r % len(runnable):] + runnable[:r % len(runnable)]
            for name, fn, _ in order:
                assert fn is not None
                floor_med, med, p99 = measure(floor_fn, fn, args.calls)
                medians[name].append(med)
                p99s[name].append(p99)
                ratios[name].append(med / floor_med)
        split = cpu_split(server, runnable, args.calls)
        print(f"redis-server {server.client().info('server')['redis_version']} on loopback; "
              f"{args.rounds} rounds x {args.calls} calls per case, each call paired with a floor call; "
              f"redis-py {__import__('redis').__version__}\n")
        print("| case | median µs [min-max of rounds] | p99 µs | × floor (interleaved) | client CPU µs | Redis CPU µs | round trips |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, fn, trips in cases:
            if fn is None:
                print(f"| {name} | — | — | — | — | — | {trips} |")
                continue
            med = statistics.median(medians[name])
            lo, hi = min(medians[name]), max(medians[name])
            print(f"| {name} | {med:.1f} [{lo:.0f}-{hi:.0f}] | {statistics.median(p99s[name]):.1f} | "
                  f"{statistics.median(ratios[name]):.2f} | {split[name][0]:.1f} | {split[name][1]:.1f} | {trips} |")
        mcp_redis.reset(configuration=True)


if __name__ == "__main__":
    main()
