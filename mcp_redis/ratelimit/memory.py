"""The in-process rate-limit backend ("local" in settings): state in this process only.

It runs the Python models of the Lua scripts (`mcp_redis.ratelimit.algorithms`)
on a monotonic clock, serialised per key by 64 striped locks (no
process-wide lock), with a bound on memory that never re-admits anyone.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from ..errors import InvalidArgument
from ..metrics import METRICS
from .algorithms import refund_model, run_model
from .base import Outcome, Policy, Reply, Spec, granted

__all__ = ["MemoryBackend"]

log = logging.getLogger("mcp_redis.ratelimit")

_STRIPES = 64


class MemoryBackend:
    """Per-process state behind 64 striped locks: threads on different keys never wait on each other.

    Memory stays bounded by `maxsize` entries (``maxsize / 64`` per stripe),
    and the bound never re-admits anyone: only entries whose window has
    passed are dropped (every 256 writes, and whenever a stripe is full).
    When a stripe is full of live state, a key that has no state yet is
    refused (the safe side) until an entry expires, and the refusal is
    counted in ``ratelimit_local_full_total{limiter}``. Keys that already
    have state are counted as usual.

    The backend of local mode (``MCP_REDIS_RATE_LIMITS=local``) and of the
    ``local`` fallback; one per client (`Client.singleton`), bounded by the
    client's ``rate_limit_local_maxsize``.
    """

    name = "local"
    errors: Tuple[Type[BaseException], ...] = ()  # it always answers

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

    def acquire(self, policy: Policy, key: str, cost: int, consume: bool, now_us: Optional[int] = None) -> Reply:
        """Check (and consume) every limit of (name, key) under that key's stripe lock."""
        algorithm, name, specs = policy.algorithm, policy.name, policy.specs
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
                reply = granted(reply, now)
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
            return Reply(False, 0, [Outcome(0, retry, 0) for _ in specs])
        METRICS.inc("ratelimit_local_full_total", limiter=name)
        if not self._warned_full:
            self._warned_full = True
            log.warning("rate limiting: the in-process limiter is full of live state (%d entries); "
                        "refusing keys it has no room for until entries expire", self.maxsize)
        return Reply(False, 0, [Outcome(0, retry, 0) for _ in specs])

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

    def refund(self, policy: Policy, key: str, cost: int, reply: Reply, elapsed_us: int) -> bool:
        """`refund_model` under the key's stripe lock; the hit's clock reading is the ticket."""
        algorithm, name, specs = policy.algorithm, policy.name, policy.specs
        hit_us = getattr(reply, "ticket", None)
        if hit_us is None:
            return False
        stripe = zlib.crc32(f"{name}\0{key}".encode("utf-8", "surrogatepass")) % _STRIPES
        ids = [(algorithm.value, name, key, str(window)) for _, window in specs]
        with self._locks[stripe]:
            now = self.now_us()
            shard = self._shards[stripe]
            items = [shard.get(ident) for ident in ids]
            states = [item[0] if item is not None and item[1] > now else None for item in items]
            changed = refund_model(algorithm, states, now, specs, cost, hit_us,
                                   [o.reset_after_us for o in reply.outcomes])
            done = False
            for ident, item, new in zip(ids, items, changed):
                if new is None or item is None:
                    continue
                done = True
                state, ttl = new
                if state is None:
                    del shard[ident]
                else:
                    shard[ident] = (state, item[1] if ttl is None else now + ttl)
        return done

    def clear_all(self, policy: Policy) -> None:
        """Forget every key's state of the limiter (all stripes)."""
        for lock, shard in zip(self._locks, self._shards):
            with lock:
                for ident in [i for i in shard if i[0] == policy.algorithm.value and i[1] == policy.name]:
                    del shard[ident]

    def clear(self, policy: Policy, key: str) -> None:
        """Forget the key's state of every limit of `policy`."""
        algorithm, name, specs = policy.algorithm, policy.name, policy.specs
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
