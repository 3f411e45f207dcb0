"""The outage replayer of write-through sessions (one per client).

Rows written to the source of truth while Redis was unreachable are flagged
pending; `Replayer.note_outage` starts a daemon thread that waits for Redis
(a PING gate: no PostgreSQL work while Redis is down) and writes them back in
batches. `replay_pending` does the same synchronously (``mcp-redis sessions
cleanup``). A sweeper thread replays rows other processes left pending (one
cut off from Redis while this one is not, or one that died first) every
`SWEEP_EVERY` seconds. Closing the client stops both.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Optional, Sequence

from ..errors import BackendUnavailable, ConfigurationError
from ..metrics import METRICS
from .base import Pending, Source
from .redis import RedisTier

__all__ = ["Replayer"]

log = logging.getLogger("mcp_redis.sessions")

REPLAY_BATCH = 500
REPLAY_POLL = 0.2  # seconds between replay attempts while Redis is still down
#: Seconds between two sweeps for rows another process left pending: one that
#: cannot reach Redis while this one can (a partition of one host), or one that
#: died first. Until a sweep, others' reads may still get the old binding from
#: Redis. Each sweep is one PING and one indexed PostgreSQL query.
SWEEP_EVERY = 5.0


class Replayer:
    """Writes pending rows of `source` back to `tier`, in the background after an outage."""

    def __init__(self, tier: RedisTier, source: Source, default_ttl: float) -> None:
        self.tier = tier
        self.source = source
        self.default_ttl = default_ttl
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._generation = 0
        self._thread: Optional[threading.Thread] = None
        self._sweeper: Optional[threading.Thread] = None

    def start_sweeping(self) -> None:
        """Replay rows other processes left pending every `SWEEP_EVERY` seconds (a daemon thread)."""
        with self._lock:
            if self._stop.is_set() or (self._sweeper is not None and self._sweeper.is_alive()):
                return
            # A weak reference: a client dropped without close() takes its sweeper with it
            # (collected, the replayer sets the stop event: the thread ends at once).
            weakref.finalize(self, self._stop.set)
            self._sweeper = threading.Thread(target=_sweep, args=(weakref.ref(self), self._stop),
                                             name="mcp_redis-session-sweep", daemon=True)
            self._sweeper.start()

    def sweep(self) -> None:
        """One sweep: replay rows flagged pending, if Redis answers."""
        tier = self.tier
        if not tier.conn.policy.available:
            return  # Redis known down: the outage replayer has it
        try:
            tier.call(tier.client.ping)  # no PostgreSQL work unless Redis answers
            self.replay_pending()
        except Exception as exc:  # the next sweep tries again
            log.debug("session sweep failed: %s", type(exc).__name__)

    def note_outage(self) -> None:
        """Rows were flagged pending: make sure this client replays them when Redis returns."""
        with self._lock:
            self._generation += 1
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._loop, name="mcp_redis-session-replay", daemon=True)
            self._thread.start()

    @property
    def replaying(self) -> bool:
        """True while this client has rows to write back to Redis."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _loop(self) -> None:
        tier = self.tier
        pause = REPLAY_POLL
        refused = False
        while not self._stop.is_set():
            with self._lock:
                generation = self._generation
            try:
                tier.call(tier.client.ping)  # cheap gate: no PostgreSQL work while Redis is down
                self.replay_pending()
            except BackendUnavailable:
                self._stop.wait(pause)
                pause = min(pause * 1.5, 2.0)
                continue
            except ConfigurationError as exc:  # only the operator can fix it: one line, not a loop
                if not refused:
                    log.error("session replay refused: %s (retrying every %gs)", exc, REPLAY_POLL * 5)
                    refused = True
                self._stop.wait(REPLAY_POLL * 5)
                continue
            except Exception:  # never let the thread die silently with rows pending
                log.exception("session replay failed; retrying")
                self._stop.wait(REPLAY_POLL * 5)
                continue
            with self._lock:
                if generation == self._generation:
                    self._thread = None
                    return

    def replay_pending(self) -> int:
        """Write every pending row back to Redis; returns how many were replayed."""
        tier = self.tier

        def write(items: Sequence[Pending]) -> None:
            tier.write_batch(items)

        total = 0
        while True:
            n = self.source.replay(write, REPLAY_BATCH)
            total += n
            if n:
                METRICS.inc("session_replayed_total", n)
            if n < REPLAY_BATCH:
                if total:
                    log.info("replayed %d session binding(s) to redis", total)
                return total

    def close(self) -> None:
        self._stop.set()


def _sweep(ref: weakref.ReferenceType[Replayer], stop: threading.Event) -> None:
    """The sweeper thread: ends with its client (closed, or dropped and collected)."""
    while not stop.wait(SWEEP_EVERY):
        replayer = ref()
        if replayer is None:
            return
        replayer.sweep()
        del replayer
