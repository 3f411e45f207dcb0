"""Redis memory per entity: mcp_redis's layouts beside the naive ones and the peers'.

    python -m bench.bench_memory [--n 20000] [--rl-keys 2000] [--rl-keys-big 40] [--only sessions,locks,ratelimit,cache]
                                 [--one-window]
    python -m bench.bench_memory --quick      # n=2,000, 500 / 10 rate-limit keys, one window: ~2 min

Starts its own redis-server (mcp_redis.testing.RedisServer). Every case runs
on an emptied server (FLUSHALL, after one warm-up entity so script caches and
connections are in place) and creates its entities through the library's own
API; then two figures per entity:

* ``INFO memory``: the delta of ``used_memory`` less the clients' buffers and
  the script cache, over the case / entities: what the server really spends
  on the data, key table and shared indexes included;
* ``MEMORY USAGE`` (``SAMPLES 0``: every element counted) summed over every
  key the case wrote / entities.

Entities: a session binding (with its indexes: 1 session per agent and 10
sessions per agent), a held lock (with the process's liveness key; with and
without its fencing counter, written when a token is drawn), a rate-limit key per algorithm at 20/hour and at 1,000/minute
filled to the limit (logs one hit at a time, so they hold one member per hit;
counters and GCRA with one hit of cost = limit, which leaves the same state;
and the sliding-window counters in their steady state too, with a count in
the previous window and one in this: ~1 minute a layout, `--one-window`
skips it), and
a cached metadata entry (~300 B of JSON). Beside them: the naive layouts (SETEX
of the agent id, SET NX PX of a token, INCR + EXPIRE, SETEX of the JSON) and
the peers' (limits, pyrate-limiter, throttled-py, redis-py Lock,
python-redis-lock, dogpile.cache), ratios against both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import redis

import mcp_redis
from bench.common import Missing, limits_strategy
from mcp_redis.testing import RedisServer

DOC: Dict[str, Any] = {  # ~300 B of JSON: an agent's metadata entry
    "agent_id": "3f0c9f7e-8a53-4c1e-9d59-1b7f0a2c6e41",
    "status": "active",
    "tags": ["planner", "retrieval", "eu-west"],
    "metrics": {f"m{i}": i * 1.5 for i in range(12)},
    "notes": "x" * 60,
}
# (label, limit, window seconds)
RATE_LIMITS = [("20/h", 20, 3600), ("1,000/min", 1000, 60)]

Row = Dict[str, Any]
# Redis refreshes its per-client memory figures in clientsCron (every client within a second at hz 10):
# reading INFO sooner would leave a connection's buffers in or out of the delta.
SETTLE = 1.1


def _used(admin: Any) -> int:
    """``used_memory`` less the clients' buffers and the script cache: the data's own share."""
    info = admin.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0)) - int(info.get("used_memory_scripts", 0))


def measure(server: RedisServer, label: str, group: str, entities: int,
            make: Callable[[], Callable[[int], object]], threads: int = 1, warm: bool = True,
            next_window: int = 0) -> Row:
    """Create `entities` entities with ``make()(i)`` on an emptied server and measure them.

    With `next_window` (seconds), ``make()(i)`` runs twice per entity: early in
    a window of that length on the server's clock, then again once every key
    the first pass wrote is more than a window old (the steady state of a
    counter that keeps a previous window's count).
    """
    admin = server.client()
    try:
        create = make()
    except Missing as exc:
        return {"label": label, "group": group, "status": f"{exc} not installed"}
    if warm:
        create(-1)  # warm-up: scripts loaded, connections open, lazily built objects in place
    admin.flushall()
    time.sleep(SETTLE)
    before = _used(admin)
    started = time.perf_counter()

    def fill() -> None:
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(create, range(entities), chunksize=64))
        else:
            for i in range(entities):
                create(i)

    if next_window:
        seconds, micros = admin.time()
        into = (seconds + micros / 1e6) % next_window
        if into > next_window / 4:  # start in the window's first quarter: the second pass lands in the next one
            time.sleep(next_window - into + 0.2)
        fill()
        time.sleep(next_window + 0.5)
    fill()
    elapsed = time.perf_counter() - started
    time.sleep(SETTLE)
    after = _used(admin)
    usage = 0
    keys = 0
    raw = redis.Redis(host=server.host, port=server.port)
    batch: List[bytes] = []

    def flush() -> int:
        with raw.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.memory_usage(key, samples=0)
            total = sum(v or 0 for v in pipe.execute())
        batch.clear()
        return total

    for key in raw.scan_iter(count=1000):
        keys += 1
        batch.append(key)
        if len(batch) >= 1000:
            usage += flush()
    if batch:
        usage += flush()
    return {"label": label, "group": group, "status": "ok", "entities": entities, "keys": keys,
            "info_bytes": (after - before) / entities, "usage_bytes": usage / entities, "seconds": elapsed}


# -- sessions -------------------------------------------------------------------------------
def session_cases(server: RedisServer, n: int) -> List[Row]:
    sids = [uuid.UUID(int=i + 1).hex for i in range(n)]
    agents = [str(uuid.UUID(int=(i + 1) << 64)) for i in range(n)]
    raw = redis.Redis(host=server.host, port=server.port, decode_responses=True)
    store = mcp_redis.SessionStore()
    rows = [measure(server, "naive: SETEX session:<32 hex> <uuid>", "session", n,
                    lambda: lambda i: raw.setex(f"session:{sids[i]}", 3600, agents[i]))]

    def bind(per_agent: int, **extra: Any) -> Callable[[], Callable[[int], object]]:
        def make() -> Callable[[int], object]:
            def one(i: int) -> object:
                if i < 0:
                    return store.bind("warm-up", "warm-up-agent", **extra)
                return store.bind(sids[i], agents[i // per_agent], **extra)
            return one
        return make

    rows.append(measure(server, "SessionStore.bind, 1 session per agent", "session", n, bind(1)))
    rows.append(measure(server, "SessionStore.bind, 10 sessions per agent", "session", n, bind(10)))
    # A record with two caller fields (the library keeps bound_at, bind_count, last_active itself).
    fields = {"client_type": "claude-desktop", "client_info": {"model": "opus"}}
    rows.append(measure(server, "SessionStore.bind with 2 caller fields, 1 session per agent", "session", n,
                        bind(1, **fields)))
    return rows


# -- locks ----------------------------------------------------------------------------------------
def lock_cases(server: RedisServer, n: int) -> List[Row]:
    raw = redis.Redis(host=server.host, port=server.port)
    names = [f"agent-{uuid.UUID(int=i + 1)}" for i in range(n)]
    held: List[Any] = []

    def name(i: int) -> str:
        return "warm-up" if i < 0 else names[i]

    def ours(fencing: bool) -> Callable[[], Callable[[int], object]]:
        def build() -> Callable[[int], object]:
            def one(i: int) -> object:
                lk = mcp_redis.lock(name(i), timeout=600, fencing=fencing)
                assert lk.acquire(blocking=False)
                held.append(lk)
                return lk
            return one
        return build

    def redis_py() -> Callable[[int], object]:
        def one(i: int) -> object:
            lk = raw.lock(name(i), timeout=600)
            assert lk.acquire(blocking=False)
            return lk
        return one

    def prl() -> Callable[[int], object]:
        try:
            import redis_lock
        except ImportError as exc:
            raise Missing("python-redis-lock") from exc

        def one(i: int) -> object:
            lk = redis_lock.Lock(raw, name(i), expire=600)
            assert lk.acquire(blocking=False)
            return lk
        return one

    token = uuid.uuid4().hex
    rows = [
        measure(server, "naive: SET <name> <token> NX PX", "lock", n,
                lambda: lambda i: raw.set(name(i), token, nx=True, px=600_000)),
        measure(server, "mcp_redis.lock held (liveness key; token not drawn)", "lock", n, ours(False)),
        measure(server, "mcp_redis.lock(fencing=True) held (+ fencing counter)", "lock", n, ours(True)),
        measure(server, "redis-py Lock held", "lock", n, redis_py),
        measure(server, "python-redis-lock held", "lock", n, prl),
    ]
    held.clear()
    return rows


# -- rate limits --------------------------------------------------------------------------------------
def ratelimit_makers(server: RedisServer, algorithm: str, limit: int,
                     window: int) -> List[Tuple[str, Callable[[], Callable[[str], object]]]]:
    """(label, make) of each layout of `algorithm`; make() -> hit(key)."""
    url = f"redis://127.0.0.1:{server.port}/0"
    out: List[Tuple[str, Callable[[], Callable[[str], object]]]] = []

    def ours() -> Callable[[str], object]:
        # A one-letter limiter name: the peers' keys carry no caller-chosen name
        # (only their own fixed prefix), so bytes compare like for like; each
        # character of a longer name adds a byte per key (and may cross a
        # jemalloc size class, 16 B).
        limiter = mcp_redis.RateLimiter("m", limit, window, algorithm=mcp_redis.Algorithm(algorithm))
        return lambda key, cost=1: limiter.hit(key, cost=cost)

    out.append((f"mcp_redis {algorithm}", ours))

    def limits_peer(kind: str) -> Callable[[], Callable[[str], object]]:
        def make() -> Callable[[str], object]:
            from limits import RateLimitItemPerHour, RateLimitItemPerMinute  # limits_strategy checked it is there

            strategy = limits_strategy(kind, url)
            item = RateLimitItemPerHour(limit) if window == 3600 else RateLimitItemPerMinute(limit)
            return lambda key, cost=1: strategy.hit(item, key, cost=cost)
        return make

    def throttled_peer(using: str) -> Callable[[], Callable[[str], object]]:
        def make() -> Callable[[str], object]:
            try:
                import throttled
            except ImportError as exc:
                raise Missing("throttled-py") from exc
            quota = throttled.per_hour(limit) if window == 3600 else throttled.per_min(limit)
            limiter = throttled.Throttled(using=using, quota=quota, store=throttled.RedisStore(server=url))
            return lambda key, cost=1: limiter.limit(key, cost=cost)
        return make

    def pyrate_peer(kind: str) -> Callable[[], Callable[[str], object]]:
        def make() -> Callable[[str], object]:
            try:
                import pyrate_limiter as pl
            except ImportError as exc:
                raise Missing("pyrate-limiter") from exc
            plain = redis.Redis(host=server.host, port=server.port)
            rates = [pl.Rate(limit, pl.Duration.HOUR if window == 3600 else pl.Duration.MINUTE)]
            limiters: Dict[str, Any] = {}

            def hit(key: str, cost: int = 1) -> object:
                lim = limiters.get(key)
                if lim is None:
                    bucket = (pl.RedisBucket.init(rates, plain, f"pyrate:{key}") if kind == "log"
                              else pl.StateBucket(rates, store=pl.RedisStateStore(plain, f"pyrate-gcra:{key}")))
                    lim = limiters[key] = pl.Limiter(bucket)
                return lim.try_acquire(key, weight=cost, blocking=False)
            return hit
        return make

    if algorithm == "sliding_window":
        out += [("limits moving window", limits_peer("moving")), ("pyrate-limiter RedisBucket (log)", pyrate_peer("log"))]
    elif algorithm == "fixed_window":
        out += [("limits fixed window", limits_peer("fixed")), ("throttled-py fixed_window", throttled_peer("fixed_window"))]
        plain = redis.Redis(host=server.host, port=server.port)

        def naive() -> Callable[[str], object]:
            def hit(key: str, cost: int = 1) -> object:
                with plain.pipeline(transaction=False) as pipe:
                    pipe.incrby("rl:" + key, cost)
                    pipe.expire("rl:" + key, window)
                    return pipe.execute()
            return hit
        out.insert(0, ("naive: INCR + EXPIRE", naive))
    elif algorithm == "sliding_window_counter":
        out += [("limits sliding window counter", limits_peer("swc")),
                ("throttled-py sliding_window (counter)", throttled_peer("sliding_window"))]
    elif algorithm == "gcra":
        out += [("throttled-py gcra", throttled_peer("gcra")), ("pyrate-limiter GCRA state", pyrate_peer("gcra"))]
    return out


def ratelimit_cases(server: RedisServer, keys_small: int, keys_big: int, threads: int,
                    two_windows: bool = True) -> List[Row]:
    rows: List[Row] = []
    for algorithm in ("sliding_window", "fixed_window", "sliding_window_counter", "gcra"):
        for rate_label, limit, window in RATE_LIMITS:
            log = algorithm == "sliding_window"  # a log holds one member per hit: filled hit by hit
            keys = keys_big if log and limit > 100 else keys_small
            for label, make_hit in ratelimit_makers(server, algorithm, limit, window):
                def make(make_hit: Callable[..., Callable[..., object]] = make_hit, limit: int = limit,
                         log: bool = log) -> Callable[[int], object]:
                    hit = make_hit()

                    def fill(i: int) -> object:
                        key = "warm-up" if i < 0 else f"agent-{uuid.UUID(int=i + 1)}"
                        if not log:  # a counter or a TAT: one hit of cost=limit leaves the state `limit` hits leave
                            return hit(key, limit)
                        for _ in range(limit if i >= 0 else 1):
                            hit(key)
                        return None
                    return fill
                row = measure(server, f"{label} at {rate_label}, full", f"{algorithm} {rate_label}", keys, make,
                              threads=threads)
                rows.append(row)
    if two_windows:
        rows += two_window_cases(server, keys_small, threads)
    return rows


def two_window_cases(server: RedisServer, keys: int, threads: int) -> List[Row]:
    """Sliding-window counters in their steady state: a count in the previous window and one in this.

    At 1,000/minute (an hour's window would need an hour's wait): half the
    limit early in one window, a quarter in the next (admitted: at most
    500 × share + 250). Each layout waits a window: ~1 minute a case.
    """
    rows: List[Row] = []
    limit, window, rate_label = 1000, 60, "1,000/min"
    for label, make_hit in ratelimit_makers(server, "sliding_window_counter", limit, window):
        def make(make_hit: Callable[..., Callable[..., object]] = make_hit) -> Callable[[int], object]:
            hit = make_hit()
            passes: Dict[int, int] = {}

            def fill(i: int) -> object:
                key = "warm-up" if i < 0 else f"agent-{uuid.UUID(int=i + 1)}"
                n = passes[i] = passes.get(i, 0) + 1  # each i is filled by one thread at a time
                return hit(key, limit // 2 if n == 1 else limit // 4)
            return fill
        rows.append(measure(server, f"{label} at {rate_label}, two windows", f"sliding_window_counter {rate_label} "
                            "steady", keys, make, threads=threads, next_window=window))
    return rows


# -- cache ----------------------------------------------------------------------------------------------
def cache_cases(server: RedisServer, n: int) -> List[Row]:
    raw = redis.Redis(host=server.host, port=server.port)
    text = json.dumps(DOC)
    ids = [f"agent-{uuid.UUID(int=i + 1)}" for i in range(n)]

    def ours() -> Callable[[int], object]:
        @mcp_redis.cached_metadata(namespace="mem", ttl=300, maxsize=1)
        def load(agent_id: str) -> Dict[str, Any]:
            return DOC
        return lambda i: load("warm-up" if i < 0 else ids[i])

    def dogpile() -> Callable[[int], object]:
        try:
            from dogpile.cache import make_region
        except ImportError as exc:
            raise Missing("dogpile.cache") from exc
        region = make_region(serializer=lambda v: json.dumps(v).encode("utf-8"), deserializer=json.loads).configure(
            "dogpile.cache.redis", expiration_time=300,
            arguments={"url": f"redis://127.0.0.1:{server.port}/0", "redis_expiration_time": 330})
        return lambda i: region.get_or_create("warm-up" if i < 0 else ids[i], lambda: DOC)

    return [
        measure(server, f"naive: SETEX <id> <{len(text)} B JSON>", "cache", n,
                lambda: lambda i: raw.setex("meta:" + ("warm-up" if i < 0 else ids[i]), 300, text)),
        measure(server, "cached_metadata entry (L2)", "cache", n, ours),
        measure(server, "dogpile.cache redis region (JSON)", "cache", n, dogpile),
    ]


def print_rows(rows: List[Row]) -> None:
    print("| group | layout | entities | keys | INFO used_memory B/entity | MEMORY USAGE B/entity | "
          "× naive (INFO) | × best peer (INFO / MEMORY USAGE) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for group, members in groups.items():
        ok = [r for r in members if r["status"] == "ok"]
        naive = next((r for r in ok if r["label"].startswith("naive")), None)
        # A peer whose keys expired during a slow fill (fewer keys than entities:
        # pyrate-limiter's short GCRA TTLs, with a thread per limiter) holds
        # less than its layout costs: shown, not compared.
        peers = [r for r in ok if not r["label"].startswith(("naive", "mcp_redis", "SessionStore", "cached_metadata"))
                 and r["keys"] >= r["entities"]]
        best = min(peers, key=lambda r: r["usage_bytes"]) if peers else None  # the leanest peer
        for r in members:
            if r["status"] != "ok":
                print(f"| {group} | {r['label']} | — | — | — | — | {r['status']} | |")
                continue
            ours = r["label"].startswith(("mcp_redis", "SessionStore", "cached_metadata"))
            vs_naive = f"{r['info_bytes'] / naive['info_bytes']:.2f}×" if naive and r is not naive else ""
            vs_peer = (f"{r['info_bytes'] / best['info_bytes']:.2f}× / {r['usage_bytes'] / best['usage_bytes']:.2f}×"
                       if best and ours else "")
            label = f"**{r['label']}**" if ours else r["label"]
            if r["keys"] < r["entities"]:
                label += f" ({r['entities'] - r['keys']:,} keys expired during the fill: not compared)"
            print(f"| {group} | {label} | {r['entities']:,} | {r['keys']:,} | {r['info_bytes']:,.0f} | "
                  f"{r['usage_bytes']:,.0f} | {vs_naive} | {vs_peer} |")
            if best is not None and ours:
                r["vs_peer"] = best["label"]
                r["peer_ratio"] = r["info_bytes"] / best["info_bytes"]
                r["peer_usage_ratio"] = r["usage_bytes"] / best["usage_bytes"]
            if naive is not None and r is not naive:
                r["naive_ratio"] = r["info_bytes"] / naive["info_bytes"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="sessions, locks and cache entries per case")
    parser.add_argument("--rl-keys", type=int, default=2000, help="rate-limit keys per case at 20/h")
    parser.add_argument("--rl-keys-big", type=int, default=40, help="rate-limit keys per case at 1,000/min")
    parser.add_argument("--threads", type=int, default=4, help="threads filling rate-limit keys")
    parser.add_argument("--only", default="", help="comma-separated: sessions, locks, ratelimit, cache")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--quick", action="store_true", help="n=2,000; 500 and 10 rate-limit keys; one window only")
    parser.add_argument("--one-window", action="store_true",
                        help="skip the sliding-window counters' two-window cases (they wait a minute each)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.rl_keys, args.rl_keys_big, args.one_window = 2000, 500, 10, True
    for flag in ("n", "rl_keys", "rl_keys_big", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    wanted = {w.strip() for w in args.only.split(",") if w.strip()} or {"sessions", "locks", "ratelimit", "cache"}
    unknown = wanted - {"sessions", "locks", "ratelimit", "cache"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    rows: List[Row] = []
    with RedisServer() as server:
        mcp_redis.configure(redis_url=server.url)
        version = server.client().info("server")["redis_version"]
        try:
            if "sessions" in wanted:
                rows += session_cases(server, args.n)
            if "locks" in wanted:
                rows += lock_cases(server, args.n)
            if "ratelimit" in wanted:
                rows += ratelimit_cases(server, args.rl_keys, args.rl_keys_big, args.threads,
                                        two_windows=not args.one_window)
            if "cache" in wanted:
                rows += cache_cases(server, args.n)
        finally:
            mcp_redis.reset(configuration=True)
    print(f"redis-server {version}, 64-bit, on loopback; each case on an emptied server; "
          f"INFO memory: delta of used_memory less client buffers and script cache / entities; MEMORY USAGE: SAMPLES 0 over every key / entities\n")
    print_rows(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"redis_version": version, "rows": rows}, f, indent=1)
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
