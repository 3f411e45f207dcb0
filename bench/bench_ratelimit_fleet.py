"""Rate limits under concurrency: mcp_redis vs `limits`, same algorithm, one redis-server.

    python -m bench.bench_ratelimit_fleet [--procs 4] [--threads 8] [--seconds 3] [--rounds 3]
                                          [--names 1000] [--limit 1000] [--window 60] [--only fixed_window,...]
    python -m bench.bench_ratelimit_fleet --memory
    python -m bench.bench_ratelimit_fleet --callgrind [--n 3000]

P processes x T threads call ``hit(name)`` over `--names` names for
`--seconds`; each pair (ours, the peer) runs interleaved in rounds on one
loopback server. Prints ops/s and the server's CPU µs per op (``INFO cpu``
delta / ops) per case, the medians over rounds, and the ratios. A small
driver for issue 18's rate-limit part (the full bench is bench_throughput).

``--memory``: bytes per key (``MEMORY USAGE ... SAMPLES 0``, every key the
call left) of one agent's key filled to the limit (20/hour, 1,000/minute),
ours and the peers' with the same ids (limiter "api", key "agent-<16 hex>").

``--callgrind``: the redis-server's own instructions per admitted hit (one
process, one thread, `--n` hits over 1,000 names, the limit never reached),
counted by valgrind's callgrind around the measured calls only: unlike
``INFO cpu`` on a busy 2-core VM, the same from run to run to about 1 %.
Kernel socket work (the same per round trip for everyone) is left out.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

PAIRS = {
    "sliding_window": "moving_window",
    "fixed_window": "fixed_window",
    "sliding_window_counter": "sliding_window_counter",
}


def _make(case: str, port: int, limit: int, window: int, tag: str) -> Callable[[str], object]:
    side, algorithm = case.split(":", 1)
    if side == "ours":
        import mcp_redis
        from mcp_redis import RateLimiter

        mcp_redis.configure(redis_url=f"redis://127.0.0.1:{port}/0")
        limiter = RateLimiter(f"fleet-{algorithm}-{tag}", limit, window, algorithm=algorithm)
        return limiter.hit
    from limits import RateLimitItemPerSecond
    from limits.storage import storage_from_string
    from limits.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )

    cls = {"moving_window": MovingWindowRateLimiter, "fixed_window": FixedWindowRateLimiter,
           "sliding_window_counter": SlidingWindowCounterRateLimiter}[algorithm]
    strategy = cls(storage_from_string(f"redis://127.0.0.1:{port}/0"))
    item = RateLimitItemPerSecond(limit, window)
    return lambda name: strategy.hit(item, tag, name)


def _worker(case: str, port: int, limit: int, window: int, tag: str, names: int, threads: int, seconds: float,
            start: float, out: mp.Queue[int]) -> None:
    fn = _make(case, port, limit, window, tag)
    fn("warm")
    counts = [0] * threads

    def loop(i: int) -> None:
        rnd = random.Random(i)
        keys = [f"n{k}" for k in range(names)]
        while time.time() < start:
            time.sleep(0.001)
        end = start + seconds
        n = 0
        while True:
            for _ in range(50):
                fn(keys[rnd.randrange(names)])
            n += 50
            if time.time() >= end:
                break
        counts[i] = n

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(sum(counts))


def run_case(case: str, port: int, args: argparse.Namespace, rnd: int) -> Tuple[float, float]:
    import redis

    admin = redis.Redis(port=port)
    admin.flushall()
    admin.config_resetstat()

    def cpu() -> float:
        info = admin.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    q: mp.Queue[int] = mp.Queue()
    start = time.time() + 1.5
    ps = [mp.Process(target=_worker, args=(case, port, args.limit, args.window, f"r{rnd}", args.names,
                                           args.threads, args.seconds, start, q)) for _ in range(args.procs)]
    for p in ps:
        p.start()
    while time.time() < start:
        time.sleep(0.001)
    c0 = cpu()
    total = sum(q.get() for _ in ps)
    c1 = cpu()
    if args.commandstats:
        stats = admin.info("commandstats")
        print(case, {k[8:]: (v["calls"], v["usec_per_call"]) for k, v in stats.items() if v["calls"] > 100})
    for p in ps:
        p.join()
    admin.close()
    # CPU over the window the workers ran in (their last batch may spill a little past it).
    return total / args.seconds, (c1 - c0) * 1e6 / total


def memory(port: int) -> None:
    import redis

    import mcp_redis
    from mcp_redis import RateLimiter

    admin = redis.Redis(port=port)
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{port}/0")
    key = "agent-0123456789abcdef"

    def used() -> Tuple[int, int]:
        keys = list(admin.scan_iter())
        total = sum(admin.memory_usage(k, samples=0) or 0 for k in keys)
        admin.flushall()
        return total, len(keys)

    def fill(hit: Callable[[], object], limit: int) -> int:
        n = 0
        while n < limit + 10 and hit():
            n += 1
        return n

    print("| limit | algorithm | mcp_redis B | peer | peer B |")
    print("|---|---|---:|---|---:|")
    from limits import RateLimitItemPerSecond
    from limits.storage import storage_from_string
    from limits.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )

    storage = storage_from_string(f"redis://127.0.0.1:{port}/0")
    admin.flushall()
    for limit, window in ((20, 3600), (1000, 60)):
        item = RateLimitItemPerSecond(limit, window)
        for algorithm, peer in (("sliding_window", MovingWindowRateLimiter), ("fixed_window", FixedWindowRateLimiter),
                                ("sliding_window_counter", SlidingWindowCounterRateLimiter), ("gcra", None)):
            ours = RateLimiter("api", limit, window, algorithm=algorithm)
            n = fill(lambda: ours.hit(key).allowed, limit)
            mine, _ = used()
            rows = []
            if peer is not None:
                strategy = peer(storage)
                m = fill(lambda: strategy.hit(item, "api", key), limit)
                rows.append((f"limits {peer.__name__} ({m} hits)", used()[0]))
            try:
                from pyrate_limiter import Duration, Limiter, Rate, RedisBucket, RedisStateStore, StateBucket
            except ImportError:
                pass
            else:
                rate = Rate(limit, Duration.SECOND * window)
                if algorithm == "sliding_window":
                    bucket: Any = RedisBucket.init([rate], admin, f"api:{key}")
                elif algorithm == "gcra":
                    bucket = StateBucket([rate], store=RedisStateStore(admin, f"api:{key}"))
                else:
                    bucket = None
                if bucket is not None:
                    pyrate = Limiter(bucket)
                    m = fill(lambda: pyrate.try_acquire(key, blocking=False), limit)
                    rows.append((f"pyrate-limiter {type(bucket).__name__} ({m} hits)", used()[0]))
            for label, size in rows or [("—", 0)]:
                print(f"| {limit}/{window} s | {algorithm} ({n} hits) | {mine} | {label} | {size or '—'} |")


def callgrind(n: int) -> None:
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    import redis

    import mcp_redis
    from mcp_redis import RateLimiter
    from mcp_redis.testing import free_port

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind (callgrind) is not installed")
    out = tempfile.mkdtemp(prefix="mcp_redis_rl_cg_")
    port = free_port()
    server = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                               f"--callgrind-out-file={out}/cg.%p", "redis-server", "--port", str(port),
                               "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def control(*flags: str) -> None:
        subprocess.run(["callgrind_control", *flags, str(server.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        admin = redis.Redis(port=port)
        for _ in range(600):
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        mcp_redis.configure(redis_url=f"redis://127.0.0.1:{port}/0")
        big, window = 10_000_000, 60
        cases: Dict[str, Callable[[str], object]] = {}
        for algorithm in ("sliding_window", "fixed_window", "sliding_window_counter", "gcra"):
            cases[f"mcp_redis {algorithm} (full result)"] = RateLimiter(f"cg-{algorithm}", big, window,
                                                                         algorithm=algorithm).hit
            if algorithm in PAIRS:
                cases[f"  limits {PAIRS[algorithm]}"] = _make(f"limits:{PAIRS[algorithm]}", port, big, window,
                                                                 f"cg-{algorithm}")
        try:
            from pyrate_limiter import Duration, Limiter, Rate, RedisStateStore, StateBucket
        except ImportError:
            pass
        else:
            def pyrate(name: str) -> object:
                limiter = buckets.get(name)
                if limiter is None:
                    limiter = buckets[name] = Limiter(StateBucket([Rate(big, Duration.MINUTE)],
                                                                  store=RedisStateStore(admin, f"cg:{name}")))
                return limiter.try_acquire(name, blocking=False)

            buckets: Dict[str, Any] = {}
            cases["  pyrate-limiter GCRA state bucket"] = pyrate
        names = [f"n{i}" for i in range(1000)]
        print(f"redis-server instructions per admitted hit (callgrind, {n} hits over 1,000 names)")
        for label, fn in cases.items():
            for name in names:
                fn(name)  # warm: scripts loaded, every key exists
            for old in glob.glob(os.path.join(out, "cg.*")):
                os.remove(old)
            control("-z")
            control("-i", "on")
            for i in range(n):
                fn(names[i % 1000])
            control("-i", "off")
            control("-d")
            time.sleep(0.5)
            total = 0
            for path in glob.glob(os.path.join(out, "cg.*")):
                with open(path) as fh:
                    total = max([total] + [int(line.split()[1]) for line in fh if line.startswith("totals:")])
            print(f"  {label:44s} {total / n:9,.0f}")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(out, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--only", default=",".join(PAIRS))
    parser.add_argument("--commandstats", action="store_true", help="print each case's INFO commandstats")
    parser.add_argument("--memory", action="store_true", help="bytes per key, filled to the limit, and exit")
    parser.add_argument("--callgrind", action="store_true", help="Redis instructions per hit (valgrind), and exit")
    parser.add_argument("--n", type=int, default=3000, help="hits per case with --callgrind")
    args = parser.parse_args(argv)
    from mcp_redis.testing import RedisServer

    if args.callgrind:
        callgrind(args.n)
        return

    if args.memory:
        with RedisServer() as server:
            memory(server.port)
        return

    algorithms = [a for a in args.only.split(",") if a]
    results: Dict[str, List[Tuple[float, float]]] = {}
    with RedisServer() as server:
        for r in range(args.rounds):
            for a in algorithms:
                pair = [f"ours:{a}", f"limits:{PAIRS[a]}"]
                if r % 2:
                    pair.reverse()
                for case in pair:
                    results.setdefault(case, []).append(run_case(case, server.port, args, r))
    print(f"{args.procs} procs x {args.threads} threads, {args.seconds:g} s x {args.rounds} rounds, "
          f"{args.names} names, limit {args.limit}/{args.window}s (medians)")
    print("| algorithm | ours ops/s | limits ops/s | ratio | ours Redis CPU µs/op | limits µs/op | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a in algorithms:
        o, p = results[f"ours:{a}"], results[f"limits:{PAIRS[a]}"]
        oo, po = statistics.median(x[0] for x in o), statistics.median(x[0] for x in p)
        oc, pc = statistics.median(x[1] for x in o), statistics.median(x[1] for x in p)
        print(f"| {a} vs {PAIRS[a]} | {oo:,.0f} | {po:,.0f} | {oo / po:.2f} | {oc:.1f} | {pc:.1f} | {oc / pc:.2f} |")


if __name__ == "__main__":
    main()
