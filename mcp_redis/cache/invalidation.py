"""Cache invalidation across processes: the registry, the listener, the replayer.

* **The registry** (per process): every `CachedFunction` by namespace, so a
  message or an `invalidate` reaches every function of a namespace here.
* **`Invalidation`** (one per client, ``client.singleton``): the listener
  (`mcp_redis.pubsub.Subscriber` on the cache deployment's channel) that
  applies other processes' invalidations to L1 — after every
  (re)subscription it flushes L1 (messages may have been missed) and
  replays what this process could not publish — and the replayer, a
  daemon thread that retries missed invalidations on its own. Closing the
  client (``configure()``/``reset()`` for the default one) stops both and
  flushes the L1 of its functions; a forked child starts with neither.

A function belongs to the client its last call used (``client=``, else the
default client at that time).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Dict, List, Optional

from ..client import Client, resolve
from ..connections import on_fork
from ..pubsub import Subscriber
from ..validation import loads_bounded

if TYPE_CHECKING:
    from .function import CachedFunction

__all__ = ["Invalidation", "of", "wait_for_listener", "origin", "same_namespace", "all_caches", "register"]

log = logging.getLogger("mcp_redis.cache")
_foreign_logged = False

MAX_PENDING = 10_000  # invalidations remembered per function while Redis is unreachable
REPLAY_FIRST_PAUSE = 0.05  # seconds before the first retry of a missed invalidation
REPLAY_MAX_PAUSE = 2.0  # the pause doubles up to this between attempts

def _foreign(channel: str) -> None:
    global _foreign_logged
    if not _foreign_logged:
        _foreign_logged = True
        log.warning("a message on %s that is not an invalidation was ignored (logged once)", channel)


# -- per process: origin id and registry ------------------------------------------------
_origin = uuid.uuid4().hex[:16]
_registry_lock = threading.Lock()
_registry: Dict[str, weakref.WeakSet[CachedFunction[object]]] = {}


def origin() -> str:
    """This process's id in invalidation messages (its own are applied before publishing)."""
    return _origin


def register(fn: CachedFunction[object]) -> None:
    with _registry_lock:
        _registry.setdefault(fn.namespace, weakref.WeakSet()).add(fn)


def same_namespace(namespace: str) -> List[CachedFunction[object]]:
    with _registry_lock:
        return list(_registry.get(namespace, ()))


def all_caches() -> List[CachedFunction[object]]:
    with _registry_lock:
        return [c for group in _registry.values() for c in group]


def _of_client(client: Client) -> List[CachedFunction[object]]:
    return [c for c in all_caches() if c._client_in_use() is client]


@on_fork
def _after_fork() -> None:
    # Process-wide state only: the decorated functions outlive clients, so the
    # Client's fork handling (which forgets the listener and replayer with its
    # other singletons) cannot reach them. A parent thread may have held their
    # locks while forking; the child's L1 would miss invalidations.
    global _origin, _registry_lock
    _origin = uuid.uuid4().hex[:16]
    _registry_lock = threading.Lock()
    for group in _registry.values():
        for cache in group:
            cache._after_fork()


# -- per client: listener and replayer ---------------------------------------------------
class Invalidation:
    """One client's invalidation listener and replayer (both started lazily)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self.subscriber: Optional[Subscriber] = None
        self.channel: Optional[str] = None
        self.thread: Optional[threading.Thread] = None  # the replayer
        self._stop = threading.Event()

    # -- listener --------------------------------------------------------------
    def listen(self, channel: str) -> None:
        """Subscribe to `channel` on the cache deployment unless already subscribed."""
        if self.channel == channel and self.subscriber is not None:
            return
        with self._lock:
            if self.channel == channel and self.subscriber is not None:
                return
            old, self.subscriber = self.subscriber, None
            if old is not None:
                old.close()
            client = self.client
            sub = Subscriber(
                self._on_message,
                channels=[channel],
                on_subscribed=self._on_subscribed,
                name="mcp_redis-cache-invalidation",
                connection=lambda: client.redis("metadata_cache"),
            )
            sub.start(wait=False)
            self.subscriber, self.channel = sub, channel

    def _on_message(self, channel: str, data: Optional[str]) -> None:
        if data is None:  # a payload that was not UTF-8 (pubsub: a foreign publisher): not ours
            return
        try:
            msg = loads_bounded(data)
        except ValueError:
            msg = None
        # Ours: {"o": origin, "n": namespace, "op": "k", "k": argument id} or {..., "op": "a", "g": generation}.
        op = msg.get("op") if isinstance(msg, dict) else None
        if not ((op == "k" and isinstance(msg.get("k"), str)) or (op == "a" and isinstance(msg.get("g"), str))):
            _foreign(channel)  # a foreign publisher on our channel
            return
        if msg.get("o") == _origin:
            return  # applied locally before publishing
        for cache in same_namespace(str(msg.get("n"))):
            if cache._client_in_use() is self.client:
                try:
                    cache._apply_remote(msg)
                except (ValueError, TypeError, KeyError, RecursionError):  # an argument id we never wrote
                    _foreign(channel)

    def _on_subscribed(self, initial: bool) -> None:
        # Messages published while we were (re)connecting are lost: forget L1.
        caches = _of_client(self.client)
        for cache in caches:
            # On the first subscription, which a first miss starts, loads in
            # flight stay joinable (marked stale: they fill no L1): forgetting
            # them would start a second load of the very key being loaded. On
            # a resubscription they go: an invalidation may have been missed.
            cache._flush_local(keep_flights=initial)
        if not initial:
            log.info("cache listener resubscribed: L1 caches flushed")
        for cache in caches:
            cache._replay_pending()

    # -- replayer --------------------------------------------------------------
    def replay_soon(self) -> None:
        """Start the replayer unless it runs (it re-checks for work before exiting).

        A process that only writes (no L2 reads, hence no listener) would
        otherwise keep missed invalidations until its next L2 read, and
        readers elsewhere would serve the old L2 value for its whole ``ttl``.
        It retries after `REPLAY_FIRST_PAUSE`, doubling up to
        `REPLAY_MAX_PAUSE` (attempts made while the breaker is open cost
        nothing), and exits as soon as nothing is pending.
        """
        with self._lock:
            if self.thread is not None:
                return
            self._stop = threading.Event()
            self.thread = threading.Thread(target=self._replay, args=(self._stop,),
                                           name="mcp_redis-cache-replay", daemon=True)
            self.thread.start()

    def _replay(self, stop: threading.Event) -> None:
        pause = REPLAY_FIRST_PAUSE
        while not stop.wait(pause):
            done = True
            for cache in _of_client(self.client):
                if cache._has_pending():
                    try:
                        done = cache._replay_pending() and done
                    except Exception:  # never let the thread die with work left  # pragma: no cover
                        log.exception("cache %s: replaying invalidations failed", cache.namespace)
                        done = False
            if done:
                with self._lock:  # exit only if no invalidation was remembered meanwhile
                    if not any(cache._has_pending() for cache in _of_client(self.client)):
                        if self.thread is threading.current_thread():
                            self.thread = None
                        return
            pause = REPLAY_FIRST_PAUSE if done else min(pause * 2, REPLAY_MAX_PAUSE)
        with self._lock:
            if self.thread is threading.current_thread():
                self.thread = None

    # -- life cycle ------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop the replayer (what is pending stays) and the listener; flush L1."""
        with self._lock:
            thread, self.thread = self.thread, None
            self._stop.set()
            sub, self.subscriber, self.channel = self.subscriber, None, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)  # at most one attempt in progress; the thread is a daemon anyway
        if sub is not None:
            sub.close()
        for cache in _of_client(self.client):
            cache._flush_local()


_KEY = ("cache", "invalidation")


def of(client: Client) -> Invalidation:
    """`client`'s `Invalidation` (built on first use)."""
    return client.singleton(_KEY, lambda: Invalidation(client))


def wait_for_listener(timeout: float = 5.0, *, client: Optional[Client] = None) -> bool:
    """Block until the invalidation listener of `client` (default: the default client) is subscribed.

    It starts on the first Redis-mode cache miss; a process that must not
    miss an invalidation published right after start-up can wait here.
    """
    deadline = time.monotonic() + timeout
    while True:
        inv: Optional[Invalidation] = resolve(client).peek(_KEY)
        sub = inv.subscriber if inv is not None else None
        if sub is not None:
            return sub.wait_active(max(0.0, deadline - time.monotonic()))
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
