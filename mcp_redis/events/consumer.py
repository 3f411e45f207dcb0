"""Consuming an `EventStream`: one batch's handler calls, the resilient loop, its thread.

`handle_batch` calls the handler per entry (a raising handler leaves its
entry pending for re-delivery); `consume_loop` reads batches until stopped,
riding out Redis outages with backoff; `StreamConsumer` runs that loop on a
daemon thread. Running consumers belong to their client (`ConsumerThreads`,
a per-client singleton): closing the client stops them.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import redis.exceptions as rex

from ..client import resolve
from ..errors import BackendUnavailable, ConfigurationError
from ..metrics import METRICS
from .base import EventHandler

if TYPE_CHECKING:
    from .streams import EventStream, StreamEntry

__all__ = ["StreamConsumer", "ConsumerThreads", "handle_batch", "consume_loop"]

log = logging.getLogger("mcp_redis.events")

_PRUNE_INTERVAL = 3600.0  # consume() forgets long-idle, empty consumers this often


def handle_batch(stream: EventStream, fn: EventHandler, entries: List[StreamEntry], *, with_id: bool,
                 stop: Optional[threading.Event]) -> Tuple[List[str], int]:
    """Call `fn` per entry; returns (ids to ack, how many raised).

    Entries that were trimmed away or are not a JSON object are acked and
    skipped; a handler that raises leaves its entry pending.
    """
    done: List[str] = []
    failed = 0
    for entry in entries:
        if stop is not None and stop.is_set():
            break  # the rest stay pending: claimed later, or re-read by this consumer
        if entry.event is None:
            METRICS.inc("events_decode_errors_total", kind="stream")
            log.warning("stream %r: entry %s is gone or not a JSON object; acking it", stream.name, entry.id)
            done.append(entry.id)
            continue
        try:
            if with_id:
                fn(entry.id, entry.event)
            else:
                fn(entry.event)
        except Exception:
            failed += 1
            METRICS.inc("events_handler_errors_total", kind="stream")
            log.exception("stream %r: handler raised on %s; left pending for re-delivery", stream.name, entry.id)
            continue
        done.append(entry.id)
    return done, failed


def consume_loop(stream: EventStream, handler: EventHandler, *, count: int, block_ms: int, with_id: bool,
                 stop: Optional[threading.Event], max_events: Optional[int]) -> int:
    """`EventStream.consume` once its arguments are checked: batches until stopped."""
    stop = stop if stop is not None else threading.Event()
    handled = 0
    backoff = 0.05
    next_prune = time.monotonic() + _PRUNE_INTERVAL
    while not stop.is_set() and (max_events is None or handled < max_events):
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + _PRUNE_INTERVAL
            try:
                stream.prune_consumers()
            except Exception as exc:  # housekeeping only
                log.debug("stream %r: prune_consumers failed: %s", stream.name, type(exc).__name__)
        want = count if max_events is None else max(1, min(count, max_events - handled))
        try:
            n, _ = stream.process(handler, count=want, block_ms=block_ms, with_id=with_id, stop=stop)
        except (BackendUnavailable, rex.ConnectionError, rex.TimeoutError) as exc:
            log.warning("stream %r: redis unavailable (%s); retrying", stream.name, type(exc).__name__)
            stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)
            continue
        backoff = 0.05
        handled += n
    return handled


class _HandlerExit(Exception):
    """A background consumer's handler raised `SystemExit`, `KeyboardInterrupt` or another
    `BaseException`: handled as any handler failure (logged, the entry left pending)."""


class StreamConsumer:
    """A background `EventStream.consume` loop on a daemon thread."""

    def __init__(self, stream: EventStream, handler: EventHandler, *, count: int, block_ms: int,
                 with_id: bool, name: Optional[str]) -> None:
        self.stream = stream
        self._stop = threading.Event()
        self.handled = 0
        self._handler = handler
        self._kw: Dict[str, Any] = {"count": count, "block_ms": block_ms, "with_id": with_id}
        self._thread = threading.Thread(target=self._run, name=name or f"mcp_redis-stream:{stream.name[:40]}",
                                        daemon=True)
        self._owner = resolve(stream.client).singleton(_CONSUMERS, ConsumerThreads)
        self._owner.add(self)
        self._thread.start()

    def __repr__(self) -> str:
        return f"StreamConsumer({self.stream!r}, alive={self.alive}, handled={self.handled})"

    def __enter__(self) -> StreamConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _count(self, *args: Any) -> None:
        try:
            self._handler(*args)
        except Exception:
            raise
        except BaseException as exc:  # SystemExit would end this thread, silently: a failure instead
            raise _HandlerExit(f"the handler raised {type(exc).__name__}") from exc
        self.handled += 1

    def _run(self) -> None:
        logged: Optional[str] = None
        while not self._stop.is_set():
            try:
                self.stream.consume(self._count, stop=self._stop, **self._kw)
            except ConfigurationError as exc:  # only the operator can fix it: one line, not a loop
                if str(exc) != logged:
                    log.error("stream %r: consumer stopped: %s (retrying every 1s)", self.stream.name, exc)
                    logged = str(exc)
                self._stop.wait(1.0)
            except Exception:  # a bug or a non-transient error: log, pause, go on
                log.exception("stream %r: consumer loop failed; restarting it", self.stream.name)
                self._stop.wait(1.0)

    def close(self, timeout: float = 3.0) -> None:
        """Stop after the current event (its batch's handled entries are acked)."""
        self._owner.discard(self)
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


_CONSUMERS = ("events", "stream-consumers")


class ConsumerThreads:
    """A client's running `StreamConsumer` threads (a per-client singleton).

    The client closes it when it closes, which stops every consumer started
    on it; a forked child forgets it (the threads stayed in the parent).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumers: weakref.WeakSet[StreamConsumer] = weakref.WeakSet()

    def add(self, consumer: StreamConsumer) -> None:
        with self._lock:
            self._consumers.add(consumer)

    def discard(self, consumer: StreamConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)

    def close(self) -> None:
        with self._lock:
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.close()
