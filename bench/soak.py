"""Soak: a bounded mixed load of every feature, threads × processes.

    python -m bench.soak --seconds 60 [--processes 2] [--threads 4] [--json out.json]
        [--redis-url URL] [--database-url DSN] [--chaos]

Without ``--redis-url`` it starts its own redis-server; without
``--database-url`` it creates (and drops) a throwaway PostgreSQL database
when one answers on 127.0.0.1:5432, else sessions run on Redis alone.
``MCP_REDIS_SOAK_SECONDS`` overrides ``--seconds`` (CI runs a short soak).

Each worker process runs `threads` threads, each looping over a weighted mix:
metadata cache reads and invalidations, session bind/get, rate-limit hits,
agent locks guarding a read-modify-write counter, and event publishes
(received by one subscription per process). At the end it reports ops/s,
p50/p99 per operation, errors, and for every process the RSS (start, peak,
end), the thread count (after warm-up and at the end), the Redis and
PostgreSQL pools' connections in use, and the L1 size against its bound.
Checks (``ok``): no errors; the lock-guarded counters equal the number of
acquisitions (no lost update); a uniform sample (256 per thread) of the
sessions bound is readable; every event
published reached every subscriber; no leaked threads or pooled connections;
L1 within its bound.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Dict, List, Optional, Tuple

AGENTS = 2000  # cache/rate-limit key space (far more than L1 holds)
LOCKED_AGENTS = 32  # lock key space (contention across processes)
L1_MAXSIZE = 256
WEIGHTS: List[Tuple[str, int]] = [
    ("cache_get", 40),
    ("cache_invalidate", 2),
    ("session_bind", 8),
    ("session_get", 15),
    ("rate_limit", 15),
    ("lock", 10),
    ("publish", 10),
]


class Histogram:
    """Constant-memory latency histogram: log buckets 2.3 % wide, exact count and max.

    The harness must not grow with the run, or it would hide (or fake) a leak
    in the library it measures.
    """

    STEPS = 100  # buckets per decade

    def __init__(self) -> None:
        self.buckets: Dict[int, int] = {}
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        b = int(math.floor(math.log10(max(seconds, 1e-7)) * self.STEPS))
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        for b, n in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + n
        self.count += other.count
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (seconds)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return float(min(10 ** ((b + 1) / self.STEPS), self.max))
        return self.max


RESERVOIR = 256  # session bindings per thread re-read at the end (a uniform sample)


def _rss_kb() -> Tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB (0 where /proc is missing)."""
    rss = hwm = 0
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _pick(rng: random.Random) -> str:
    total = sum(w for _, w in WEIGHTS)
    r = rng.uniform(0, total)
    for name, w in WEIGHTS:
        r -= w
        if r <= 0:
            return name
    return WEIGHTS[-1][0]


def _worker(index: int, cfg: Dict[str, Any], out: Any, barrier: Any) -> None:
    """One process: warm up, run the mix on `threads` threads, report."""
    try:
        out.put(_run_worker(index, cfg, barrier))
    except BaseException:
        out.put({"index": index, "fatal": traceback.format_exc()})


def _run_worker(index: int, cfg: Dict[str, Any], barrier: Any) -> Dict[str, Any]:
    import mcp_redis
    from mcp_redis.connections import get_redis

    mcp_redis.configure(redis_url=cfg["redis_url"], database_url=cfg["database_url"], **cfg.get("settings", {}))
    run = cfg["run"]
    chaos = bool(cfg.get("chaos"))
    # Under chaos, the documented outcomes of an unreachable Redis are not
    # errors: locks fail closed, publishes fail; everything else must answer.
    tolerated = {"lock": (mcp_redis.BackendUnavailable, mcp_redis.LockTimeout, mcp_redis.LockNotOwned),
                 "publish": (mcp_redis.BackendUnavailable,)} if chaos else {}
    rss_start, _ = _rss_kb()
    loads = [0]

    @mcp_redis.cached_metadata(ttl=30, maxsize=L1_MAXSIZE, namespace=f"soak-{run}")
    def load(agent_id: str) -> Dict[str, Any]:
        loads[0] += 1  # approximate under threads; only reported
        return {"agent_id": agent_id, "tier": hash(agent_id) % 3}

    store = mcp_redis.SessionStore()
    limiter = mcp_redis.RateLimiter(f"soak-{run}", 1000, 60)
    bus = mcp_redis.EventBus()
    received = [0]
    recv_lock = threading.Lock()

    last_seen: Dict[Tuple[Any, Any], int] = {}  # one publisher thread's events arrive in order
    duplicates = [0]

    def on_event(event: Dict[str, Any]) -> None:
        publisher, i = (event.get("p"), event.get("t")), int(event.get("i", -1))
        with recv_lock:
            received[0] += 1
            if i <= last_seen.get(publisher, -1):
                duplicates[0] += 1
            last_seen[publisher] = max(i, last_seen.get(publisher, -1))

    sub = bus.subscribe(f"soak-{run}", on_event)
    conn = get_redis()
    counter_key = f"mcp:soak:{run}:counter:"

    # Warm up every path so the library's own threads and pools exist.
    load("warm")
    store.bind(f"warm-{run}-{index}", "warm", ttl=120)
    store.get(f"warm-{run}-{index}")
    limiter.hit("warm")
    with mcp_redis.agent_lock(f"soak-{run}-warm", timeout=5, blocking_timeout=5):
        pass
    bus.publish(f"soak-{run}-warmup", {"warm": True})
    threads_after_warmup = threading.active_count()
    redis_in_use_after_warmup = conn.pool_stats()["in_use"]
    rss_warm, _ = _rss_kb()

    barrier.wait(timeout=120)  # every process starts the mix together...
    deadline = time.monotonic() + cfg["seconds"]
    lat: Dict[str, Histogram] = {name: Histogram() for name, _ in WEIGHTS}
    errors: Dict[str, int] = {}
    counts = {"published": 0, "rate_allowed": 0, "rate_refused": 0}
    tolerated_counts: Dict[str, int] = {}
    acquisitions: Dict[str, int] = {}
    uncertain: Dict[str, int] = {}  # lock bodies that failed after sending their SET
    bound: List[Tuple[str, str]] = []  # a reservoir sample per thread
    bound_total = [0]
    merge = threading.Lock()
    rss_samples: List[int] = []

    def thread_main(t: int) -> None:
        rng = random.Random(f"{run}-{index}-{t}")
        my_lat: Dict[str, Histogram] = {name: Histogram() for name, _ in WEIGHTS}
        my_err: Dict[str, int] = {}
        my_acq: Dict[str, int] = {}
        my_unc: Dict[str, int] = {}
        my_tol: Dict[str, int] = {}
        my_bound: List[Tuple[str, str]] = []
        n_bound = 0
        published = allowed = refused = 0
        i = 0
        while time.monotonic() < deadline:
            op = _pick(rng)
            agent = f"agent-{rng.randrange(AGENTS)}"
            start = time.perf_counter()
            try:
                if op == "cache_get":
                    value = load(agent)
                    assert value["agent_id"] == agent
                elif op == "cache_invalidate":
                    load.invalidate(agent)
                elif op == "session_bind":
                    key = f"s-{run}-{index}-{t}-{i}"
                    store.bind(key, agent, ttl=300)
                    n_bound += 1
                    if len(my_bound) < RESERVOIR:
                        my_bound.append((key, agent))
                    else:
                        slot = rng.randrange(n_bound)
                        if slot < RESERVOIR:
                            my_bound[slot] = (key, agent)
                elif op == "session_get":
                    if my_bound:
                        key, expected = my_bound[rng.randrange(len(my_bound))]
                        got = store.get(key)
                        assert got == expected, f"session {key}: {got!r} != {expected!r}"
                    else:
                        store.get(f"unknown-{i}")
                elif op == "rate_limit":
                    if limiter.hit(agent).allowed:
                        allowed += 1
                    else:
                        refused += 1
                elif op == "lock":
                    name = f"soak-{run}-{rng.randrange(LOCKED_AGENTS)}"
                    sent = False
                    try:
                        with mcp_redis.agent_lock(name, timeout=10, blocking_timeout=10):
                            # A read-modify-write that loses updates unless the lock excludes.
                            key = counter_key + name
                            n = int(conn.call(conn.client.get, key) or 0)
                            sent = True
                            conn.call(conn.client.set, key, n + 1, ex=600)
                    except BaseException:
                        if sent:  # the SET may or may not have been applied
                            my_unc[name] = my_unc.get(name, 0) + 1
                        raise
                    my_acq[name] = my_acq.get(name, 0) + 1
                elif op == "publish":
                    bus.publish(f"soak-{run}", {"p": index, "t": t, "i": i})
                    published += 1
            except Exception as exc:  # counted; the soak must show none
                kind = f"{op}:{type(exc).__name__}"
                if isinstance(exc, tolerated.get(op, ())):
                    my_tol[kind] = my_tol.get(kind, 0) + 1
                    my_lat[op].add(time.perf_counter() - start)
                    i += 1
                    continue
                my_err[kind] = my_err.get(kind, 0) + 1
                if sum(my_err.values()) <= 3:
                    sys.stderr.write(f"[soak p{index} t{t}] {kind}: {exc}\n")
            my_lat[op].add(time.perf_counter() - start)
            i += 1
        with merge:
            for name, hist in my_lat.items():
                lat[name].merge(hist)
            for k, v in my_err.items():
                errors[k] = errors.get(k, 0) + v
            for k, v in my_acq.items():
                acquisitions[k] = acquisitions.get(k, 0) + v
            for k, v in my_unc.items():
                uncertain[k] = uncertain.get(k, 0) + v
            for k, v in my_tol.items():
                tolerated_counts[k] = tolerated_counts.get(k, 0) + v
            bound.extend(my_bound)
            bound_total[0] += n_bound
            counts["published"] += published
            counts["rate_allowed"] += allowed
            counts["rate_refused"] += refused

    workers = [threading.Thread(target=thread_main, args=(t,), name=f"soak-{t}") for t in range(cfg["threads"])]
    started = time.monotonic()
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        rss_samples.append(_rss_kb()[0])
        for w in workers:
            w.join(timeout=max(0.1, min(5.0, cfg["seconds"] / 6)))
    elapsed = time.monotonic() - started

    # Every session this process bound is still there (nothing lost).
    missing = [k for k, a in bound if store.get(k) != a]
    info = load.cache_info()
    time.sleep(0.2)  # let in-flight renewals and releases settle
    pg_in_use = None
    if cfg["database_url"]:
        from mcp_redis.postgres import get_postgres

        pg_in_use = get_postgres().pool_stats()["in_use"]
    rss_end, rss_peak = _rss_kb()
    report = {
        "index": index,
        "pid": os.getpid(),
        "elapsed": elapsed,
        "latencies": {k: {"buckets": h.buckets, "count": h.count, "max": h.max} for k, h in lat.items()},
        "errors": errors,
        "acquisitions": acquisitions,
        "uncertain": uncertain,
        "tolerated": tolerated_counts,
        "sessions_bound": bound_total[0],
        "sessions_checked": len(bound),
        "sessions_missing": len(missing),
        "published": counts["published"],
        "rate_allowed": counts["rate_allowed"],
        "rate_refused": counts["rate_refused"],
        "loader_calls": loads[0],
        "cache_info": info._asdict(),
        "threads_after_warmup": threads_after_warmup,
        "threads_end": threading.active_count(),
        "redis_in_use_after_warmup": redis_in_use_after_warmup,
        "redis_in_use_end": conn.pool_stats()["in_use"],
        "redis_pool": conn.pool_stats(),
        "pg_in_use_end": pg_in_use,
        "rss_kb": {"start": rss_start, "warm": rss_warm, "end": rss_end, "peak": rss_peak,
                   "samples": rss_samples},
    }
    barrier.wait(timeout=120)  # ...and nobody stops listening before everybody stopped publishing.
    time.sleep(cfg.get("drain", 1.0))
    report["received"] = received[0]
    report["duplicates"] = duplicates[0]
    sub.close()
    bus.close()
    # What is left is held by the library's own pub/sub listeners (the metadata
    # cache's invalidation channel): one connection each for the process's life.
    # A closed listener caught in a read (a fault) hands its connection back once
    # the read ends: within the socket timeout.
    from mcp_redis import pubsub

    def listeners() -> int:
        return sum(1 for s in list(pubsub._live) if s.alive)

    settled_by = time.monotonic() + conn.settings.socket_timeout + 1.0
    while conn.pool_stats()["in_use"] > listeners() and time.monotonic() < settled_by:
        time.sleep(0.05)
    report["redis_in_use_after_close"] = conn.pool_stats()["in_use"]
    report["listeners"] = listeners()
    report["threads_after_close"] = threading.active_count()
    return report


# Tight timeouts for chaos runs, so that every fault is felt and survived quickly.
CHAOS_SETTINGS: Dict[str, Any] = dict(socket_timeout=0.25, socket_connect_timeout=0.25, retry_attempts=2,
                                      retry_max_backoff=0.05, breaker_failure_threshold=3,
                                      breaker_reset_timeout=0.5)
CHAOS_HANG_BOUND = 5.0
# (fault, seconds, latency): cycled until 2 s before the end, then healthy.
CHAOS_CYCLE: List[Tuple[str, float, float]] = [
    ("pass", 1.5, 0.0), ("latency", 1.0, 0.05), ("pass", 1.0, 0.0), ("blackhole", 1.0, 0.0),
    ("pass", 1.5, 0.0), ("drop", 0.5, 0.0), ("pass", 1.0, 0.0), ("reset", 0.7, 0.0),
    ("pass", 1.0, 0.0), ("latency", 1.0, 1.0),
]


def _conductor(barrier: Any, proxy: Any, seconds: float, log: List[Dict[str, Any]], stop: threading.Event) -> None:
    """The parent's part: start with the workers, inject faults if asked, end with them."""
    try:
        barrier.wait(timeout=120)
        if proxy is not None:
            _chaos(proxy, time.monotonic() + max(0.0, seconds - 2.0), log, stop)
        barrier.wait(timeout=seconds + 120)
    except threading.BrokenBarrierError:
        pass


def _chaos(proxy: Any, until: float, log: List[Dict[str, Any]], stop: threading.Event) -> None:
    i = 0
    while not stop.is_set() and time.monotonic() < until:
        fault, seconds, latency = CHAOS_CYCLE[i % len(CHAOS_CYCLE)]
        proxy.set_fault(fault, latency=latency)
        if fault != "pass":
            log.append({"fault": fault, "seconds": seconds, "latency": latency})
        stop.wait(min(seconds, max(0.0, until - time.monotonic())))
        i += 1
    proxy.pass_through()


def run(seconds: float, processes: int = 2, threads: int = 4, redis_url: Optional[str] = None,
        database_url: Optional[str] = None, drain: float = 1.0, chaos: bool = False) -> Dict[str, Any]:
    """Run the soak; returns the report (``report["ok"]`` and ``report["failures"]``).

    With `chaos`, the workers reach Redis through a `FaultProxy` that cycles
    latency, black holes, dropped connections and mid-reply resets for all
    but the last 2 s; locks may then fail closed and publishes fail, but no
    call may hang, no session may be lost and no lock-guarded update may be
    lost or doubled.
    """
    from urllib.parse import urlsplit

    from mcp_redis.testing import PostgresDatabase, RedisServer
    from mcp_redis.testing.faultproxy import FaultProxy

    own_server = own_db = None
    if redis_url is None:
        own_server = RedisServer().start()
        redis_url = own_server.url
    if database_url is None:
        candidate = PostgresDatabase(prefix="mcp_redis_soak")
        if candidate.available():
            own_db = candidate.create()
            database_url = own_db.url
    run_id = uuid.uuid4().hex[:8]
    proxy = None
    worker_url = redis_url
    if chaos:
        parts = urlsplit(redis_url)
        proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
        worker_url = proxy.url(int((parts.path or "/0").lstrip("/") or 0), password=parts.password,
                               username=parts.username)
    cfg = {"redis_url": worker_url, "database_url": database_url, "seconds": seconds, "threads": threads,
           "run": run_id, "drain": drain, "chaos": chaos, "settings": CHAOS_SETTINGS if chaos else {}}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(processes + 1)  # the workers and the conductor
    procs = [ctx.Process(target=_worker, args=(i, cfg, out, barrier), daemon=True) for i in range(processes)]
    faults: List[Dict[str, Any]] = []
    stop = threading.Event()
    chaos_thread = None
    try:
        for p in procs:
            p.start()
        chaos_thread = threading.Thread(target=_conductor, args=(barrier, proxy, seconds, faults, stop), daemon=True)
        chaos_thread.start()
        reports = [out.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(30)
        report = _summarise(reports, cfg, redis_url)
        if chaos:
            report["faults_injected"] = faults
        return report
    finally:
        stop.set()
        if chaos_thread is not None and chaos_thread.is_alive():
            barrier.abort()
        if chaos_thread is not None:
            chaos_thread.join(5)
        if proxy is not None:
            proxy.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
        if own_db is not None:
            own_db.drop()
        if own_server is not None:
            own_server.cleanup()


def _summarise(reports: List[Dict[str, Any]], cfg: Dict[str, Any], redis_url: str) -> Dict[str, Any]:
    import redis

    failures: List[str] = []
    fatal = [r["fatal"] for r in reports if "fatal" in r]
    if fatal:
        return {"ok": False, "failures": ["worker crashed:\n" + fatal[0]], "config": _public(cfg)}
    overall = Histogram()
    per_op: Dict[str, Dict[str, float]] = {}
    for name, _ in WEIGHTS:
        hist = Histogram()
        for r in reports:
            part = Histogram()
            part.buckets = {int(k): v for k, v in r["latencies"][name]["buckets"].items()}
            part.count, part.max = r["latencies"][name]["count"], r["latencies"][name]["max"]
            hist.merge(part)
        overall.merge(hist)
        per_op[name] = {"ops": hist.count, "p50_ms": hist.quantile(0.5) * 1e3, "p99_ms": hist.quantile(0.99) * 1e3}
    elapsed = max(r["elapsed"] for r in reports)
    errors: Dict[str, int] = {}
    for r in reports:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    if errors:
        failures.append(f"errors: {errors}")
    # Locks: the guarded counters must equal the acquisitions of every process.
    acquisitions: Dict[str, int] = {}
    uncertain: Dict[str, int] = {}
    tolerated: Dict[str, int] = {}
    for r in reports:
        for k, v in r["acquisitions"].items():
            acquisitions[k] = acquisitions.get(k, 0) + v
        for k, v in r["uncertain"].items():
            uncertain[k] = uncertain.get(k, 0) + v
        for k, v in r["tolerated"].items():
            tolerated[k] = tolerated.get(k, 0) + v
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    lost = {}
    for name in set(acquisitions) | set(uncertain):
        n, maybe = acquisitions.get(name, 0), uncertain.get(name, 0)
        value = int(client.get(f"mcp:soak:{cfg['run']}:counter:{name}") or 0)
        # Exact when healthy; under chaos a body that failed after its SET
        # may or may not have counted, so the counter lies in [n, n + maybe].
        if not n <= value <= n + maybe:
            lost[name] = (n, maybe, value)
    if lost:
        failures.append("lock-guarded counters outside [acquisitions, acquisitions + uncertain]: "
                        f"{dict(list(lost.items())[:5])} (mutual exclusion broken)")
    worst = {name: max((r["latencies"][name]["max"] for r in reports), default=0.0) for name, _ in WEIGHTS}
    if cfg.get("chaos"):
        # No call hangs: every operation but a lock wait (blocking_timeout 10 s
        # by design) answers within a few of its timeouts, fault or not.
        hung = {k: round(v, 2) for k, v in worst.items() if k != "lock" and v > CHAOS_HANG_BOUND}
        if hung:
            failures.append(f"calls took longer than {CHAOS_HANG_BOUND}s under faults: {hung}")
    missing = sum(r["sessions_missing"] for r in reports)
    if missing:
        failures.append(f"{missing} session bindings lost")
    published = sum(r["published"] for r in reports)
    expected = published * len(reports)  # one subscription per process
    received = sum(r["received"] for r in reports)
    duplicates = sum(r["duplicates"] for r in reports)
    failed_publishes = sum(v for k, v in tolerated.items() if k.startswith("publish:"))
    # Pub/sub is at-most-once. Under chaos a publish that raised may still have
    # reached Redis (its reply was lost), so up to (published + failed) arrive.
    ceiling = (published + failed_publishes) * len(reports)
    if received > ceiling or (received != expected and not cfg.get("chaos")):
        failures.append(f"events: {received} received of {expected} expected (published {published}, "
                        f"{failed_publishes} publishes raised)")
    if duplicates:
        failures.append(f"events: {duplicates} delivered twice (a retried PUBLISH whose first reply was lost)")
    processes = []
    for r in reports:
        info = r["cache_info"]
        proc = {
            "pid": r["pid"],
            "rss_mb": {k: round(v / 1024, 1) for k, v in r["rss_kb"].items() if k != "samples"},
            "rss_growth_after_warmup_mb": round((r["rss_kb"]["end"] - r["rss_kb"]["warm"]) / 1024, 1),
            "rss_samples_mb": [round(v / 1024, 1) for v in r["rss_kb"]["samples"]],
            "threads": {"after_warmup": r["threads_after_warmup"], "end": r["threads_end"],
                        "after_close": r["threads_after_close"]},
            "redis_in_use": {"after_warmup": r["redis_in_use_after_warmup"], "end": r["redis_in_use_end"],
                             "after_closing_subscriptions": r["redis_in_use_after_close"],
                             "library_listeners": r["listeners"],
                             "requests_in_flight": r["redis_in_use_after_close"] - r["listeners"]},
            "redis_pool": r["redis_pool"],
            "pg_in_use_end": r["pg_in_use_end"],
            "l1": {"size": info["l1_size"], "maxsize": info["l1_maxsize"]},
            "cache_info": info,
        }
        processes.append(proc)
        if r["threads_end"] > r["threads_after_warmup"]:
            failures.append(f"pid {r['pid']}: threads grew {r['threads_after_warmup']} -> {r['threads_end']}")
        if r["redis_in_use_end"] > r["redis_in_use_after_warmup"]:
            failures.append(f"pid {r['pid']}: redis connections in use grew "
                            f"{r['redis_in_use_after_warmup']} -> {r['redis_in_use_end']}")
        if r["redis_in_use_after_close"] - r["listeners"] != 0:
            failures.append(f"pid {r['pid']}: {r['redis_in_use_after_close'] - r['listeners']} redis connections "
                            "in use beyond the library's listeners")
        if r["threads_after_close"] >= r["threads_after_warmup"]:
            failures.append(f"pid {r['pid']}: closing the subscription did not end its thread")
        if r["pg_in_use_end"] not in (None, 0):
            failures.append(f"pid {r['pid']}: {r['pg_in_use_end']} postgres connections still in use")
        if info["l1_size"] > info["l1_maxsize"]:
            failures.append(f"pid {r['pid']}: L1 {info['l1_size']} > bound {info['l1_maxsize']}")
    total = overall.count
    return {
        "ok": not failures,
        "failures": failures,
        "config": _public(cfg),
        "elapsed_s": round(elapsed, 2),
        "ops": total,
        "ops_per_s": round(total / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(overall.quantile(0.5) * 1e3, 3),
        "p99_ms": round(overall.quantile(0.99) * 1e3, 3),
        "per_op": {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                   for k, v in per_op.items()},
        "errors": errors,
        "tolerated": tolerated,
        "max_ms": {k: round(v * 1e3, 1) for k, v in worst.items()},
        "lock_acquisitions": sum(acquisitions.values()),
        "lock_bodies_uncertain": sum(uncertain.values()),
        "lock_updates_lost": len(lost),
        "sessions_bound": sum(r["sessions_bound"] for r in reports),
        "sessions_checked": sum(r["sessions_checked"] for r in reports),
        "sessions_lost": missing,
        "events_published": published,
        "events_received": received,
        "events_expected": expected,
        "events_duplicated": duplicates,
        "rate_limit": {"allowed": sum(r["rate_allowed"] for r in reports),
                       "refused": sum(r["rate_refused"] for r in reports)},
        "processes": processes,
    }


def _public(cfg: Dict[str, Any]) -> Dict[str, Any]:
    from mcp_redis.config import redact_url

    shown = dict(cfg)
    for k in ("redis_url", "database_url"):
        if shown.get(k):
            shown[k] = redact_url(shown[k])
    return shown


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--chaos", action="store_true",
                        help="reach Redis through a fault-injecting proxy cycling latency/black hole/drop/reset")
    args = parser.parse_args(argv)
    seconds = float(os.environ.get("MCP_REDIS_SOAK_SECONDS", args.seconds))
    report = run(seconds, args.processes, args.threads, args.redis_url, args.database_url, chaos=args.chaos)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
