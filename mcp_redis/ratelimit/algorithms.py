"""Rate-limit algorithms and the storages that run them (Redis, PostgreSQL, in-process).

Every storage answers one question, `acquire`: "may `cost` units pass every
limit of this (name, key) now, and if so consume them all" — all or nothing,
with remaining / retry-after / reset-after per limit, in one step.

* `RedisStorage` runs one Lua script per algorithm (``mcp_redis/lua/``): one
  round trip, the server clock (``TIME``), each key's TTL set by the same
  script, clamped to at least 1 ms.
* `LocalStorage` and `PostgresStorage` run the Python models below, which
  mirror the scripts line for line. The local one serialises per key with
  striped locks (no process-wide lock); the PostgreSQL one per key with
  ``pg_advisory_xact_lock`` inside one transaction, on the database clock.

Times are integer microseconds throughout; the front (`mcp_redis.ratelimit`)
turns them into float seconds.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import json
import logging
import math
import os
import secrets
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .client import Client, resolve
from .connections import RedisConnection, on_fork
from .errors import BackendUnavailable, InvalidArgument
from .keys import encode_id
from .metrics import METRICS
from .postgres import Postgres

__all__ = [
    "Algorithm",
    "Outcome",
    "Reply",
    "RedisStorage",
    "LocalStorage",
    "PostgresStorage",
    "MODELS",
]

log = logging.getLogger("mcp_redis.ratelimit")

#: One limit as the storages see it: (limit, window in microseconds).
Spec = Tuple[int, int]
#: One limit's outcome: (remaining, retry_after_us, reset_after_us).
Outcome = Tuple[int, int, int]
#: A storage's answer: (allowed, index of the refusing limit or -1, outcomes).
Reply = Tuple[bool, int, List[Outcome]]


class Algorithm(str, enum.Enum):
    """The rate-limiting algorithms; all of them take the same arguments."""

    #: Exact: never more than `limit` in any span of `window` (a log of hits; O(limit) memory).
    SLIDING_WINDOW = "sliding_window"
    #: Approximate, O(1) memory: previous window weighted by overlap + current window.
    SLIDING_WINDOW_COUNTER = "sliding_window_counter"
    #: At most `limit` per window; a window starts at a key's first admitted hit.
    FIXED_WINDOW = "fixed_window"
    #: Token bucket of `limit` tokens refilled evenly over `window` (GCRA, exact refill).
    GCRA = "gcra"
    TOKEN_BUCKET = "gcra"  # noqa: S105 - an alias, not a secret

    @property
    def short(self) -> str:
        """The tag of this algorithm inside key names."""
        return _SHORT[self]


_SHORT = {
    Algorithm.SLIDING_WINDOW: "sw",
    Algorithm.SLIDING_WINDOW_COUNTER: "swc",
    Algorithm.FIXED_WINDOW: "fw",
    Algorithm.GCRA: "gcra",
}


# -- the Python models (mirror mcp_redis/lua/ratelimit_*.lua) --------------------
class _Model:
    """One algorithm over a JSON-able per-limit state.

    `check` looks (never mutates) and returns (view, remaining, retry_us,
    reset_us); `consume` turns the view into the new state and returns
    (state, remaining, reset_us, ttl_us).
    """

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        raise NotImplementedError

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        raise NotImplementedError


class _SlidingWindow(_Model):
    """A sorted list of the microsecond stamps of admitted units."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        log_: List[int] = state or []
        live = log_[bisect.bisect_right(log_, now - window):]
        count = len(live)
        reset = live[-1] + window - now if count else 0
        retry = live[count + cost - limit - 1] + window - now if count + cost > limit else 0
        return live, limit - count, retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        live: List[int] = view
        live.extend([now] * cost)
        return live, limit - len(live), window, window


class _FixedWindow(_Model):
    """``[start_us, count]``: a window opens at the first admitted hit."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        start, count = state if state else (now, 0)
        if now >= start + window:
            start, count = now, 0
        reset = start + window - now if count else 0
        retry = start + window - now if count + cost > limit else 0
        return [start, count], limit - count, retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        start, count = view
        left = start + window - now
        return [start, count + cost], limit - count - cost, left, left


class _SlidingWindowCounter(_Model):
    """``[window_index, current, previous]`` on windows aligned to the clock."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        idx = now // window
        w, c, p = state if state else (idx, 0, 0)
        if w == idx - 1:
            p, c = c, 0
        elif w != idx:
            p, c = 0, 0
        start = idx * window
        est = p * (start + window - now) / window + c
        reset = start + 2 * window - now if c else (start + window - now if p else 0)
        retry = 0
        if est + cost > limit:
            if p > 0 and c + cost <= limit:
                at = start + window * (1 - (limit - c - cost) / p)
            else:
                need = max(0.0, 1 - (limit - cost) / c) if c > 0 else 0.0
                at = start + window + window * need
            retry = max(1, math.ceil(at - now) + 1)
        return [idx, c, p], math.floor(limit - est), retry, reset

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        idx, c, p = view
        start = idx * window
        est = p * (start + window - now) / window + c + cost
        left = start + 2 * window - now
        return [idx, c + cost, p], math.floor(limit - est), left, left


class _GCRA(_Model):
    """``tat_us`` (float): the theoretical arrival time of the next unit."""

    def check(self, state: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        interval = window / limit
        eps = min(1.0, interval / 2)
        tat = max(float(state) if state is not None else now, now)
        new = tat + cost * interval
        retry = max(1, math.ceil(new - window - now)) if new - window > now + eps else 0
        return new, math.floor((now + window - tat + eps) / interval), retry, math.ceil(tat - now)

    def consume(self, view: Any, now: int, limit: int, window: int, cost: int) -> Tuple[Any, int, int, int]:
        interval = window / limit
        eps = min(1.0, interval / 2)
        new = round(float(view), 3)
        left = math.ceil(new - now)
        return new, math.floor((now + window - new + eps) / interval), left, left


MODELS: Dict[Algorithm, _Model] = {
    Algorithm.SLIDING_WINDOW: _SlidingWindow(),
    Algorithm.SLIDING_WINDOW_COUNTER: _SlidingWindowCounter(),
    Algorithm.FIXED_WINDOW: _FixedWindow(),
    Algorithm.GCRA: _GCRA(),
}


def run_model(
    algorithm: Algorithm, states: Sequence[Any], now: int, specs: Sequence[Spec], cost: int, consume: bool
) -> Tuple[Reply, Optional[List[Tuple[Any, int]]]]:
    """All limits at once, all or nothing: the reply and, when consumed, [(state, ttl_us)]."""
    model = MODELS[algorithm]
    views: List[Any] = []
    outcomes: List[Outcome] = []
    refused, worst = -1, -1
    for i, ((limit, window), state) in enumerate(zip(specs, states)):
        view, remaining, retry, reset = model.check(state, now, limit, window, cost)
        views.append(view)
        outcomes.append((remaining, retry, reset))
        if retry > worst and retry > 0:
            worst, refused = retry, i
    if refused >= 0 or not consume:
        return (refused < 0, refused, outcomes), None
    written: List[Tuple[Any, int]] = []
    for i, ((limit, window), view) in enumerate(zip(specs, views)):
        state, remaining, reset, ttl = model.consume(view, now, limit, window, cost)
        outcomes[i] = (remaining, 0, reset)
        written.append((state, max(1000, ttl)))
    return (True, -1, outcomes), written


# -- Redis ------------------------------------------------------------------------
class RedisStorage:
    """The Lua scripts from the client's `ScriptSet` (redis-py reloads on NOSCRIPT)."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self._scripts = {a: conn.script(f"ratelimit_{a.value}") for a in MODELS}

    def acquire(
        self, algorithm: Algorithm, keys: Sequence[str], flat_specs: Sequence[Union[int, str]], cost: int,
        consume: bool, now_us: Optional[int] = None,
    ) -> Reply:
        """One EVALSHA: the verdict and every limit's figures.

        The first attempt skips tenacity's per-call setup (~18 us, a quarter
        of a loopback round trip); a transient failure then gets the full
        retry policy. `BackendUnavailable` when Redis stays unreachable.
        """
        script = self._scripts[algorithm]
        # Few arguments on purpose: each costs the client ~1 us to pack.
        args: List[Union[int, str]] = [cost if consume else -cost, *flat_specs]
        if algorithm is Algorithm.SLIDING_WINDOW:
            args.append(_nonce())
        if now_us is not None:
            args.append(now_us)
        raw = self.conn.policy.call(self.conn.run_script, script, keys, args)
        f = raw.split()
        if len(f) == 5:  # one limit, the common case
            return f[0] == "1", int(f[1]) - 1, [(int(f[2]), int(f[3]), int(f[4]))]
        n = [int(x) for x in f]
        return n[0] == 1, n[1] - 1, [(n[j], n[j + 1], n[j + 2]) for j in range(2, len(n), 3)]

    def clear(self, keys: Sequence[str]) -> None:
        """Delete the keys (one slot: they share a hash tag)."""
        self.conn.call(self.conn.client.delete, *keys)


_caller = ""
_calls = itertools.count()


def _nonce() -> str:
    """Unique per process and call: names sliding-window log entries (no collisions)."""
    return f"{_caller}{next(_calls)}"


@on_fork
def _new_caller() -> None:
    global _caller
    _caller = f"{secrets.token_hex(6)}.{os.getpid()}."


_new_caller()


# -- in-process -------------------------------------------------------------------
_STRIPES = 64


class LocalStorage:
    """Per-process state behind 64 striped locks: threads on different keys never wait on each other.

    Memory stays bounded by `maxsize` entries (``maxsize / 64`` per stripe),
    and the bound never re-admits anyone: only entries whose window has
    passed are dropped (every 256 writes, and whenever a stripe is full).
    When a stripe is full of live state, a key that has no state yet is
    refused (the safe side) until an entry expires, and the refusal is
    counted in ``ratelimit_local_full_total{limiter}``. Keys that already
    have state are counted as usual.
    """

    def __init__(self, maxsize: int = 100_000) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < _STRIPES:
            raise InvalidArgument("maxsize", f"must be an int >= {_STRIPES}, got {maxsize!r}")
        self.maxsize = maxsize
        # The stripes' shares add up to `maxsize` exactly.
        self._room = [maxsize // _STRIPES + (i < maxsize % _STRIPES) for i in range(_STRIPES)]
        self._locks = [threading.Lock() for _ in range(_STRIPES)]
        self._shards: List[Dict[Tuple[str, ...], Tuple[Any, int]]] = [{} for _ in range(_STRIPES)]
        self._writes = [0] * _STRIPES
        # Per stripe: no entry expires before this (a full stripe is swept only once one can go).
        self._next_expiry = [0] * _STRIPES
        self._warned_full = False

    @staticmethod
    def now_us() -> int:
        """The local clock: monotonic, so wall-clock jumps do not free or block anyone."""
        return time.monotonic_ns() // 1000

    def acquire(
        self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec], cost: int,
        consume: bool, now_us: Optional[int] = None,
    ) -> Reply:
        """Check (and consume) every limit of (name, key) under that key's stripe lock."""
        stripe = zlib.crc32(f"{name}\0{key}".encode("utf-8", "surrogatepass")) % _STRIPES
        ids = [(algorithm.value, name, key, str(window)) for _, window in specs]
        with self._locks[stripe]:
            now = self.now_us() if now_us is None else now_us
            shard = self._shards[stripe]
            states = []
            new = 0
            for ident in ids:
                item = shard.get(ident)
                if item is None:
                    new += 1
                states.append(item[0] if item is not None and item[1] > now else None)
            if new and len(shard) + new > self._room[stripe]:
                if self._next_expiry[stripe] <= now:
                    self._sweep(stripe, now)
                if len(shard) + new > self._room[stripe]:
                    return self._full(name, stripe, now, specs, consume)
            reply, written = run_model(algorithm, states, now, specs, cost, consume)
            if written:
                for ident, (state, ttl) in zip(ids, written):
                    shard[ident] = (state, now + ttl)
                    if now + ttl < self._next_expiry[stripe]:
                        self._next_expiry[stripe] = now + ttl
                self._writes[stripe] += 1
                if self._writes[stripe] >= 256:
                    self._sweep(stripe, now)
        return reply

    def _full(self, name: str, stripe: int, now: int, specs: Sequence[Spec], consume: bool) -> Reply:
        """The refusal of a new key while its stripe is full of live state
        (a peek answers the same, uncounted).

        ``retry_after`` is the time until the stripe's next entry expires
        (then a sweep frees a place).
        """
        retry = max(1, self._next_expiry[stripe] - now)
        if not consume:
            return False, 0, [(0, retry, 0) for _ in specs]
        METRICS.inc("ratelimit_local_full_total", limiter=name)
        if not self._warned_full:
            self._warned_full = True
            log.warning("rate limiting: the in-process limiter is full of live state (%d entries); "
                        "refusing keys it has no room for until entries expire", self.maxsize)
        return False, 0, [(0, retry, 0) for _ in specs]

    def _sweep(self, stripe: int, now: int) -> None:
        """Drop the stripe's entries whose window has passed (never a live one)."""
        shard = self._shards[stripe]
        self._writes[stripe] = 0
        earliest = 1 << 62
        for ident in list(shard):
            expiry = shard[ident][1]
            if expiry <= now:
                del shard[ident]
            elif expiry < earliest:
                earliest = expiry
        self._next_expiry[stripe] = earliest

    def clear(self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec]) -> None:
        stripe = zlib.crc32(f"{name}\0{key}".encode("utf-8", "surrogatepass")) % _STRIPES
        with self._locks[stripe]:
            for _, window in specs:
                self._shards[stripe].pop((algorithm.value, name, key, str(window)), None)

    def ttls_us(self) -> List[int]:
        """Microseconds left of every entry (tests: every entry expires)."""
        now = self.now_us()
        out: List[int] = []
        for lock, shard in zip(self._locks, self._shards):
            with lock:
                out.extend(exp - now for _, exp in shard.values())
        return out


_LOCAL_STORAGE = "ratelimit.local_storage"


def local_storage(client: Optional[Client] = None) -> LocalStorage:
    """The client's in-process limiter (local mode and the Redis-down fallback).

    One per client and process (`Client.singleton`), bounded by the client's
    ``rate_limit_local_maxsize``; `reset()`/`configure()` start a new one.
    """
    c = resolve(client)
    return c.singleton(_LOCAL_STORAGE, lambda: LocalStorage(c.settings.rate_limit_local_maxsize))


# -- PostgreSQL -------------------------------------------------------------------
_PG_LOCK_AND_CLOCK = (
    "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint "
    "FROM (SELECT pg_advisory_xact_lock(hashtextextended(%s, 7477)) AS locked) AS l"
)
_PG_READ = (
    "SELECT window_us, state FROM audit.rate_limits "
    "WHERE name = %s AND rate_key = %s AND algorithm = %s AND expires_at > clock_timestamp()"
)
_PG_WRITE = (
    "INSERT INTO audit.rate_limits (name, rate_key, algorithm, window_us, state, expires_at) "
    "VALUES (%s, %s, %s, %s, %s, to_timestamp(%s / 1000000.0)) "
    "ON CONFLICT (name, rate_key, algorithm, window_us) DO UPDATE SET "
    "state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, updated_at = clock_timestamp()"
)
_PG_SWEEP = "DELETE FROM audit.rate_limits WHERE expires_at < clock_timestamp() - interval '1 minute'"


class PostgresStorage:
    """`audit.rate_limits`: one transaction per hit, serialised per (name, key).

    ``pg_advisory_xact_lock`` on the (name, key) hash makes read-check-write
    atomic across every process and host (exact under concurrency, every
    algorithm, all or nothing over several limits); the clock is the
    database's ``clock_timestamp()``. Rows carry ``expires_at``: expired rows
    are ignored and swept every 1,000 writes of a process.
    """

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg
        self._writes = 0

    def acquire(
        self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec], cost: int, consume: bool
    ) -> Reply:
        self.pg.ensure_schema()
        reply: Reply = self.pg.policy.call(self._transaction, algorithm, name, key, specs, cost, consume)
        if consume and reply[0]:
            self._writes += 1
            if self._writes >= 1000:
                self._writes = 0
                try:
                    self.pg.execute(_PG_SWEEP)
                except BackendUnavailable:  # pragma: no cover - next sweep will do
                    pass
        return reply

    def _transaction(
        self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec], cost: int, consume: bool
    ) -> Reply:
        # Encoded ids: injective, and free of NUL, which TEXT cannot hold.
        name, key = encode_id(name), encode_id(key)
        with self.pg.connection() as conn, conn.cursor() as cur:
            cur.execute(_PG_LOCK_AND_CLOCK, (f"{name}:{key}",))
            row = cur.fetchone()
            assert row is not None
            now = int(row[0])
            cur.execute(_PG_READ, (name, key, algorithm.value))
            found = {int(w): s for w, s in cur.fetchall()}
            states = [found.get(window) for _, window in specs]
            reply, written = run_model(algorithm, states, now, specs, cost, consume)
            if written:
                cur.executemany(_PG_WRITE, [
                    (name, key, algorithm.value, window, json.dumps(state), now + ttl)
                    for (_, window), (state, ttl) in zip(specs, written)
                ])
        return reply

    def clear(self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec]) -> None:
        name, key = encode_id(name), encode_id(key)
        self.pg.execute(
            "DELETE FROM audit.rate_limits WHERE name = %s AND rate_key = %s AND algorithm = %s "
            "AND window_us = ANY(%s)",
            (name, key, algorithm.value, [window for _, window in specs]),
        )

