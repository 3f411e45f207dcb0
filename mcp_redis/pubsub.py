"""A resilient pub/sub listener: one daemon thread, reconnects by itself.

redis-py's ``PubSub.run_in_thread`` dies when a reconnect fails (redis-py
#816, #717); this listener instead loops forever with backoff, resubscribes
after every reconnect and tells its owner (``on_subscribed(initial=False)``)
so that state which may have missed messages (an L1 cache) can be flushed.
Misconfiguration (wrong password, ``NOPERM``, a bad DB index: see
`mcp_redis.resilience.redis_misconfiguration`) is logged once, as one line
naming the fix, and retried every `max_backoff` seconds until it is fixed.

Used by the metadata cache's cross-process invalidation and by `EventBus`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from typing import Any, Callable, Iterable, List, Optional, Tuple

import redis.exceptions as rex

from .connections import RedisConnection
from .errors import BackendUnavailable, ConfigurationError
from .metrics import METRICS

__all__ = ["Subscriber", "Handler"]

log = logging.getLogger("mcp_redis.pubsub")

# handler(channel, data): data is the published payload (str).
Handler = Callable[[str, str], None]
_live: weakref.WeakSet[Subscriber] = weakref.WeakSet()
# ValueError: redis-py reading a socket that reset()/close() shut under us.
_LISTEN_ERRORS = (rex.ConnectionError, rex.TimeoutError, OSError, ValueError, BackendUnavailable)


# Seconds before the first attempt to subscribe again after a loss (doubling to `max_backoff`,
# until a subscription is confirmed: every loss after that starts here again).
_FIRST_BACKOFF = 0.02


class Subscriber:
    """Listen on `channels` and/or `patterns`, calling `handler` for each message.

    Messages are handled one at a time, in the order Redis delivers them, on
    this subscriber's own daemon thread. An exception in `handler` is logged
    and counted; the listener lives on. Pub/sub is at-most-once: a message
    published while the listener is reconnecting is lost.

    A listener belongs to the process that started it: in a forked child it
    is inactive (`active`, `alive` and `wait_active` say so, by pid) and
    `close()` never touches the parent's socket, so no fork hook is needed;
    its owner (a client singleton) is forgotten by the client's fork handling.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        channels: Iterable[str] = (),
        patterns: Iterable[str] = (),
        on_subscribed: Optional[Callable[[bool], None]] = None,
        name: str = "mcp_redis-subscriber",
        poll_interval: float = 0.5,
        max_backoff: float = 1.0,
        connection: Optional[Callable[[], RedisConnection]] = None,
    ) -> None:
        # Each name once: redis-py sends each once, and one confirmation comes per name.
        self.channels: Tuple[str, ...] = tuple(dict.fromkeys(channels))
        self.patterns: Tuple[str, ...] = tuple(dict.fromkeys(patterns))
        if not self.channels and not self.patterns:
            raise ValueError("channels/patterns: subscribe to at least one")
        self._handler = handler
        # Where to subscribe, read at each (re)connect: the feature's deployment.
        self._connection: Callable[[], RedisConnection] = connection or _default_connection
        self._on_subscribed = on_subscribed
        self.name = name
        self._poll = poll_interval
        self._max_backoff = max_backoff
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._pubsub: Any = None
        self._undecodable = False  # the last read failed to decode: subscribe anew before the next
        self._backoff = _FIRST_BACKOFF
        self._pubsub_lock = threading.Lock()  # one hand-back of its connection to the pool
        self._subscribed_once = False
        self._settled = threading.Event()  # subscribed, or found misconfigured
        self.misconfigured: Optional[ConfigurationError] = None  # until subscribed again
        self.reconnects = 0
        self.delivered = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "active" if self._ready.is_set() else "connecting"
        return f"Subscriber({self.name!r}, channels={len(self.channels)}, patterns={len(self.patterns)}, {state})"

    @property
    def active(self) -> bool:
        """True while subscribed (False while reconnecting or after close)."""
        return self._ready.is_set() and not self._closed.is_set() and self.alive

    @property
    def alive(self) -> bool:
        """The listener thread runs in this process."""
        return self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()

    def start(self, *, wait: bool = True, timeout: float = 5.0) -> Subscriber:
        """Start the listener thread; with `wait`, return once subscribed.

        Raises `BackendUnavailable` (and stops) if `wait` and the
        subscription is not active within `timeout` seconds, and the
        `ConfigurationError` at once if `wait` and Redis refuses the
        subscription for a reason only its operator can fix.
        """
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        _live.add(self)
        self._thread.start()
        if wait:
            self._settled.wait(timeout)
            misconfigured = self.misconfigured
            if not self._ready.is_set():
                # Not joined: a thread stuck in a read of a hung server ends on its
                # socket timeout by itself; the caller's `timeout` is the bound.
                self.close(timeout=0.0)
                if misconfigured is not None:
                    raise misconfigured
                raise BackendUnavailable(f"redis unavailable: subscription not active within {timeout}s")
        return self

    def wait_active(self, timeout: float) -> bool:
        """Block until subscribed (again); False on timeout, and at once in a forked child."""
        if self._pid != os.getpid():
            return False
        return self._ready.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening and join the thread (never from inside the handler).

        In a forked child the listener is the parent's: it is only marked
        closed; its socket and thread are left alone.
        """
        self._closed.set()
        self._ready.clear()
        if self._pid != os.getpid():
            return
        ps = self._pubsub
        connection = getattr(ps, "connection", None)
        if connection is not None:
            try:
                # Wakes a blocked read. Only the listener thread hands the connection back to the
                # pool (`_drop_pubsub`), once it stopped using it: a `ps.close()` here gave it back
                # while that thread could still send or read on it, under another thread's command.
                connection.disconnect()
            except Exception:
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._drop_pubsub()  # no listener thread left to do it

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._listen()
                return
            except ConfigurationError:
                # Reconfigured to local mode (or a bad URL): nothing to listen to.
                log.info("subscriber %s: Redis no longer configured; stopping", self.name)
                self._closed.set()
                self._ready.clear()
                return
            except Exception as exc:
                if self._closed.is_set():
                    return  # close() shut the socket under us
                self._ready.clear()
                misconfigured = self._misconfiguration(exc)
                if misconfigured is not None:
                    if self.misconfigured is None:  # once, until subscribed again
                        log.error("subscriber %s: %s (retrying every %gs)", self.name, misconfigured, self._max_backoff)
                        METRICS.inc("configuration_errors_total", backend="redis")
                    self.misconfigured = misconfigured
                    self._settled.set()
                    self._closed.wait(self._max_backoff)
                    continue
                if isinstance(exc, _LISTEN_ERRORS):
                    METRICS.inc("pubsub_reconnects_total")
                    self.reconnects += 1
                    log.warning("subscriber %s: connection lost (%s); reconnecting", self.name, type(exc).__name__)
                else:  # a bug: log it, keep the listener alive
                    log.exception("subscriber %s: unexpected error", self.name)
                self._closed.wait(self._backoff * (0.5 + random.random()))  # noqa: S311 - jitter
                self._backoff = min(self._backoff * 2, self._max_backoff)
            finally:
                self._drop_pubsub()

    def _misconfiguration(self, exc: Exception) -> Optional[ConfigurationError]:
        try:
            return self._connection().misconfiguration(exc)
        except Exception:  # reconfigured meanwhile: the next _listen() says so
            return None

    def _listen(self) -> None:
        conn = self._connection()
        if self.reconnects and conn.is_cluster:
            _refresh_slot_map(conn.client)
        # A Sentinel pool that follows failovers as they happen moves its
        # commands at once; this socket (held for the whole subscription,
        # never back in the pool) must follow too: else it stays on the
        # demoted master, which answers nothing it is published, until
        # Sentinel reconfigures it ~10 s later.
        pool: Any = getattr(conn.client, "connection_pool", None)
        switches = getattr(pool, "switches", None)
        ps = conn.client.pubsub(ignore_subscribe_messages=False)
        self._pubsub = ps
        expected = 0
        if self.channels:
            ps.subscribe(*self.channels)
            expected += len(self.channels)
        if self.patterns:
            ps.psubscribe(*self.patterns)
            expected += len(self.patterns)
        confirmed = 0
        pending: List[Any] = []
        # A connection accepted and never answered (a path that drops the flow, a hung server)
        # must not hold the listener here for ever: no confirmation within the socket timeout is
        # a failed attempt, and the next one follows its backoff.
        confirm_by = time.monotonic() + max(float(conn.settings.socket_timeout or 5.0), 1.0)
        while confirmed < expected:
            if self._closed.is_set():
                return
            msg = self._next(ps, False)
            if msg is None:
                if time.monotonic() >= confirm_by:
                    raise rex.TimeoutError("no confirmation of the subscription within the socket timeout")
                continue
            if msg["type"] in ("subscribe", "psubscribe"):
                confirmed += 1
            elif msg["type"] in ("message", "pmessage"):
                pending.append(msg)
        first = not self._subscribed_once
        self._subscribed_once = True
        if self._on_subscribed is not None:
            try:
                self._on_subscribed(first)
            except Exception:
                log.exception("subscriber %s: on_subscribed hook failed", self.name)
        self.misconfigured = None
        self._backoff = _FIRST_BACKOFF  # subscribed: the next loss starts the backoff anew
        self._ready.set()
        self._settled.set()
        for msg in pending:
            self._dispatch(msg)
        # From the settings, not the socket: cluster connections are built without redis-py's
        # health check (`health_check_interval` 0 there).
        probe = _LivenessProbe(ps, conn.settings.health_check_interval, conn.settings.socket_timeout)
        while not self._closed.is_set():
            msg = self._next(ps, True)
            if msg is not None:
                probe.heard()
                self._dispatch(msg)
            else:
                probe.silent()
            if switches is not None and pool.switches != switches:
                raise rex.ConnectionError("the Sentinel master moved: subscribing on the new one")

    def _next(self, ps: Any, ignore_subscribe_messages: bool) -> Any:
        """The next message, or None. A payload that is not UTF-8 (a foreign
        publisher) reaches the handler as ``("", None)``, which skips it; redis-py
        drops the connection under it (a reply it failed to decode) and
        resubscribes on the next read, so messages already queued behind that
        payload are lost (pub/sub is at-most-once). The read after it ends this
        subscription, as a lost connection does: the listener subscribes anew,
        and tells its owner so (`on_subscribed`: the cache flushes its L1s, as
        after any gap). redis-py before 8.2 kept the connection with that reply
        still unread and raised again on every read (the listener spun on one
        payload for ever); 8.2 resubscribed under the listener, unseen."""
        if self._undecodable:
            self._undecodable = False
            raise rex.ConnectionError("a payload that was not UTF-8 cut the subscription's reply stream")
        try:
            return ps.get_message(ignore_subscribe_messages=ignore_subscribe_messages, timeout=self._poll)
        except UnicodeDecodeError:
            METRICS.inc("pubsub_undecodable_total")
            self._undecodable = True
            return {"type": "message", "channel": "", "data": None}

    def _dispatch(self, msg: Any) -> None:
        if msg.get("type") not in ("message", "pmessage"):
            return
        try:
            self._handler(str(msg["channel"]), msg["data"])
            self.delivered += 1
        except BaseException:  # SystemExit too: it would end this thread, silently
            METRICS.inc("pubsub_handler_errors_total")
            log.exception("subscriber %s: handler raised; listener continues", self.name)

    def _drop_pubsub(self) -> None:
        with self._pubsub_lock:
            ps, self._pubsub = self._pubsub, None
        if ps is not None:
            try:
                ps.close()
            except Exception:
                pass


class _LivenessProbe:
    """Finds a subscription connection that went silent without closing (the host vanished, a
    firewall or NAT dropped the flow): after `health_check_interval` seconds with nothing read it
    sends a PING, and when nothing at all is read for `socket_timeout` seconds after that (its
    reply or any message), it raises `TimeoutError`, so the listener reconnects. redis-py's own
    health check sends a PING too but never misses the reply. `health_check_interval` 0: off.
    A server busy for longer than `socket_timeout` (a long script) looks the same: the listener
    reconnects, as every other call of the library would time out then."""

    __slots__ = ("_ps", "_idle", "_reply_within", "_last", "_sent")

    def __init__(self, ps: Any, idle: float, reply_within: Optional[float]) -> None:
        self._ps = ps
        self._idle = float(idle or 0)
        self._reply_within = max(float(reply_within or 5.0), 1.0)
        self._last = time.monotonic()
        self._sent: Optional[float] = None

    def heard(self) -> None:
        self._last = time.monotonic()
        self._sent = None

    def silent(self) -> None:
        """After a read that found nothing (the socket was quiet for a poll interval)."""
        if not self._idle:
            return
        now = time.monotonic()
        if self._sent is None:
            if now - self._last >= self._idle:
                self._ps.ping("mcp_redis-liveness")
                self._sent = now
        elif now - self._sent >= self._reply_within:
            raise rex.TimeoutError(f"no reply to PING within {self._reply_within:g}s: the connection is dead")


def _refresh_slot_map(client: Any) -> None:
    """Re-read a cluster's slot map before subscribing again.

    redis-py subscribes on the node its cached map names for the channel,
    and a pub/sub connection error does not refresh that map: after its node
    died, a process that only subscribes would retry the dead node forever.
    """
    try:
        client.nodes_manager.initialize()
    except Exception:  # the cluster is still down: the next reconnect tries again
        log.debug("pub/sub: cluster slot map refresh failed", exc_info=True)


def _default_connection() -> RedisConnection:
    from .client import default_client

    return default_client().redis()

