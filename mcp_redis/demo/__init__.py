"""`mcp-redis demo`: several MCP server instances sharing state through the library.

The parent sets up the backends (a throwaway redis-server and PostgreSQL
database unless ``REDIS_URL``/``DATABASE_URL`` are set), starts `workers`
processes (`mcp_redis.demo.worker`) that act as server instances behind a
load balancer, kills one with SIGKILL half-way and starts its replacement,
listens to ``agent:updates`` as an observer, and then checks the invariants:

* lock violations (lost updates + overlapping holders) must be 0;
* rate-limit admissions must be exactly ``min(limit, attempts)`` per key;

and reports cache hit ratios per tier, PostgreSQL queries avoided, sessions
that survived the restart, events delivered and p50/p99 latency per
operation. Everything it creates is removed at the end.

Over the 500-line guideline: the demo's set-up, run, checks and report are
one script, kept in one file so it reads as the walkthrough it is.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TextIO

from ..config import redact_url, settings
from .worker import (
    AGENT_RL_ADMITTED,
    AGENT_RL_ATTEMPTS,
    AGENT_RL_UNKNOWN,
    AGENT_UPDATES,
    BUCKETS,
    OPS,
    Layout,
    WorkerConfig,
    agent_name,
    bucket_quantile,
    worker_main,
)

__all__ = ["DemoOptions", "run_demo", "format_report"]


@dataclass
class DemoOptions:
    workers: int = 4
    seconds: float = 10.0
    threads: int = 2
    agents: int = 8
    sessions_per_worker: int = 50
    rate_limit: int = 20
    unsafe: bool = False
    restart: bool = True
    progress: bool = True
    lock_lease: float = 3.0
    stream: Optional[TextIO] = None  # progress output (default stderr)


class _Backends:
    """The Redis and PostgreSQL the demo uses, and how to clean them up."""

    def __init__(self) -> None:
        self.redis_url: Optional[str] = None
        self.redis_note = ""
        self.server: Any = None
        self.database_url: Optional[str] = None
        self.pg_note = ""
        self.database: Any = None
        self.metadata_table: Optional[str] = None

    def start(self, run_id: str) -> None:
        s = settings()
        if s.redis_url:
            self.redis_url = s.redis_url
            self.redis_note = f"REDIS_URL {redact_url(s.redis_url)}"
        else:
            from ..testing import RedisServer, redis_binary

            if redis_binary() is not None:
                self.server = RedisServer().start()
                self.redis_url = self.server.url
                self.redis_note = f"own redis-server on 127.0.0.1:{self.server.port} (REDIS_URL unset)"
            else:
                self.redis_note = "local mode: REDIS_URL unset and no redis-server on PATH"
        if s.database_url:
            self.database_url = s.database_url
            self.pg_note = f"DATABASE_URL {redact_url(s.database_url)}"
        else:
            from ..testing import PostgresDatabase

            db = PostgresDatabase(prefix="mcp_redis_demo")
            if db.available():
                db.create()
                self.database = db
                self.database_url = db.url
                self.pg_note = f"throwaway database {db.name} on 127.0.0.1:5432 (DATABASE_URL unset)"
            else:
                self.pg_note = ("no PostgreSQL tier: DATABASE_URL unset and PostgreSQL on 127.0.0.1:5432 "
                                f"(or MCP_REDIS_TEST_PG_ADMIN_DSN) is not usable: {db.error}")
        if self.database_url:
            self.metadata_table = f"mcp_redis_demo_agents_{run_id}"

    def seed(self, agents: int) -> None:
        if not self.metadata_table:
            return
        from psycopg2 import sql

        from ..client import default_client

        pg = default_client().postgres()
        table = sql.Identifier(self.metadata_table)
        pg.execute(sql.SQL("CREATE TABLE {} (agent_id TEXT PRIMARY KEY, display_name TEXT, tier TEXT)").format(table))
        insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(table)
        for i in range(agents):
            name = agent_name(i)
            pg.execute(insert, (name, name.replace("-", " ").title(), "gold" if i % 3 == 0 else "standard"))

    def cleanup(self, prefix: str, run_id: str) -> None:
        import mcp_redis

        if self.database_url and self.database is None:
            # The user's database: remove what the demo wrote.
            try:
                from psycopg2 import sql

                from ..client import default_client

                pg = default_client().postgres()
                if self.metadata_table:
                    pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.metadata_table)))
                pg.execute(pg.sql("DELETE FROM {schema}.sessions WHERE session_key LIKE %s"), (f"demo-{run_id}-%",))
            except Exception:
                pass
        if self.redis_url and self.server is None:
            # The user's Redis: delete the run's keys (they all carry its prefix).
            try:
                from ..client import default_client

                client = default_client().redis().client
                batch: List[str] = []
                for key in client.scan_iter(match=prefix + "*", count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        client.unlink(*batch)
                        batch.clear()
                if batch:
                    client.unlink(*batch)
            except Exception:
                pass
        mcp_redis.reset()
        if self.server is not None:
            self.server.cleanup()
        if self.database is not None:
            try:
                self.database.drop()
            except Exception:
                pass


def _features_available() -> Dict[str, bool]:
    import mcp_redis

    return {
        "locks": hasattr(mcp_redis, "agent_lock"),
        "rate_limits": hasattr(mcp_redis, "rate_limited"),
        "metadata_cache": hasattr(mcp_redis, "cached_metadata"),
        "sessions": hasattr(mcp_redis, "SessionStore"),
        "events": hasattr(mcp_redis, "EventBus"),
    }


class _Progress:
    def __init__(self, stream: TextIO, enabled: bool, total: float) -> None:
        self.stream = stream
        self.enabled = enabled
        self.total = total
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_quarter = -1

    def update(self, elapsed: float, ops: float, note: str) -> None:
        if not self.enabled:
            return
        frac = max(0.0, min(1.0, elapsed / self.total))
        width = 30
        filled = int(frac * width)
        line = f"[{'#' * filled}{'-' * (width - filled)}] {elapsed:5.1f}/{self.total:.1f}s  {int(ops):>8} ops  {note}"
        if self.tty:
            self.stream.write("\r" + line[:130].ljust(130))
            self.stream.flush()
        else:
            quarter = int(frac * 4)
            if quarter != self._last_quarter:
                self._last_quarter = quarter
                self.stream.write(line + "\n")
                self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * 130 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_demo(options: Optional[DemoOptions] = None) -> Dict[str, Any]:
    """Run the demo and return its report (JSON-ready); ``report["ok"]`` is the verdict."""
    import mcp_redis

    opt = options or DemoOptions()
    stream = opt.stream or sys.stderr
    run_id = uuid.uuid4().hex[:8]
    prefix = f"mcpdemo-{run_id}:"
    backends = _Backends()
    state_dir = tempfile.mkdtemp(prefix="mcp_redis_demo_")
    progress = _Progress(stream, opt.progress, opt.seconds)
    ctx = mp.get_context("spawn")
    procs: List[Any] = []
    sub: Any = None
    try:
        backends.start(run_id)
        worker_settings: Dict[str, Any] = {
            "redis_url": backends.redis_url,
            "database_url": backends.database_url,
            "key_prefix": prefix,
            "lock_dir": os.path.join(state_dir, "locks"),
        }
        mcp_redis.configure(**worker_settings)
        _check_redis_answers(backends)
        s = settings()
        modes = {f: s.mode(f).value for f in ("sessions", "locks", "rate_limits", "metadata_cache")}
        progress.message(f"mcp-redis demo: redis: {backends.redis_note}")
        progress.message(f"mcp-redis demo: postgres: {backends.pg_note}")
        backends.seed(opt.agents)
        available = _features_available()
        missing = [f for f, ok in available.items() if not ok]
        if missing:
            progress.message(f"mcp-redis demo: not available in this build: {', '.join(missing)}")

        slots = opt.workers + (1 if opt.restart else 0)
        layout = Layout(slots=slots, agents=opt.agents)
        counters = ctx.RawArray("d", slots * layout.counter_size)
        latencies = ctx.RawArray("d", slots * layout.latency_size)
        start_at = ctx.RawValue("d", 0.0)

        observed = [0]

        def on_event(event: Dict[str, Any]) -> None:
            observed[0] += 1

        if available["events"]:
            sub = mcp_redis.EventBus().subscribe("agent:updates", on_event)

        def make(slot: int, index: int, restarted: bool) -> WorkerConfig:
            return WorkerConfig(
                slot=slot, index=index, restarted=restarted, workers=opt.workers, threads=opt.threads,
                agents=opt.agents, sessions_per_worker=opt.sessions_per_worker, rate_limit=opt.rate_limit,
                rate_window=3600.0, lock_lease=opt.lock_lease, unsafe=opt.unsafe, run_id=run_id,
                state_dir=state_dir, settings=worker_settings, metadata_table=backends.metadata_table,
                seconds=opt.seconds,
            )

        def spawn(cfg: WorkerConfig) -> Any:
            p = ctx.Process(target=worker_main, args=(cfg, counters, latencies, start_at),
                            name=f"mcp-redis-demo-worker-{cfg.slot}", daemon=True)
            p.start()
            return p

        def total(name: str) -> float:
            return float(sum(counters[layout.counter(slot, name)] for slot in range(slots)))

        for w in range(opt.workers):
            procs.append(spawn(make(w, w, False)))
        progress.message(f"mcp-redis demo: starting {opt.workers} workers x {opt.threads} threads "
                         f"for {opt.seconds:g}s ...")
        _wait(lambda: all(counters[layout.counter(w, "ready")] for w in range(opt.workers)),
              lambda: [p for p in procs if p.exitcode is not None], 120.0, "workers to start")
        started = time.time()
        start_at.value = started
        killed: Dict[str, Any] = {}
        note = ""
        while True:
            elapsed = time.time() - started
            if opt.restart and not killed and elapsed >= opt.seconds / 2:
                victim = opt.workers - 1
                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].join(10)
                killed = {"worker": victim, "at_s": round(elapsed, 2), "signal": "SIGKILL"}
                procs.append(spawn(make(opt.workers, victim, True)))
                note = f"worker {victim} killed (SIGKILL); its lock leases lapse within {opt.lock_lease:g}s"
            if killed and counters[layout.counter(opt.workers, "ready")]:
                note = f"worker {killed['worker']} restarted"
            if elapsed >= opt.seconds:
                break
            progress.update(elapsed, total("ops"), note)
            time.sleep(0.2)
        progress.update(opt.seconds, total("ops"), note)
        progress.finish()
        for p in procs:
            p.join(max(30.0, opt.seconds))
        hung = [p.name for p in procs if p.exitcode is None]
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5)
        published = total("events_published")
        if sub is not None:
            deadline = time.monotonic() + 2.0
            while observed[0] < published and time.monotonic() < deadline:
                time.sleep(0.02)
        report = _report(opt, layout, counters, latencies, slots, state_dir, backends, modes, missing,
                         killed, observed[0] if sub is not None else None, time.time() - started, hung)
        report["setup"]["key_prefix"] = prefix
        return report
    finally:
        if sub is not None:
            try:
                sub.close()
            except Exception:
                pass
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5)
        backends.cleanup(prefix, run_id)
        shutil.rmtree(state_dir, ignore_errors=True)
        # The demo's configure() overrides must not outlive it.
        mcp_redis.reset(configuration=True)


def _check_redis_answers(backends: _Backends) -> None:
    if not backends.redis_url:
        return
    from ..client import default_client
    from ..errors import BackendUnavailable, ConfigurationError

    conn = default_client().redis()
    try:
        conn.call(conn.client.ping, attempts=1)
    except ConfigurationError:
        raise  # a refused password, a missing permission...: it says what to fix
    except Exception as exc:
        hint = "; unset REDIS_URL to let the demo start its own redis-server" if backends.server is None else ""
        raise BackendUnavailable(f"Redis at {conn.url} does not answer ({type(exc).__name__}){hint}") from None


def _wait(done: Callable[[], bool], failed: Callable[[], List[Any]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        dead = failed()
        if dead:
            raise RuntimeError(f"demo worker(s) exited early: {', '.join(f'{p.name} ({p.exitcode})' for p in dead)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _report(opt: DemoOptions, layout: Layout, counters: Any, latencies: Any, slots: int, state_dir: str,
            backends: _Backends, modes: Dict[str, str], missing: List[str], killed: Dict[str, Any],
            observed: Optional[int], elapsed: float, hung: List[str]) -> Dict[str, Any]:
    import json

    def total(name: str) -> float:
        return float(sum(counters[layout.counter(slot, name)] for slot in range(slots)))

    def per_agent(kind: int, agent: int, slot: Optional[int] = None) -> float:
        rng = range(slots) if slot is None else [slot]
        return float(sum(counters[layout.agent_counter(s, kind, agent)] for s in rng))

    failures: List[str] = []

    # -- locks: every increment done under the lock must be in the state file
    lost = 0
    for a in range(opt.agents):
        path = os.path.join(state_dir, f"{agent_name(a)}.json")
        try:
            with open(path, encoding="utf-8") as f:
                count = int(json.load(f).get("count", 0))
        except FileNotFoundError:
            count = 0
        # A worker killed between its write and its tally leaves count one
        # *above* the tally; only a count below it is a lost update.
        lost += max(0, int(per_agent(AGENT_UPDATES, a)) - count)
    overlaps = int(total("lock_overlaps"))
    violations = lost + overlaps
    locks = {
        "backend": "none (--unsafe)" if opt.unsafe else modes["locks"],
        "updates": int(total("lock_updates")),
        "lost_updates": lost,
        "overlapping_holders": overlaps,
        "violations": violations,
        "timeouts": int(total("lock_timeouts")),
        "recovered_from_killed_holder": int(total("lock_recovered")),
    }
    if "locks" in missing:
        locks["available"] = False
    if violations:
        failures.append(f"{violations} lock violation(s)")

    # -- rate limits: exactly min(limit, attempts) per key when shared
    shared = modes["rate_limits"] in ("redis", "postgres")
    scopes = [None] if shared else list(range(slots))
    expected = 0
    unknown = 0
    exact = True
    admitted = int(total("rl_admitted"))
    for a in range(opt.agents):
        for scope in scopes:
            done = int(per_agent(AGENT_RL_ATTEMPTS, a, scope))
            got = int(per_agent(AGENT_RL_ADMITTED, a, scope))
            u = int(per_agent(AGENT_RL_UNKNOWN, a, scope))
            expected += min(opt.rate_limit, done)
            unknown += u
            exact = exact and _admissions_exact(got, done, u, opt.rate_limit)
    rate = {
        "backend": modes["rate_limits"],
        "scope": "shared by every worker" if shared else "per process (local mode)",
        "limit_per_agent": opt.rate_limit,
        "window_s": 3600,
        "agents": opt.agents,
        "attempts": int(total("rl_attempts")),
        "admitted": admitted,
        "expected_admitted": expected,
        "rejected": int(total("rl_rejected")),
        "unknown_outcome": unknown,
        "exact": exact,
    }
    if "rate_limits" in missing:
        rate["available"] = False
    elif not exact:
        failures.append(f"rate limit admitted {admitted}, expected exactly {expected}"
                        + (f" (+ up to {unknown} call(s) of unknown outcome)" if unknown else ""))

    # -- metadata cache
    calls = int(total("md_calls"))
    loads = int(total("md_loader_calls"))
    l1 = int(total("cache_l1_hits"))
    l2 = int(total("cache_l2_hits"))
    cache: Dict[str, Any] = {
        "backend": modes["metadata_cache"],
        "source": "postgresql" if backends.metadata_table else "simulated loader (no PostgreSQL)",
        "calls": calls,
        "loader_calls": loads,
        "postgres_queries": loads if backends.metadata_table else 0,
        "postgres_queries_avoided": (calls - loads) if backends.metadata_table else 0,
        "invalidations": int(total("md_invalidations")),
    }
    if calls:
        cache["hit_ratio"] = round(1 - loads / calls, 4)
        if total("cache_info_seen"):
            cache["l1_hits"] = l1
            cache["l2_hits"] = l2
            cache["hit_ratio_l1"] = round(l1 / calls, 4)
            cache["hit_ratio_l2"] = round(l2 / calls, 4)
            cache["errors"] = int(total("cache_errors"))
    if "metadata_cache" in missing:
        cache["available"] = False

    # -- sessions
    sessions: Dict[str, Any] = {
        "backend": modes["sessions"],
        "bound": int(total("sessions_bound")),
        "cross_worker_reads": int(total("session_reads")),
        "found": int(total("session_found")),
        "missing": int(total("session_missing")),
        "wrong_agent": int(total("session_wrong")),
    }
    if killed:
        sessions["restart"] = {
            "killed_worker": killed["worker"],
            "killed_at_s": killed["at_s"],
            "survived": int(total("survivor_found")),
            "checked": int(total("survivor_checked")),
        }
    if "sessions" in missing:
        sessions["available"] = False
    if sessions["wrong_agent"]:
        failures.append(f"{sessions['wrong_agent']} session read(s) returned another agent")

    # -- events
    events: Dict[str, Any] = {
        "published": int(total("events_published")),
        "delivered_to_observer": observed,
        "delivered_to_workers": int(total("events_received")),
        "note": "pub/sub is at-most-once; a worker receives nothing while it is down",
    }
    if "events" in missing:
        events["available"] = False

    latency: Dict[str, Any] = {}
    for op in OPS:
        counts = [0.0] * (len(BUCKETS) + 1)
        for slot in range(slots):
            for b in range(len(BUCKETS) + 1):
                counts[b] += latencies[layout.latency(slot, op, b)]
        n = int(sum(counts))
        if n:
            latency[op] = {
                "count": n,
                "p50_ms": round(bucket_quantile(counts, 0.5) * 1000, 3),
                "p99_ms": round(bucket_quantile(counts, 0.99) * 1000, 3),
            }

    errors: List[str] = []
    for slot in range(slots):
        path = os.path.join(state_dir, f"errors-{slot}.log")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                errors += [line.rstrip("\n") for line in f][:5]
    if hung:
        failures.append(f"worker(s) did not finish: {', '.join(hung)}")

    ops = total("ops")
    return {
        "ok": not failures,
        "failures": failures,
        "setup": {
            "redis": backends.redis_note,
            "postgres": backends.pg_note,
            "workers": opt.workers,
            "threads_per_worker": opt.threads,
            "seconds": opt.seconds,
            "agents": opt.agents,
            "modes": modes,
            "not_available": missing,
            "restart": killed or None,
        },
        "throughput_ops_per_s": round(ops / elapsed, 1) if elapsed > 0 else 0.0,
        "operations": int(ops),
        "errors": {"count": int(total("errors")), "first": errors[:10]},
        "locks": locks,
        "rate_limits": rate,
        "metadata_cache": cache,
        "sessions": sessions,
        "events": events,
        "latency_ms": latency,
    }


def _admissions_exact(admitted: int, completed: int, unknown: int, limit: int) -> bool:
    """Did the limiter admit exactly ``min(limit, attempts)``?

    `unknown` calls were cut short (their worker was killed mid-call, or the
    call raised): j of them reached the limiter and k <= j were admitted, for
    some j, k we cannot observe. Exact means some such j, k fit.
    """
    return any(admitted + k == min(limit, completed + j)
               for j in range(unknown + 1) for k in range(j + 1))


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def workers_delivery_note(published: int, workers: int) -> str:
    """Why "to workers" exceeds "published": every worker process subscribes too.

    Each event reaches every worker subscribed when it is published (the
    publisher included), so the sum over workers is at most published x
    workers; less by what a worker missed while it was down (the killed one,
    until its replacement subscribed) or not yet subscribed.
    """
    return (f"(each worker process subscribes: an event reaches every subscribed worker, "
            f"so at most {published} x {workers} = {published * workers})")


def format_report(r: Dict[str, Any]) -> str:
    """The human-readable report."""
    out: List[str] = []
    add = out.append
    st = r["setup"]
    add("mcp-redis demo report")
    add("=" * 60)
    add(f"redis:     {st['redis']}")
    add(f"postgres:  {st['postgres']}")
    add(f"workers:   {st['workers']} processes x {st['threads_per_worker']} threads, {st['seconds']:g}s, "
        f"{st['agents']} agents; {r['operations']} operations ({r['throughput_ops_per_s']}/s)")
    add("backends:  " + ", ".join(f"{k}={v}" for k, v in st["modes"].items()))
    if st["not_available"]:
        add(f"not available in this build: {', '.join(st['not_available'])}")
    if st["restart"]:
        add(f"restart:   worker {st['restart']['worker']} killed with SIGKILL at "
            f"{st['restart']['at_s']}s and restarted")
    add("")
    lk = r["locks"]
    add(f"agent_lock          {lk['violations']} violations ({lk['lost_updates']} lost updates, "
        f"{lk['overlapping_holders']} overlapping holders) in {lk['updates']} read-modify-writes"
        f" [{lk['backend']}]")
    add(f"                    {lk['timeouts']} lock timeouts, "
        f"{lk['recovered_from_killed_holder']} lease(s) recovered from the killed worker")
    rl = r["rate_limits"]
    if rl.get("available", True):
        verdict = "exact" if rl["exact"] else "NOT EXACT"
        if rl.get("unknown_outcome"):
            verdict += f"; {rl['unknown_outcome']} call(s) cut short by the kill"
        add(f"@rate_limited       {rl['admitted']} admitted / {rl['expected_admitted']} expected ({verdict}); "
            f"limit {rl['limit_per_agent']}/agent/h x {rl['agents']} agents, {rl['rejected']} rejected "
            f"[{rl['scope']}]")
    else:
        add("@rate_limited       not available")
    c = r["metadata_cache"]
    if c.get("available", True) and c["calls"]:
        tiers = ""
        if "hit_ratio_l1" in c:
            tiers = f" (L1 {_pct(c['hit_ratio_l1'])}, L2 {_pct(c['hit_ratio_l2'])})"
        add(f"@cached_metadata    hit ratio {_pct(c['hit_ratio'])}{tiers}; {c['loader_calls']} loads for "
            f"{c['calls']} calls; source: {c['source']}")
        if c["postgres_queries"] or c["postgres_queries_avoided"]:
            add(f"                    PostgreSQL queries avoided: {c['postgres_queries_avoided']} "
                f"({c['postgres_queries']} made)")
    else:
        add("@cached_metadata    not available")
    s = r["sessions"]
    if s.get("available", True):
        add(f"SessionStore        {s['found']}/{s['cross_worker_reads']} cross-worker reads resolved "
            f"({s['missing']} missing, {s['wrong_agent']} wrong) [{s['backend']}]")
        if "restart" in s:
            rs = s["restart"]
            add(f"                    {rs['survived']}/{rs['checked']} sessions of the killed worker "
                f"survived its restart")
    else:
        add("SessionStore        not available")
    e = r["events"]
    if e.get("available", True):
        obs = e["delivered_to_observer"]
        add(f"agent:updates       {e['published']} published, {obs} delivered to the observer, "
            f"{e['delivered_to_workers']} to workers")
        add("                    " + workers_delivery_note(e["published"], st["workers"]))
    else:
        add("agent:updates       not available")
    add("")
    add(f"{'operation':<18}{'count':>9}{'p50 ms':>10}{'p99 ms':>10}")
    for op, v in r["latency_ms"].items():
        add(f"{op:<18}{v['count']:>9}{v['p50_ms']:>10.3f}{v['p99_ms']:>10.3f}")
    add("(p50/p99: upper bound of a 20%-wide latency bucket)")
    if r["errors"]["count"]:
        add("")
        add(f"errors: {r['errors']['count']}")
        for line in r["errors"]["first"]:
            add(f"  {line}")
    add("")
    add("verdict: " + ("OK" if r["ok"] else "FAILED: " + "; ".join(r["failures"])))
    return "\n".join(out)
