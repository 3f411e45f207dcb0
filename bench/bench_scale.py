"""Cost as work grows: SessionStore.get and RateLimiter.hit on a loaded server vs an empty one.

    python -m bench.bench_scale [--sessions 1000000] [--agents 100000] [--calls 2000] [--rounds 5]
    python -m bench.bench_scale --scale 0.1     # 100,000 bindings and 10,000 agents
    python -m bench.bench_scale --quick         # --scale 0.02 and fewer calls
    python -m bench.bench_scale --no-rehash-wait  # time the loaded server while it may still be rehashing

Starts two redis-servers (mcp_redis.testing.RedisServer) and one
mcp_redis.Client per server. The *loaded* server receives `--sessions`
session bindings spread over `--agents` agents (10 sessions per agent by
default), each agent with rate-limit state (one sliding-window hit at
20/hour); the *empty* server holds only the working set. Loading is
pipelined: the library's own ``SessionStore.bind`` runs with its Redis calls
queued and sent in pipelines of `--batch` (the same scripts, keys and
arguments as a plain bind; checked on a sample afterwards); the rate-limit
state goes through ``RateLimiter.hit`` on 8 threads. The load time and the
``INFO memory`` delta per binding and per agent's rate-limit key are reported.

Then, once the loaded server has finished rehashing its key tables into
larger ones (``DEBUG HTSTATS``, which the bench's servers allow from
loopback; the wait is reported; `--no-rehash-wait` skips it), the same
working set (`--working-set` sessions and agents, taken at random from the
loaded ones and also bound on the empty server) is read on both servers in
alternating blocks: ``SessionStore.get`` and ``RateLimiter.hit`` (a
limiter with a limit never reached), medians of the per-round p50s, and the
loaded / empty ratio (issue 18 target: ≤ 1.1×).
A raw redis-py ``GET`` of the same binding keys is timed beside them as a
baseline without the library, and each call's server-side time (``INFO
commandstats`` of its one command, reset before each block) is shown for
both servers: what the larger keyspace adds inside Redis, whatever the
host's round trip.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis

import mcp_redis
from bench.common import percentile
from mcp_redis import sessions as sessions_module
from mcp_redis.testing import RedisServer

BIG = 1_000_000_000
RAW = "raw redis-py GET of a binding (baseline)"
# The one command each timed call sends, whose INFO commandstats time is the server's own part of it.
SERVER_COMMAND = {"SessionStore.get": "get", "RateLimiter.hit": "evalsha", RAW: "get"}


def session_key(i: int) -> str:
    return uuid.UUID(int=(i + 1) * 0x9E3779B97F4A7C15 % (1 << 128)).hex


def agent_id(j: int) -> str:
    return str(uuid.UUID(int=(j + 1) << 64 | 0x4000_8000_0000_0000))


def _used(server: RedisServer) -> int:
    info = server.client().info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0)) - int(info.get("used_memory_scripts", 0))


class PipelinedBinder:
    """``SessionStore.bind`` with the store's Redis calls queued into pipelines.

    The calls are the library's own (its scripts, keys, arguments): the
    sessions tier's ``call`` is swapped, for this loader only, for one that
    queues the call; a bind of a fresh key needs no reply (a previous agent to
    unindex only exists on a rebind). None when the store's internals are not
    the expected shape (then the loader falls back to plain binds on threads).
    """

    def __init__(self, client: Any) -> None:
        from mcp_redis import sessions

        self.store = mcp_redis.SessionStore(client=client)
        backend = sessions._current(client)
        self.tier = getattr(backend, "tier", None)
        if self.tier is None or not hasattr(self.tier, "call") or getattr(self.tier, "cluster", False):
            raise LookupError("sessions internals not of the expected shape")
        self.queue: List[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]] = []

    def bind_all(self, pairs: List[Tuple[str, str]], batch: int) -> None:
        tier = self.tier
        assert tier is not None

        def record(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            self.queue.append((fn, args, kwargs))

        tier.call = record  # instance attribute: shadows the method for this loader's store only
        # The periodic index sweep reads replies, which a queued call does not
        # have; a fresh load leaves nothing to sweep.
        tier._maybe_sweep = lambda: None
        try:
            for start in range(0, len(pairs), batch):
                for sid, agent in pairs[start:start + batch]:
                    self.store.bind(sid, agent)
                self.flush()
        finally:
            del tier.call
            del tier._maybe_sweep

    def flush(self) -> None:
        assert self.tier is not None
        client = self.tier.client
        with client.pipeline(transaction=False) as pipe:
            for fn, args, kwargs in self.queue:
                if hasattr(fn, "sha"):  # a redis-py Script
                    fn(*args, client=pipe, **kwargs)
                elif getattr(fn, "__name__", "") == "run_script":  # RedisConnection.run_script(script, keys, args)
                    script, keys, argv = args
                    script(keys, argv, client=pipe)
                else:  # a bound client method
                    getattr(pipe, fn.__name__)(*args, **kwargs)
            pipe.execute()
        self.queue.clear()


def load(server: RedisServer, client: Any, sessions: int, agents: int, batch: int) -> Dict[str, Any]:
    pairs = [(session_key(i), agent_id(i % agents)) for i in range(sessions)]
    m0 = _used(server)
    started = time.perf_counter()
    try:
        PipelinedBinder(client).bind_all(pairs, batch)
        how = f"pipelined, {batch} binds per pipeline"
    except LookupError:
        store = mcp_redis.SessionStore(client=client)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: store.bind(*p), pairs, chunksize=256))
        how = "SessionStore.bind on 8 threads (internals not recognised: not pipelined)"
    session_seconds = time.perf_counter() - started
    time.sleep(1.1)  # clientsCron refreshes the clients' memory figures
    m1 = _used(server)
    limiter = mcp_redis.RateLimiter("scale-rl", 20, 3600, client=client)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(limiter.hit, (agent_id(j) for j in range(agents)), chunksize=256))
    rl_seconds = time.perf_counter() - started
    time.sleep(1.1)
    m2 = _used(server)
    store = mcp_redis.SessionStore(client=client)
    for i in random.Random(3).sample(range(sessions), min(200, sessions)):  # the pipelined binds are real binds
        assert store.get(session_key(i)) == agent_id(i % agents), "a pipelined bind did not bind"
        assert session_key(i) in store.sessions_for(agent_id(i % agents)), "a pipelined bind did not index"
    return {"how": how, "session_seconds": session_seconds, "rl_seconds": rl_seconds,
            "bytes_per_binding": (m1 - m0) / sessions, "bytes_per_rl_key": (m2 - m1) / agents,
            "used_memory_mb": server.client().info("memory")["used_memory"] / 2**20,
            "keys": server.client().dbsize()}


def wait_rehashed(server: RedisServer, timeout: float) -> Optional[float]:
    """Seconds until no hash table of db 0 is being rehashed (``DEBUG HTSTATS``); None if it cannot tell.

    A keyspace that has just grown past a power of two has its key table (and
    its expiry table) rehashed into one twice the size, a step at a time
    (1 ms per ``serverCron`` tick, one bucket per command). Until that ends
    every lookup searches both tables: in this bench's runs on 1,100,001
    keys, a ``GET`` cost the server 8.7 µs timed without waiting and
    3.1-4.0 µs after the wait (docs/benchmarks.md). The timed part measures
    the steady state after it.
    """
    client = server.client()
    started = time.monotonic()
    while True:
        try:
            stats = client.execute_command("DEBUG", "HTSTATS", 0)
        except redis.ResponseError:  # DEBUG not enabled: no way to tell
            return None
        if "rehashing target" not in stats:  # (server.client() decodes replies)
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the loaded server still rehashing after {timeout:.0f} s")
        time.sleep(0.25)


def timed(fn: Callable[[], object], n: int) -> List[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --sessions and --agents (e.g. 0.1)")
    parser.add_argument("--batch", type=int, default=1000, help="binds per pipeline while loading")
    parser.add_argument("--working-set", type=int, default=2000, help="sessions and agents read in the timed part")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="--scale 0.02, 3 rounds x 1000 calls")
    parser.add_argument("--no-rehash-wait", action="store_true",
                        help="time the loaded server at once, while its tables may still be rehashing")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.rounds, args.calls = 0.02, 3, 1000
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    sessions = max(1, int(args.sessions * args.scale))
    agents = max(1, min(sessions, int(args.agents * args.scale)))
    for flag in ("batch", "working_set", "calls", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    rng = random.Random(7)
    work_sessions = rng.sample(range(sessions), min(args.working_set, sessions))
    work_agents = [agent_id(rng.randrange(agents)) for _ in range(args.working_set)]

    debug = ["--enable-debug-command", "local"]  # DEBUG HTSTATS, from loopback only
    with RedisServer(args=debug) as empty_server, RedisServer(args=debug) as loaded_server:
        version = empty_server.client().info("server")["redis_version"]
        clients = {"empty": mcp_redis.Client(redis_url=empty_server.url),
                   "loaded": mcp_redis.Client(redis_url=loaded_server.url)}
        try:
            figures = load(loaded_server, clients["loaded"], sessions, agents, args.batch)
            empty_store = mcp_redis.SessionStore(client=clients["empty"])
            for i in work_sessions:
                empty_store.bind(session_key(i), agent_id(i % agents))
            figures["rehash_seconds"] = None if args.no_rehash_wait else wait_rehashed(loaded_server, timeout=300)
            cases: Dict[Tuple[str, str], Callable[[], object]] = {}
            for where, client in clients.items():
                store = mcp_redis.SessionStore(client=client)
                limiter = mcp_redis.RateLimiter("scale-hot", BIG, 3600, client=client)
                s_iter = iter(range(10**12))
                a_iter = iter(range(10**12))

                def get(store: Any = store, it: Any = s_iter) -> object:
                    return store.get(session_key(work_sessions[next(it) % len(work_sessions)]))

                def hit(limiter: Any = limiter, it: Any = a_iter) -> object:
                    return limiter.hit(work_agents[next(it) % len(work_agents)])

                cases[("SessionStore.get", where)] = get
                cases[("RateLimiter.hit", where)] = hit
                # The keyspace's own cost, without the library: a raw GET of the same bindings.
                server = empty_server if where == "empty" else loaded_server
                raw_client = redis.Redis(host="127.0.0.1", port=server.port)
                tier = sessions_module._current(client).tier  # the binding keys as the store writes them
                raw_keys = [tier.binding_key(session_key(i)) for i in work_sessions]
                r_iter = iter(range(10**12))

                def raw_get(c: Any = raw_client, keys: List[str] = raw_keys, it: Any = r_iter) -> object:
                    return c.get(keys[next(it) % len(keys)])

                cases[(RAW, where)] = raw_get
            for fn in cases.values():  # warm-up
                timed(fn, 500)
            p50: Dict[Tuple[str, str], List[float]] = {k: [] for k in cases}
            p99: Dict[Tuple[str, str], List[float]] = {k: [] for k in cases}
            # The server's own time per call (INFO commandstats of the case's one command, reset
            # before each block and read after it, outside the timed calls).
            stats_of = {"empty": empty_server.client(), "loaded": loaded_server.client()}
            server_usec: Dict[Tuple[str, str], List[float]] = {k: [0.0, 0.0] for k in cases}
            block = 100
            for r in range(args.rounds):
                samples: Dict[Tuple[str, str], List[float]] = {k: [] for k in cases}
                for b in range(max(1, args.calls // block)):
                    order = list(cases.items())
                    if (r + b) % 2:
                        order.reverse()
                    for key, fn in order:
                        stats_of[key[1]].config_resetstat()
                        samples[key].extend(timed(fn, block))
                        entry = stats_of[key[1]].info("commandstats").get(f"cmdstat_{SERVER_COMMAND[key[0]]}", {})
                        server_usec[key][0] += entry.get("usec", 0)
                        server_usec[key][1] += entry.get("calls", 0)
                for key, values in samples.items():
                    p50[key].append(statistics.median(values) * 1e6)
                    p99[key].append(percentile(values, 0.99) * 1e6)
        finally:
            for client in clients.values():
                client.close()

    print(f"redis-server {version} on loopback; loaded server: {sessions:,} session bindings over {agents:,} agents "
          f"+ {agents:,} rate-limit keys ({figures['keys']:,} keys, {figures['used_memory_mb']:,.0f} MiB used_memory)\n")
    print("| load | seconds | per second | INFO memory per entity |")
    print("|---|---:|---:|---:|")
    print(f"| {sessions:,} session bindings ({figures['how']}) | {figures['session_seconds']:.1f} | "
          f"{sessions / figures['session_seconds']:,.0f} | {figures['bytes_per_binding']:,.0f} B per binding "
          f"(indexes included) |")
    print(f"| {agents:,} agents' rate-limit state (RateLimiter.hit, 8 threads) | {figures['rl_seconds']:.1f} | "
          f"{agents / figures['rl_seconds']:,.0f} | {figures['bytes_per_rl_key']:,.0f} B per sliding-window key "
          f"(1 hit) |")
    print(f"\n## Latency, loaded vs empty ({args.rounds} rounds × {args.calls} calls per case, alternating blocks of "
          f"{block}, working set {len(work_sessions):,} sessions / {len(work_agents):,} agents)\n")
    rehash = figures["rehash_seconds"]
    if args.no_rehash_wait:
        print("Timed at once after the load (--no-rehash-wait): the loaded server may still be rehashing.\n")
    else:
        print("Timed once the loaded server's hash tables had been rehashed (the steady state): "
              + (f"{rehash:.1f} s of waiting after the load.\n" if rehash is not None
                 else "not known (DEBUG HTSTATS refused), not waited for.\n"))
    print("| call | empty p50 µs | loaded p50 µs | loaded / empty (p50) | empty p99 µs | loaded p99 µs "
          "| Redis µs per call, empty → loaded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    failed = []
    targeted = ("SessionStore.get", "RateLimiter.hit")  # the target; the raw GET is a baseline
    for name in (*targeted, RAW):
        e, l_ = statistics.median(p50[(name, "empty")]), statistics.median(p50[(name, "loaded")])
        ratio = l_ / e
        if ratio > 1.1 and name in targeted:
            failed.append(name)
        inside = [usec / max(1, calls) for usec, calls in (server_usec[(name, "empty")], server_usec[(name, "loaded")])]
        print(f"| {name} | {e:.1f} | {l_:.1f} | {ratio:.2f}× | {statistics.median(p99[(name, 'empty')]):.1f} | "
              f"{statistics.median(p99[(name, 'loaded')]):.1f} | {inside[0]:.1f} → {inside[1]:.1f} "
              f"({SERVER_COMMAND[name].upper()}) |")
    print(f"\ntarget loaded / empty ≤ 1.10×: {'met' if not failed else 'MISSED for ' + ', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
