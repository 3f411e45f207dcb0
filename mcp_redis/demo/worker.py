"""One worker process of `mcp-redis demo`: an MCP server instance behind a load balancer.

It shares every piece of state through the library, as the legacy server
would after the migration: session bindings (`SessionStore`), agent state
files updated under `agent_lock`, a `@rate_limited` ``store_knowledge``
handler, a `@cached_metadata` loader over PostgreSQL, and ``agent:updates``
events. Everything the report needs is written to shared memory as it
happens (no locks shared between processes), so a worker killed with SIGKILL
loses nothing already done.

Just over the 500-line guideline: one worker's whole life (every feature it
exercises and what it records) in one file, like the demo it serves.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

__all__ = ["WorkerConfig", "Layout", "OPS", "BUCKETS", "worker_main", "session_key", "agent_for_session",
           "agent_name", "bucket_quantile"]

# Operations timed by the demo, in report order.
OPS: Sequence[str] = (
    "session.bind",
    "session.get",
    "lock.acquire",
    "agent.update",
    "ratelimit.call",
    "metadata.get",
    "event.publish",
)
# Geometric latency buckets: 10 us * 1.2**i, up to ~60 s; the last is overflow.
BUCKETS: Sequence[float] = tuple(1e-5 * 1.2 ** i for i in range(86))

# Per-slot counters (float64 in shared memory).
COUNTERS: Sequence[str] = (
    "ready", "done", "ops", "errors",
    "sessions_bound", "session_reads", "session_found", "session_missing", "session_wrong",
    "survivor_checked", "survivor_found",
    "lock_updates", "lock_overlaps", "lock_timeouts", "lock_recovered",
    "rl_attempts", "rl_admitted", "rl_rejected",
    "md_calls", "md_loader_calls", "md_invalidations", "cache_l1_hits", "cache_l2_hits", "cache_misses",
    "cache_errors", "cache_info_seen",
    "events_published", "events_received",
)


@dataclass(frozen=True)
class Layout:
    """Index arithmetic over the shared arrays (same in parent and workers)."""

    slots: int
    agents: int

    @property
    def counter_size(self) -> int:
        return len(COUNTERS) + 4 * self.agents  # + per-agent: updates, rl attempts, rl admitted, rl unknown

    def counter(self, slot: int, name: str) -> int:
        return slot * self.counter_size + COUNTERS.index(name)

    def agent_counter(self, slot: int, kind: int, agent: int) -> int:
        return slot * self.counter_size + len(COUNTERS) + kind * self.agents + agent

    @property
    def latency_size(self) -> int:
        return len(OPS) * (len(BUCKETS) + 1)

    def latency(self, slot: int, op: str, bucket: int) -> int:
        return slot * self.latency_size + OPS.index(op) * (len(BUCKETS) + 1) + bucket


# Per-agent counters. Rate-limit calls whose outcome is unknown (the worker was
# killed during the call, or it raised) stay counted in AGENT_RL_UNKNOWN:
# the limiter may or may not have counted them.
AGENT_UPDATES, AGENT_RL_ATTEMPTS, AGENT_RL_ADMITTED, AGENT_RL_UNKNOWN = 0, 1, 2, 3


@dataclass
class WorkerConfig:
    """Everything a worker needs (picklable)."""

    slot: int
    index: int  # the worker it plays (a restarted worker keeps the index)
    restarted: bool
    workers: int
    threads: int
    agents: int
    sessions_per_worker: int
    rate_limit: int
    rate_window: float
    lock_lease: float
    unsafe: bool
    run_id: str
    state_dir: str
    settings: Dict[str, Any] = field(default_factory=dict)
    metadata_table: Optional[str] = None
    seconds: float = 10.0


def agent_name(i: int) -> str:
    return f"agent-{i:02d}"


def session_key(run_id: str, worker: int, k: int) -> str:
    return f"demo-{run_id}-w{worker}-s{k}"


def agent_for_session(worker: int, k: int, agents: int, per_worker: int) -> int:
    return (worker * per_worker + k) % agents


def bucket_of(seconds: float) -> int:
    if seconds <= BUCKETS[0]:
        return 0
    i = int(math.ceil(math.log(seconds / BUCKETS[0]) / math.log(1.2) - 1e-9))
    return min(i, len(BUCKETS))


def bucket_quantile(counts: Sequence[float], q: float) -> float:
    """Upper bound (seconds) of the bucket holding the q-quantile; 0 when empty."""
    total = sum(counts)
    if not total:
        return 0.0
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        seen += c
        if c and seen >= rank:
            return BUCKETS[i] if i < len(BUCKETS) else float("inf")
    return float("inf")  # pragma: no cover


class _Recorder:
    """Adds to this slot's cells of the shared arrays (one process writes a slot)."""

    def __init__(self, counters: Any, latencies: Any, layout: Layout, slot: int, error_path: str) -> None:
        self.c = counters
        self.lat = latencies
        self.layout = layout
        self.slot = slot
        self._lock = threading.Lock()
        self._errors = 0
        self._error_path = error_path

    def add(self, name: str, value: float = 1.0) -> None:
        i = self.layout.counter(self.slot, name)
        with self._lock:
            self.c[i] += value

    def set(self, name: str, value: float) -> None:
        self.c[self.layout.counter(self.slot, name)] = value

    def add_agent(self, kind: int, agent: int, value: float = 1.0) -> None:
        i = self.layout.agent_counter(self.slot, kind, agent)
        with self._lock:
            self.c[i] += value

    def observe(self, op: str, seconds: float) -> None:
        i = self.layout.latency(self.slot, op, bucket_of(seconds))
        with self._lock:
            self.lat[i] += 1

    def error(self, op: str, exc: BaseException) -> None:
        self.add("errors")
        with self._lock:
            self._errors += 1
            if self._errors > 20:
                return
        line = f"worker {self.slot} {op}: {type(exc).__name__}: {exc}\n"
        fd = os.open(self._error_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid
        return True
    return True


def _read_state(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data: Dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return {"count": 0, "holder": None}


def _write_state(path: str, state: Dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)


class _Features:
    """The library's features this worker could import (missing ones are skipped)."""

    def __init__(self) -> None:
        self.missing: List[str] = []
        self.agent_lock: Optional[Callable[..., ContextManager[Any]]] = None
        self.rate_limited: Optional[Callable[..., Any]] = None
        self.cached_metadata: Optional[Callable[..., Any]] = None
        self.session_store: Any = None
        self.event_bus: Any = None
        self.lock_timeout: Any = TimeoutError
        self.rate_limit_exceeded: Any = None
        import mcp_redis

        self.agent_lock = getattr(mcp_redis, "agent_lock", None)
        if self.agent_lock is None:
            self.missing.append("locks")
        self.rate_limited = getattr(mcp_redis, "rate_limited", None)
        if self.rate_limited is None:
            self.missing.append("rate_limits")
        self.rate_limit_exceeded = mcp_redis.RateLimitExceeded
        self.lock_timeout = mcp_redis.LockTimeout
        self.cached_metadata = getattr(mcp_redis, "cached_metadata", None)
        if self.cached_metadata is None:
            self.missing.append("metadata_cache")
        store_cls = getattr(mcp_redis, "SessionStore", None)
        if store_cls is None:
            self.missing.append("sessions")
        else:
            self.session_store = store_cls()
        bus_cls = getattr(mcp_redis, "EventBus", None)
        if bus_cls is None:
            self.missing.append("events")
        else:
            self.event_bus = bus_cls()


def _cache_numbers(info: Any) -> Optional[Dict[str, float]]:
    """L1 hits, L2 hits, misses, errors from a ``cache_info()`` of any reasonable shape."""
    if info is None:
        return None
    if not isinstance(info, dict):
        if hasattr(info, "_asdict"):
            info = info._asdict()
        elif hasattr(info, "__dict__"):
            info = dict(vars(info))
        else:  # pragma: no cover
            return None

    def pick(*names: str) -> float:
        for n in names:
            if n in info and isinstance(info[n], (int, float)):
                return float(info[n])
        return 0.0

    return {
        "l1_hits": pick("l1_hits", "hits_l1", "local_hits"),
        "l2_hits": pick("l2_hits", "hits_l2", "redis_hits", "remote_hits"),
        "misses": pick("misses", "loads", "loader_calls"),
        "errors": pick("errors", "load_errors", "l2_errors"),
    }


def worker_main(cfg: WorkerConfig, counters: Any, latencies: Any, start_at: Any) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    import signal

    import mcp_redis

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us and cleans up

    mcp_redis.configure(**cfg.settings)
    layout = Layout(slots=len(counters) // Layout(1, cfg.agents).counter_size, agents=cfg.agents)
    rec = _Recorder(counters, latencies, layout, cfg.slot, os.path.join(cfg.state_dir, f"errors-{cfg.slot}.log"))
    feats = _Features()
    rng = random.Random(cfg.slot * 7919 + os.getpid())

    # -- events: every worker also listens, like a server pushing to its clients
    sub = None
    if feats.event_bus is not None:
        try:
            sub = feats.event_bus.subscribe("agent:updates", lambda event: rec.add("events_received"))
        except Exception as exc:
            rec.error("event.subscribe", exc)

    # -- the rate-limited handler and the cached loader, as the server defines them
    store_knowledge: Optional[Callable[[str, str], None]] = None
    if feats.rate_limited is not None:
        def _store(agent_id: str, payload: str) -> None:
            pass  # the admission itself is what the demo counts

        store_knowledge = feats.rate_limited("demo_store_knowledge", limit=cfg.rate_limit,
                                             window=cfg.rate_window, key="agent_id")(_store)

    load_metadata: Any = None
    if feats.cached_metadata is not None:
        def _load(agent_id: str) -> Dict[str, Any]:
            rec.add("md_loader_calls")
            if cfg.metadata_table:
                from psycopg2 import sql

                from ..client import default_client

                query = sql.SQL("SELECT agent_id, display_name, tier FROM {} WHERE agent_id = %s").format(
                    sql.Identifier(cfg.metadata_table))
                row = default_client().postgres().execute(query, (agent_id,), fetch="one")
                if row is None:
                    return {"agent_id": agent_id}
                return {"agent_id": row[0], "display_name": row[1], "tier": row[2]}
            time.sleep(0.002)  # no PostgreSQL: stand in for its round trip
            return {"agent_id": agent_id, "display_name": agent_id.upper(), "tier": "simulated"}

        load_metadata = feats.cached_metadata(ttl=300)(_load)

    store = feats.session_store
    S = cfg.sessions_per_worker

    # -- a restarted worker first checks what its predecessor bound
    if store is not None:
        if cfg.restarted:
            for k in range(S):
                expected = agent_name(agent_for_session(cfg.index, k, cfg.agents, S))
                try:
                    got = store.get(session_key(cfg.run_id, cfg.index, k))
                except Exception as exc:
                    rec.error("session.get", exc)
                    got = None
                rec.add("survivor_checked")
                if got == expected:
                    rec.add("survivor_found")
        else:
            for k in range(S):
                agent = agent_name(agent_for_session(cfg.index, k, cfg.agents, S))
                t0 = time.perf_counter()
                try:
                    store.bind(session_key(cfg.run_id, cfg.index, k), agent)
                    rec.observe("session.bind", time.perf_counter() - t0)
                    rec.add("sessions_bound")
                except Exception as exc:
                    rec.error("session.bind", exc)

    rec.set("ready", 1.0)
    while start_at.value == 0.0:
        time.sleep(0.005)
    deadline = start_at.value + cfg.seconds

    me = os.getpid()
    lock_fn = feats.agent_lock

    def agent_update(agent: int) -> None:
        agent_id = agent_name(agent)
        path = os.path.join(cfg.state_dir, f"{agent_id}.json")
        holder = [me, threading.get_ident()]
        t0 = time.perf_counter()
        guard: ContextManager[Any]
        if cfg.unsafe or lock_fn is None:
            guard = nullcontext()
        else:
            guard = lock_fn(agent_id, timeout=cfg.lock_lease, blocking_timeout=5)
        try:
            with guard:
                rec.observe("lock.acquire", time.perf_counter() - t0)
                state = _read_state(path)
                other = state.get("holder")
                if other and other != holder:
                    if _pid_alive(int(other[0])):
                        rec.add("lock_overlaps")
                    else:
                        rec.add("lock_recovered")  # a killed holder's lease ran out
                state["holder"] = holder
                _write_state(path, state)
                time.sleep(0.0005)  # the work done while holding the agent's state
                state = _read_state(path)
                if state.get("holder") != holder:
                    rec.add("lock_overlaps")
                state["count"] = int(state.get("count", 0)) + 1
                state["holder"] = None
                _write_state(path, state)
                rec.add_agent(AGENT_UPDATES, agent)
                rec.add("lock_updates")
                count = state["count"]
        except feats.lock_timeout:
            rec.add("lock_timeouts")
            return
        rec.observe("agent.update", time.perf_counter() - t0)
        if feats.event_bus is not None:
            t1 = time.perf_counter()
            try:
                feats.event_bus.publish_agent_update(agent_id, "state_changed", {"count": count})
                rec.add("events_published")
                rec.observe("event.publish", time.perf_counter() - t1)
            except Exception as exc:
                rec.error("event.publish", exc)

    def session_read() -> None:
        w = rng.randrange(cfg.workers)
        k = rng.randrange(S)
        t0 = time.perf_counter()
        got = store.get(session_key(cfg.run_id, w, k))
        rec.observe("session.get", time.perf_counter() - t0)
        rec.add("session_reads")
        if got is None:
            rec.add("session_missing")
        elif got == agent_name(agent_for_session(w, k, cfg.agents, S)):
            rec.add("session_found")
        else:
            rec.add("session_wrong")

    def session_refresh() -> None:
        k = rng.randrange(S)
        t0 = time.perf_counter()
        store.bind(session_key(cfg.run_id, cfg.index, k), agent_name(agent_for_session(cfg.index, k, cfg.agents, S)))
        rec.observe("session.bind", time.perf_counter() - t0)

    def knowledge(agent: int) -> None:
        assert store_knowledge is not None
        t0 = time.perf_counter()
        rec.add_agent(AGENT_RL_UNKNOWN, agent)  # until the outcome is recorded
        try:
            store_knowledge(agent_name(agent), "fact")
        except feats.rate_limit_exceeded:
            rec.add("rl_rejected")
        else:
            rec.add_agent(AGENT_RL_ADMITTED, agent)
            rec.add("rl_admitted")
        rec.add_agent(AGENT_RL_ATTEMPTS, agent)
        rec.add("rl_attempts")
        rec.add_agent(AGENT_RL_UNKNOWN, agent, -1.0)
        rec.observe("ratelimit.call", time.perf_counter() - t0)

    def metadata(agent: int) -> None:
        t0 = time.perf_counter()
        load_metadata(agent_name(agent))
        rec.observe("metadata.get", time.perf_counter() - t0)
        rec.add("md_calls")
        publish_cache_info()  # cheap; keeps the tiers current should this process be killed
        if rng.random() < 0.01:
            load_metadata.invalidate(agent_name(agent))
            rec.add("md_invalidations")

    choices: List[tuple[str, float]] = [("agent.update", 0.25)]
    if store is not None:
        choices += [("session.get", 0.25), ("session.bind", 0.05)]
    if store_knowledge is not None:
        choices += [("ratelimit.call", 0.15)]
    if load_metadata is not None:
        choices += [("metadata.get", 0.30)]
    names = [c[0] for c in choices]
    weights = [c[1] for c in choices]

    def publish_cache_info() -> None:
        if load_metadata is None:
            return
        try:
            nums = _cache_numbers(load_metadata.cache_info())
        except Exception:
            nums = None
        if nums is None:
            return
        rec.set("cache_l1_hits", nums["l1_hits"])
        rec.set("cache_l2_hits", nums["l2_hits"])
        rec.set("cache_misses", nums["misses"])
        rec.set("cache_errors", nums["errors"])
        rec.set("cache_info_seen", 1.0)

    def loop() -> None:
        trng = random.Random(rng.random())
        while time.time() < deadline:
            op = trng.choices(names, weights)[0]
            agent = trng.randrange(cfg.agents)
            try:
                if op == "agent.update":
                    agent_update(agent)
                elif op == "session.get":
                    session_read()
                elif op == "session.bind":
                    session_refresh()
                elif op == "ratelimit.call":
                    knowledge(agent)
                elif op == "metadata.get":
                    metadata(agent)
            except Exception as exc:
                rec.error(op, exc)
            rec.add("ops")

    threads = [threading.Thread(target=loop, name=f"demo-worker-{cfg.slot}-{i}", daemon=True)
               for i in range(cfg.threads)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        publish_cache_info()
        for t in threads:
            t.join(0.25)
    publish_cache_info()
    time.sleep(0.3)  # let the last events of the others arrive
    if sub is not None:
        try:
            sub.close()
        except Exception:
            pass
    rec.set("done", 1.0)
