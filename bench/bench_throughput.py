"""Fleet-scale throughput: P processes x T threads against one redis-server, mcp_redis beside its peers.

    python -m bench.bench_throughput [--processes 4] [--threads 8] [--seconds 3] [--rounds 3]
                                     [--names 1000] [--only ratelimit,locks,sessions,cache] [--json out.json]
    python -m bench.bench_throughput --quick      # 2 x 4, 1 s, 1 round: rough ratios in ~40 s

Starts its own redis-server (mcp_redis.testing.RedisServer) and `--processes`
worker processes (spawned once, each with its own clients and `--threads`
threads). Every trial runs one operation on all threads at once for
`--seconds`; a round runs every selected operation once, the operations of one
kind next to each other in a rotating order, and the table gives the medians
of `--rounds` rounds:

* ops/s: completed calls of all threads / trial seconds;
* p50 / p99 latency of one call (all threads' samples of the trial);
* Redis CPU µs per op: the server's ``used_cpu_user + used_cpu_sys``
  (``INFO cpu``) delta over the trial / the calls completed in it: what one
  call costs the shared, single-threaded resource of a fleet.

Keys are spread over `--names` names (default 1,000), partitioned between
the threads so that no two threads use the same name at the same time: the
uncontended, admitted path of every library (contention is bench_locks's
subject). Rate limits use a limit that is never reached; mcp_redis returns its
full result (allowed, remaining, retry_after, reset_after) while the peers
return what their API gives.

Operations and their same-kind peers (a peer that is not installed is marked
so): every rate-limit algorithm (sliding_window: `limits` moving window,
pyrate-limiter's Redis bucket; fixed_window: `limits` fixed window,
throttled-py fixed window; sliding_window_counter: `limits` sliding window
counter, throttled-py "sliding_window" (a two-window counter); gcra:
throttled-py gcra, pyrate-limiter's GCRA state bucket), `with agent_lock(a)`
and `with mcp_redis.lock(a)` vs redis-py ``Lock`` and python-redis-lock,
``SessionStore.get`` / ``bind`` vs raw GET / SETEX, ``cached_metadata`` L2 hit
vs dogpile.cache's Redis region and raw GET + json.loads. Ratios are against
the fastest peer of the same kind in the same run.

hiredis: the header says which parser redis-py uses. Run the bench once with
and once without it (``pip install hiredis`` / ``pip uninstall -y hiredis``, or
two virtualenvs, one with the ``hiredis`` extra), with ``--parser hiredis`` /
``--parser python`` so that each run refuses the wrong environment: see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from array import array
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.common import Missing, limits_strategy

BIG = 50_000_000  # a limit never reached: the admitted path (GCRA: at most one unit a microsecond)
DOC: Dict[str, Any] = {  # ~300 B of JSON, the size of an agent's metadata entry
    "agent_id": "3f0c9f7e-8a53-4c1e-9d59-1b7f0a2c6e41",
    "status": "active",
    "tags": ["planner", "retrieval", "eu-west"],
    "metrics": {f"m{i}": i * 1.5 for i in range(12)},
    "notes": "x" * 60,
}

# (case id, kind, label, ours). A kind's peers are its cases with ours=False.
CASES: List[Tuple[str, str, str, bool]] = [
    ("rl_sw", "sliding_window", "mcp_redis sliding_window hit (full result)", True),
    ("limits_moving", "sliding_window", "limits moving window hit (bool)", False),
    ("pyrate_log", "sliding_window", "pyrate-limiter RedisBucket (sliding log), bucket per key", False),
    ("rl_fw", "fixed_window", "mcp_redis fixed_window hit (full result)", True),
    ("limits_fixed", "fixed_window", "limits fixed window hit (bool)", False),
    ("throttled_fw", "fixed_window", "throttled-py fixed_window limit (result)", False),
    ("rl_swc", "sliding_window_counter", "mcp_redis sliding_window_counter hit (full result)", True),
    ("limits_swc", "sliding_window_counter", "limits sliding window counter hit (bool)", False),
    ("throttled_sw", "sliding_window_counter", "throttled-py sliding_window (2-window counter) limit", False),
    ("rl_gcra", "gcra", "mcp_redis gcra hit (full result)", True),
    ("throttled_gcra", "gcra", "throttled-py gcra limit (result)", False),
    ("pyrate_gcra", "gcra", "pyrate-limiter StateBucket GCRA (RedisStateStore), bucket per key", False),
    ("agent_lock", "lock", "with mcp_redis.agent_lock(a) (renewal; token drawn on read)", True),
    ("agent_lock_fenced", "lock", "with mcp_redis.agent_lock(a, fencing=True), token read", True),
    ("mcp_lock", "lock", "with mcp_redis.lock(a, fencing=True), token read", True),
    ("redispy_lock", "lock", "with redis.lock(a) (redis-py Lock)", False),
    ("prl_lock", "lock", "python-redis-lock acquire+release", False),
    ("session_get", "session_get", "SessionStore.get", True),
    ("raw_get", "session_get", "raw redis-py GET", False),
    ("session_bind", "session_bind", "SessionStore.bind", True),
    ("raw_setex", "session_bind", "raw redis-py SETEX", False),
    ("cache_l2", "cache", "cached_metadata L2 hit (L1 of 1 entry)", True),
    ("dogpile", "cache", "dogpile.cache redis get_or_create hit (JSON)", False),
    ("raw_get_json", "cache", "raw redis-py GET + json.loads", False),
]
KINDS = list(dict.fromkeys(kind for _, kind, _, _ in CASES))
FAMILIES = {
    "ratelimit": ["sliding_window", "fixed_window", "sliding_window_counter", "gcra"],
    "locks": ["lock"],
    "sessions": ["session_get", "session_bind"],
    "cache": ["cache"],
}
# Done-when targets of issue 18: ours -> (min ops/s ratio, max Redis CPU ratio, against: a case id,
# or None for the fastest same-kind peer).
TARGETS: Dict[str, Tuple[float, float, Optional[str]]] = {
    "rl_sw": (1.05, 1.10, None), "rl_fw": (1.05, 1.10, None), "rl_swc": (1.05, 1.10, None),
    "rl_gcra": (1.05, 1.10, None), "agent_lock": (1.05, 1.15, "redispy_lock"),
    "agent_lock_fenced": (1.05, 1.15, "redispy_lock")}


# -- operations, built inside each worker process ----------------------------------------
def session_key(name: str) -> str:
    return "sess-" + name


def build(case: str, url: str, port: int) -> Callable[[str], object]:
    """The operation of `case` for this process: a callable of one name (thread-safe)."""
    import redis

    import mcp_redis

    if case.startswith("rl_"):
        algorithm = {"rl_sw": "sliding_window", "rl_fw": "fixed_window", "rl_swc": "sliding_window_counter",
                     "rl_gcra": "gcra"}[case]
        limiter = mcp_redis.RateLimiter(f"tp-{algorithm}", BIG, 60, algorithm=mcp_redis.Algorithm(algorithm))
        return limiter.hit
    if case.startswith("limits_"):
        strategy = limits_strategy(case[len("limits_"):], f"redis://127.0.0.1:{port}/0")
        from limits import RateLimitItemPerMinute

        item = RateLimitItemPerMinute(BIG)
        return lambda name: strategy.hit(item, case, name)  # the strategies share a key layout: apart by case
    if case.startswith("throttled_"):
        try:
            import throttled
        except ImportError as exc:
            raise Missing("throttled-py") from exc
        using = {"throttled_fw": "fixed_window", "throttled_sw": "sliding_window", "throttled_gcra": "gcra"}[case]
        store = throttled.RedisStore(server=f"redis://127.0.0.1:{port}/0")
        limiter = throttled.Throttled(using=using, quota=throttled.per_min(BIG), store=store)
        return lambda name: limiter.limit(case + ":" + name)
    if case.startswith("pyrate_"):
        try:
            import pyrate_limiter as pl
        except ImportError as exc:
            raise Missing("pyrate-limiter") from exc
        plain = redis.Redis(host="127.0.0.1", port=port)
        rates = [pl.Rate(BIG, pl.Duration.MINUTE)]
        limiters: Dict[str, Any] = {}
        guard = threading.Lock()

        def bucket_for(name: str) -> Any:  # pyrate's Redis bucket is one key: one bucket (and Limiter) per key
            if case == "pyrate_log":
                return pl.RedisBucket.init(rates, plain, f"tp-pyrate:{name}")
            return pl.StateBucket(rates, store=pl.RedisStateStore(plain, f"tp-pyrate-gcra:{name}"))

        def acquire(name: str) -> object:
            limiter = limiters.get(name)
            if limiter is None:
                with guard:
                    limiter = limiters.get(name)
                    if limiter is None:
                        limiter = limiters[name] = pl.Limiter(bucket_for(name))
            return limiter.try_acquire(name, blocking=False)

        return acquire
    if case == "agent_lock":
        def agent_once(name: str) -> None:
            with mcp_redis.agent_lock(name):
                pass
        return agent_once
    if case == "agent_lock_fenced":
        def agent_fenced_once(name: str) -> None:
            with mcp_redis.agent_lock("f:" + name, fencing=True) as lk:
                assert lk.fencing_token
        return agent_fenced_once
    if case == "mcp_lock":
        def lock_once(name: str) -> None:
            with mcp_redis.lock("tp-lock:" + name, timeout=30, fencing=True) as lk:
                assert lk.fencing_token
        return lock_once
    if case == "redispy_lock":
        client = redis.Redis(host="127.0.0.1", port=port)

        def redispy_once(name: str) -> None:
            with client.lock("tp-redis-py:" + name, timeout=30, blocking_timeout=5):
                pass
        return redispy_once
    if case == "prl_lock":
        try:
            import redis_lock
        except ImportError as exc:
            raise Missing("python-redis-lock") from exc
        client = redis.Redis(host="127.0.0.1", port=port)

        def prl_once(name: str) -> None:
            lk = redis_lock.Lock(client, "tp-prl:" + name, expire=30)
            lk.acquire()
            lk.release()
        return prl_once
    if case in ("session_get", "session_bind"):
        store = mcp_redis.SessionStore()
        if case == "session_get":
            return lambda name: store.get(session_key(name))
        return lambda name: store.bind(session_key(name), "agent-" + name)
    if case in ("raw_get", "raw_setex", "raw_get_json"):
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        if case == "raw_get":
            return lambda name: client.get("tp-raw:" + name)
        if case == "raw_setex":
            return lambda name: client.setex("tp-raw:" + name, 3600, "agent-" + name)
        return lambda name: json.loads(client.get("tp-raw-json:" + name))
    if case == "cache_l2":
        @mcp_redis.cached_metadata(namespace="tp.l2", ttl=3600, maxsize=1)
        def load(agent_id: str) -> Dict[str, Any]:
            return DOC
        return load
    if case == "dogpile":
        try:
            from dogpile.cache import make_region
        except ImportError as exc:
            raise Missing("dogpile.cache") from exc
        region = make_region(
            serializer=lambda v: json.dumps(v).encode("utf-8"), deserializer=json.loads
        ).configure("dogpile.cache.redis", expiration_time=3600,
                    arguments={"url": f"redis://127.0.0.1:{port}/0", "redis_expiration_time": 3660})
        return lambda name: region.get_or_create(name, lambda: DOC)
    raise ValueError(f"case: unknown {case!r}")


def worker(conn: Any, url: str, port: int, index: int, processes: int, threads: int, names: List[str]) -> None:
    """One process: builds operations on request and runs trials on `threads` threads."""
    import mcp_redis

    mcp_redis.configure(redis_url=url)
    ops: Dict[str, Callable[[str], object]] = {}
    mine = [names[g::processes * threads] for g in range(index * threads, (index + 1) * threads)]
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            mcp_redis.reset(configuration=True)
            conn.send(("ok",))
            return
        if msg[0] == "prepare":
            status: Dict[str, str] = {}
            for case in msg[1]:
                try:
                    op = ops[case] = build(case, url, port)
                    for part in mine:  # warm-up over every name: scripts, pools, caches filled
                        for name in part:
                            op(name)
                    status[case] = "ok"
                except Missing as exc:
                    status[case] = f"{exc} not installed"
                except Exception as exc:  # noqa: BLE001 - reported, the case is skipped
                    status[case] = f"failed: {type(exc).__name__}: {exc}"
            conn.send(("prepared", status))
            continue
        _, case, start_at, seconds = msg
        op = ops[case]
        results: List[Tuple[int, int, str, bytes]] = [(0, 0, "", b"")] * threads

        def run(t: int, op: Callable[[str], object] = op) -> None:
            part = mine[t] or names[:1]
            clock = time.perf_counter
            lat = array("d")
            errors = 0
            first = ""
            delay = start_at - time.time()
            if delay > 0:
                time.sleep(delay)
            end = clock() + (start_at + seconds - time.time())
            i = t * 7
            n = len(part)
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                try:
                    op(part[i % n])
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
                lat.append(clock() - t0)
                i += 1
            results[t] = (len(lat), errors, first, lat.tobytes())

        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        calls = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
        first = next((r[2] for r in results if r[2]), "")
        lat = array("d")
        for r in results:
            lat.frombytes(r[3])
        conn.send(("done", calls, errors, first, lat.tobytes()))


# -- the driver ------------------------------------------------------------------------------
def _cpu(admin: Any) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _q(values: List[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def trial(pipes: List[Any], admin: Any, case: str, seconds: float) -> Dict[str, Any]:
    start_at = time.time() + 0.25
    for p in pipes:
        p.send(("run", case, start_at, seconds))
    time.sleep(max(0.0, start_at - time.time() - 0.05))
    cpu0 = _cpu(admin)
    replies = [p.recv() for p in pipes]
    cpu1 = _cpu(admin)
    calls = sum(r[1] for r in replies)
    errors = sum(r[2] for r in replies)
    first = next((r[3] for r in replies if r[3]), "")
    lat = array("d")
    for r in replies:
        lat.frombytes(r[4])
    ordered = sorted(lat)
    return {
        "ops_s": calls / seconds,
        "p50_us": _q(ordered, 0.5) * 1e6 if ordered else 0.0,
        "p99_us": _q(ordered, 0.99) * 1e6 if ordered else 0.0,
        "cpu_us": (cpu1 - cpu0) * 1e6 / calls if calls else 0.0,
        "calls": calls, "errors": errors, "first_error": first,
    }


def select(only: str) -> List[str]:
    """The kinds named by `--only` (families, kinds or case ids), in table order."""
    if not only:
        return KINDS
    wanted: List[str] = []
    for word in (w.strip() for w in only.split(",") if w.strip()):
        if word in FAMILIES:
            wanted += FAMILIES[word]
        elif word in KINDS:
            wanted.append(word)
        else:
            kinds = [k for c, k, _, _ in CASES if c == word]
            if not kinds:
                raise SystemExit(f"--only: unknown {word!r}; use {', '.join(list(FAMILIES) + KINDS)}")
            wanted += kinds
    return [k for k in KINDS if k in wanted]


def summarise(runs: Dict[str, List[Dict[str, Any]]], status: Dict[str, str],
              kinds: List[str]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for kind in kinds:
        cases = [(c, label, ours) for c, k, label, ours in CASES if k == kind]
        med: Dict[str, Dict[str, float]] = {}
        for c, _, _ in cases:
            if runs.get(c):
                med[c] = {m: statistics.median(r[m] for r in runs[c]) for m in ("ops_s", "p50_us", "p99_us", "cpu_us")}
        peers = [c for c, _, ours in cases if not ours and c in med]
        best = max(peers, key=lambda c: med[c]["ops_s"]) if peers else None
        for c, label, ours in cases:
            row: Dict[str, Any] = {"case": c, "kind": kind, "label": label, "ours": ours,
                                   "status": status.get(c, "not run")}
            if c in med:
                row.update(med[c])
                row["rounds"] = runs[c]
                row["errors"] = sum(r["errors"] for r in runs[c])
                if best is not None:
                    row["vs"] = best
                    row["ops_ratio"] = med[c]["ops_s"] / med[best]["ops_s"]
                    row["cpu_ratio"] = med[c]["cpu_us"] / med[best]["cpu_us"] if med[best]["cpu_us"] else 0.0
            rows.append(row)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    labels = {c: label for c, _, label, _ in CASES}
    print("| kind | operation | ops/s | p50 µs | p99 µs | Redis CPU µs/op | ops/s × fastest peer | "
          "CPU × that peer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        label = f"**{row['label']}**" if row["ours"] else row["label"]
        if "ops_s" not in row:
            print(f"| {row['kind']} | {label} | — | — | — | — | {row['status']} | |")
            continue
        ratio = f"{row['ops_ratio']:.2f}×" if "ops_ratio" in row else "—"
        cpu_ratio = f"{row['cpu_ratio']:.2f}×" if "cpu_ratio" in row else "—"
        err = f" ({row['errors']} errors)" if row["errors"] else ""
        print(f"| {row['kind']} | {label}{err} | {row['ops_s']:,.0f} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | "
              f"{row['cpu_us']:.1f} | {ratio} | {cpu_ratio} |")
    vs = {row["kind"]: labels[row["vs"]] for row in rows if "vs" in row}
    print("\nfastest peer per kind (the ratios' denominator): "
          + "; ".join(f"{k}: {v}" for k, v in vs.items()))


def check_targets(rows: List[Dict[str, Any]]) -> List[str]:
    by_case = {row["case"]: row for row in rows}
    labels = {c: label for c, _, label, _ in CASES}
    lines = []
    for case, (min_ops, max_cpu, against) in TARGETS.items():
        row = by_case.get(case)
        ref_case = against or (row or {}).get("vs")
        ref = by_case.get(ref_case or "")
        if row is None or ref is None or "ops_s" not in row or "ops_s" not in ref:
            continue
        ops = row["ops_s"] / ref["ops_s"]
        cpu = row["cpu_us"] / ref["cpu_us"] if ref["cpu_us"] else 0.0
        ok = ops >= min_ops and cpu <= max_cpu
        lines.append(f"{'met   ' if ok else 'MISSED'} {row['label']} vs {labels[ref['case']]}: ops/s {ops:.2f}× "
                     f"(target ≥ {min_ops:.2f}×), Redis CPU {cpu:.2f}× (target ≤ {max_cpu:.2f}×)")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one trial")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--names", type=int, default=1000, help="keys spread over this many names")
    parser.add_argument("--only", default="", help="families (ratelimit, locks, sessions, cache), kinds "
                                                   "(sliding_window, gcra, lock, session_get, ...) or case ids")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--quick", action="store_true", help="2 processes x 4 threads, 1 s trials, 1 round")
    parser.add_argument("--parser", choices=("any", "hiredis", "python"), default="any",
                        help="refuse to run unless redis-py uses this reply parser (hiredis: `pip install hiredis` "
                             "or the `hiredis` extra; python: `pip uninstall hiredis`), so a with/without pair of "
                             "runs cannot be mislabelled")
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.threads, args.seconds, args.rounds = 2, 4, 1.0, 1
    for flag in ("processes", "threads", "rounds", "names"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    kinds = select(args.only)
    cases = [c for c, k, _, _ in CASES if k in kinds]

    import redis
    import redis.utils

    in_use = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "python"
    if args.parser not in ("any", in_use):
        parser.error(f"--parser {args.parser}: redis-py uses the {in_use} parser in this environment")

    import mcp_redis
    from mcp_redis.testing import RedisServer

    names = [f"{i:04d}-7f3a9c2e" for i in range(args.names)]
    with RedisServer() as server:
        admin = server.client()
        version = admin.info("server")["redis_version"]
        mcp_redis.configure(redis_url=server.url)
        store = mcp_redis.SessionStore()
        raw = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        with raw.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.setex("tp-raw:" + name, 3600, "agent-" + name)
                pipe.setex("tp-raw-json:" + name, 3600, json.dumps(DOC))
            pipe.execute()
        for name in names:
            store.bind(session_key(name), "agent-" + name)
        mcp_redis.reset(configuration=True)

        ctx = multiprocessing.get_context("spawn")
        pipes, procs = [], []
        for index in range(args.processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(there, server.url, server.port, index, args.processes,
                                                    args.threads, names), daemon=True)
            proc.start()
            pipes.append(here)
            procs.append(proc)
        try:
            for p in pipes:
                p.send(("prepare", cases))
            status: Dict[str, str] = {}
            for p in pipes:
                for case, state in p.recv()[1].items():
                    if state != "ok" or case not in status:
                        status[case] = state
            runnable = [c for c in cases if status.get(c) == "ok"]
            runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in runnable}
            started = time.monotonic()
            for r in range(args.rounds):
                for kind in kinds:
                    group = [c for c, k, _, _ in CASES if k == kind and c in runnable]
                    shift = r % len(group) if group else 0
                    for case in group[shift:] + group[:shift]:
                        runs[case].append(trial(pipes, admin, case, args.seconds))
            elapsed = time.monotonic() - started
        finally:
            for p in pipes:
                try:
                    p.send(("stop",))
                    p.recv()
                except (OSError, EOFError):
                    pass
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.terminate()

    parser_name = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python (no hiredis)"
    print(f"redis-server {version} on loopback, {args.processes} processes × {args.threads} threads, "
          f"{args.seconds:g} s per trial, {args.rounds} round(s), medians of rounds, keys over {args.names} names "
          f"(partitioned between threads); redis-py {redis.__version__}, parser: {parser_name}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {elapsed:.0f} s of trials\n")
    rows = summarise(runs, status, kinds)
    print_table(rows)
    targets = check_targets(rows)
    if targets:
        print("\nissue 18 targets (rate limits vs the fastest same-algorithm peer, agent_lock vs redis-py's Lock):")
        for line in targets:
            print("  " + line)
    for row in rows:
        if row.get("errors"):
            first = next(r["first_error"] for r in row["rounds"] if r["first_error"])
            print(f"\n{row['label']}: {row['errors']} calls raised; first: {first}", file=sys.stderr)
    if args.json:
        doc = {"redis_version": version, "redis_py": redis.__version__, "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
               "processes": args.processes, "threads": args.threads, "seconds": args.seconds,
               "rounds": args.rounds, "names": args.names, "cpus": os.cpu_count(),
               "loadavg": os.getloadavg()[0], "cases": rows, "targets": targets}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        print(f"\nJSON written to {args.json}")
    return 1 if any(row.get("errors") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
