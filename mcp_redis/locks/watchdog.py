"""The lock watchdog: renews every auto-renewing lease of one client from one thread."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Hashable, List, Optional, Set, Tuple

from ..errors import ConfigurationError
from ..metrics import METRICS
from .base import Backend, Hold

__all__ = ["Watchdog"]

log = logging.getLogger("mcp_redis.locks")

#: Holds whose ownership one round trip checks after a liveness gap, or renews.
_CHECK_BATCH = 500

#: Seconds between tries of a release that could not reach the backend.
RELEASE_RETRY_EVERY = 0.25


class Watchdog:
    """One daemon thread per client renewing every auto-renewing lease at a third of it.

    It also beats each backend's per-process liveness (`Backend.heartbeat`,
    every `heartbeat_every` seconds) while it renews a hold of that backend:
    a process that dies stops beating, and its locks are taken over once its
    liveness key lapses, long before their leases end.

    Built by the client's `LockRuntime` on first use; `close()` (the client
    closing, or `configure()`/`reset()` closing the default client) stops
    renewing and ends the thread. A forked child's client builds a new one:
    threads do not survive a fork.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holds: Dict[int, Hold] = {}
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._wake_at = float("inf")  # when the thread will next look, unless notified
        # With no holds the thread still looks every last-lease/3, so a new
        # hold with a lease like the last one needs no wake-up: in a loop of
        # short sections, waking it on every acquire would cost a thread
        # switch each time.
        self._idle_wait = float("inf")
        self._beats: Dict[int, Tuple[float, Backend]] = {}  # id(backend) -> (next beat (monotonic), backend)
        self._gaps_seen: Dict[int, float] = {}  # id(backend) -> the last liveness gap whose holds were checked
        self._releases: Dict[int, Tuple[float, Hold]] = {}  # id(hold) -> (next try (monotonic), hold)
        self._beating: Set[int] = set()  # id(backend) of beats in threads of their own, in flight

    def add(self, hold: Hold, renew: bool = True) -> None:
        """Watch `hold` until `discard`: renew its lease (`renew`) and beat its backend's liveness.

        A hold that is not renewed (``lock()`` without ``auto_renew``) is
        still watched while it is held: its process must stay alive for the
        lease it asked for.
        """
        with self._cond:
            if self._closed:
                return
            hold.next_renewal = time.monotonic() + _every(hold) if renew else float("inf")
            self._holds[id(hold)] = hold
            if renew:
                self._idle_wait = _every(hold)
            first = hold.next_renewal
            every = hold.backend.heartbeat_every
            if every is not None and id(hold.backend) not in self._beats:
                first = min(first, time.monotonic() + every)
                self._beats[id(hold.backend)] = (first, hold.backend)
            self._look_by(first)

    def discard(self, hold: Hold) -> None:
        with self._cond:
            self._holds.pop(id(hold), None)

    def release_later(self, hold: Hold) -> None:
        """Keep trying to release `hold`, whose release could not reach its backend, until its lease ends.

        The release that failed was the holder's last word: without this the
        lock would stay taken for the rest of its lease, and, while this
        process beats its liveness for other holds, no waiter could take it
        over as a dead holder's. A retry can only free this hold's own
        value (the release script compares it), so it never touches a later
        holder's lock.
        """
        with self._cond:
            if self._closed:
                return
            at = time.monotonic() + RELEASE_RETRY_EVERY
            self._releases[id(hold)] = (at, hold)
            self._look_by(at)

    def _look_by(self, at: float) -> None:
        """Make the thread look again by `at` (monotonic): start it, or wake it if it sleeps longer."""
        # Under self._cond.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="mcp_redis-lock-watchdog", daemon=True)
            self._thread.start()
        elif at < self._wake_at:
            self._cond.notify()

    def pending_releases(self) -> int:
        """Releases still being retried in the background (diagnostics)."""
        with self._cond:
            return len(self._releases)

    def close(self) -> None:
        """Stop renewing every hold, stop retrying releases, and end the thread."""
        with self._cond:
            self._closed = True
            self._holds.clear()
            self._releases.clear()
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._holds)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                # Batched holds due within the next thirtieth of their lease (at most a second) come
                # along: a batch every so often, not a round trip (or a thread) per hold as it falls due.
                due = [h for h in self._holds.values()
                       if h.next_renewal <= now + (min(h.lease / 30, 1.0) if h.backend.renews_in_batches else 0.0)]
                beats = self._due_beats(now)
                releases = [h for at, h in self._releases.values() if at <= now]
                if not due and not beats and not releases:
                    nxt = min((h.next_renewal for h in self._holds.values()), default=now + self._idle_wait)
                    nxt = min([nxt] + [at for at, _ in self._beats.values()] +
                              [at for at, _ in self._releases.values()])
                    self._wake_at = nxt
                    self._cond.wait(None if nxt == float("inf") else nxt - now)
                    self._wake_at = 0.0  # awake: it looks at every hold again before sleeping
                    continue
                self._wake_at = 0.0
            self._beat(beats)
            for backend in beats:
                gap = backend.liveness_gap()  # recorded by this beat, or by any other since the last look
                if gap > self._gaps_seen.get(id(backend), float("-inf")):
                    self._gaps_seen[id(backend)] = gap
                    self._check_after_gap(backend, gap)
            batches: Dict[Tuple[int, Hashable], List[Hold]] = {}  # (backend, its batch) -> holds
            for hold in due:
                owner = hold.owner
                # Not the main thread: it counts as ended once the main script returns, while
                # the process runs on in its other threads (its holds are that process's).
                if owner is not None and not owner.is_alive() and owner is not threading.main_thread():
                    self._beat_due()
                    self._orphaned(hold)
                elif hold.backend.renews_in_batches:
                    batches.setdefault((id(hold.backend), hold.backend.batch_of(hold)), []).append(hold)
                else:
                    self._beat_due()  # many renewals in a row must not starve the liveness beats
                    self._renew_all([hold])
            for holds in batches.values():
                for start in range(0, len(holds), _CHECK_BATCH):  # one round trip per batch, beats between
                    self._beat_due()
                    part = holds[start:start + _CHECK_BATCH]
                    if part[0].backend.batch_apart(part[0]):
                        self._renew_batch_apart(part)
                    else:
                        self._renew_all(part)
            for hold in releases:
                self._beat_due()
                self._retry_release(hold)

    def _renew_all(self, holds: List[Hold]) -> None:
        """Renew `holds`: one, or a batch of one backend's holds on one connection (one round
        trip). A crash never ends the one renewer: its holds are looked at again shortly."""
        try:
            if len(holds) == 1:
                self._renew(holds[0])
            else:
                self._extend_all(holds)
        except Exception:
            log.exception("lock: watchdog renewal crashed")
            for hold in holds:
                hold.next_renewal = time.monotonic() + min(hold.lease / 10, 0.5)

    def _renew_batch_apart(self, holds: List[Hold]) -> None:
        """Renew a batch in a thread of its own (a cluster master's: one that stopped answering,
        SIGSTOP or a partition, held this thread for the socket timeout and its retries, and the
        process's liveness lapsed on a healthy master: its locks there were taken over). One
        renewal per hold at a time; a hold still in one past its lease is lost."""
        now = time.monotonic()
        todo = []
        for hold in holds:
            hold.next_renewal = now + min(hold.lease / 10, 0.5)  # looked at again shortly
            if hold.checking:
                if now >= hold.expires_at:  # stuck past its lease: another holder may be in already
                    self._lost(hold)
                continue
            hold.checking = True
            todo.append(hold)
        if not todo:
            return

        def renew(batch: List[Hold]) -> None:
            try:
                self._extend_all(batch)
            except Exception:  # never let a renewal end without rescheduling
                log.exception("lock: watchdog renewal crashed")
            finally:
                for hold in batch:
                    hold.checking = False
            with self._cond:
                if not self._closed:
                    self._look_by(min(hold.next_renewal for hold in batch))

        threading.Thread(target=renew, args=(todo,), name="mcp_redis-lock-renewal", daemon=True).start()

    def _retry_release(self, hold: Hold) -> None:
        if not _unbounded(hold):
            self._try_release(hold)
            return
        with self._cond:
            if id(hold) not in self._releases:
                return
            self._releases[id(hold)] = (float("inf"), hold)  # in flight: not due again until it ends
        _own_thread(self._try_release, hold, "mcp_redis-lock-release")

    def _try_release(self, hold: Hold) -> None:
        try:
            freed = hold.backend.release(hold)
        except Exception as exc:  # still unreachable (or refused): again later, while the lease may run
            if time.monotonic() + RELEASE_RETRY_EVERY < hold.expires_at:
                with self._cond:
                    if id(hold) in self._releases:
                        at = time.monotonic() + RELEASE_RETRY_EVERY
                        self._releases[id(hold)] = (at, hold)
                        if _unbounded(hold):  # off this thread: the watchdog may sleep past `at`
                            self._look_by(at)
                log.debug("lock: background release failed, retrying: %s", type(exc).__name__)
                return
            freed = False  # the lease ends anyway: nothing left to free
        with self._cond:
            self._releases.pop(id(hold), None)
        METRICS.inc("lock_release_total", backend=hold.backend.name,
                    outcome="released_late" if freed else "expired_unreleased")

    def _beat(self, backends: List[Backend]) -> None:
        for backend in backends:
            if backend.beats_apart():
                self._beat_apart(backend)
            else:
                self._beat_one(backend)

    @staticmethod
    def _beat_one(backend: Backend) -> None:
        try:
            backend.heartbeat()
        except Exception:  # the next beat retries; holds are renewed (or lost) as usual
            log.debug("lock: liveness heartbeat failed", exc_info=True)

    def _beat_apart(self, backend: Backend) -> None:
        """Beat in a thread of its own, one at a time (a cluster's liveness key may sit on a master
        that stopped answering: this thread waited on it, and the renewals of the locks held on
        the other masters, which answer, stopped until their leases ran out under their holders)."""
        with self._cond:
            if id(backend) in self._beating:
                return
            self._beating.add(id(backend))

        def beat(_: Any) -> None:
            try:
                self._beat_one(backend)
            finally:
                with self._cond:
                    self._beating.discard(id(backend))

        threading.Thread(target=beat, args=(None,), name="mcp_redis-lock-beat", daemon=True).start()

    def _beat_due(self) -> None:
        """Beat the backends whose beat is due now (between other work of this thread)."""
        with self._cond:
            beats = self._due_beats(time.monotonic())
        self._beat(beats)

    def _due_beats(self, now: float) -> List[Backend]:
        """The backends to beat now (under the condition's lock).

        A backend with no holds is forgotten only when its beat falls due, not
        as soon as its last hold goes: a loop of short sections then finds its
        schedule in place and never wakes this thread (one wake-up per acquire
        cost a thread switch each, measured at about +30 % per lock cycle).
        """
        live = {id(h.backend) for h in self._holds.values()}
        due: List[Backend] = []
        for key, (at, backend) in list(self._beats.items()):
            if at > now:
                continue
            if key not in live:
                del self._beats[key]
                self._gaps_seen.pop(key, None)
                continue
            self._beats[key] = (now + (backend.heartbeat_every or 0.0), backend)
            due.append(backend)
        return due

    def _check_after_gap(self, backend: Backend, gap: float) -> None:
        """The process may have looked dead (its liveness lapsed): learn now which holds were taken over.

        Without this a hold taken over during a stall of more than
        LIVENESS_TTL would learn it only at its next renewal (a third of
        its lease later) or at release.
        """
        with self._cond:
            holds = [h for h in self._holds.values() if h.backend is backend and h.granted_at < gap]
        for start in range(0, len(holds), _CHECK_BATCH):  # one round trip per batch, beats between them
            self._beat_due()
            batch = holds[start:start + _CHECK_BATCH]
            try:
                owned = backend.owned_all(batch)
            except Exception:  # unknown: the renewal (or the release) tells
                log.debug("lock: ownership check after a liveness gap failed", exc_info=True)
                continue
            for hold, still in zip(batch, owned):
                if not still and not hold.released:
                    self._lost(hold)

    def _orphaned(self, hold: Hold) -> None:
        """A thread-local hold whose thread ended without releasing it: nothing can release it
        now, and renewing it would keep the lock taken until the process exits. Release it."""
        self.discard(hold)
        if hold.released:
            return
        hold.released = True
        log.warning("lock: a thread ended holding a lock it never released; the watchdog released it")
        if _unbounded(hold):
            _own_thread(self._release_orphan, hold, "mcp_redis-lock-release")
        else:
            self._release_orphan(hold)

    def _release_orphan(self, hold: Hold) -> None:
        try:
            freed = hold.backend.release(hold)
        except Exception:  # retried in the background while the lease may run
            self.release_later(hold)
            return
        METRICS.inc("lock_release_total", backend=hold.backend.name,
                    outcome="released_orphan" if freed else "not_owned")

    def _lost(self, hold: Hold) -> None:
        self.discard(hold)
        if not hold.released:
            hold.mark_lost()
            METRICS.inc("lock_lost_total", backend=hold.backend.name)
            log.warning("lock: lease lost (expired or taken over) while held; release will raise LockNotOwned")

    def _check_session(self, hold: Hold) -> None:
        """Check `hold`'s session in a thread of its own: a check has no client-side deadline
        (libpq cannot bound a server process that stopped answering), so waiting for it here would
        stop every renewal and check of the client (a stopped PostgreSQL process once let a
        Redis lease run out under its holder). One check per hold at a time."""
        hold.next_renewal = time.monotonic() + _every(hold)
        if hold.checking:
            return
        hold.checking = True

        def check(hold: Hold) -> None:
            try:
                ok = hold.backend.extend(hold, hold.lease, True)
            except Exception as exc:  # unknown (the session answered with an error): asked again
                log.debug("lock: session check failed, retrying: %s", type(exc).__name__)
                ok = True
            finally:
                hold.checking = False
            if not ok:
                self._lost(hold)

        _own_thread(check, hold, "mcp_redis-lock-session-check")

    def _renew(self, hold: Hold) -> None:
        if hold.backend.session_check_every is not None:
            self._check_session(hold)
        elif _unbounded(hold):
            self._renew_apart(hold)
        else:
            self._extend(hold)

    def _renew_apart(self, hold: Hold) -> None:
        """Renew `hold` in a thread of its own (its backend may wait on PostgreSQL: a gate to
        open under ``lock_fallback=postgres``). One renewal per hold at a time; the hold is
        looked at again shortly, and gets its next renewal time when this one ends."""
        now = time.monotonic()
        hold.next_renewal = now + min(hold.lease / 10, 0.5)
        if hold.checking:
            if now >= hold.expires_at:  # stuck past its lease: another holder may be in already
                self._lost(hold)
            return
        hold.checking = True

        def renew(hold: Hold) -> None:
            try:
                self._extend(hold)
            except Exception:  # never let a renewal end without rescheduling
                log.exception("lock: watchdog renewal crashed")
                hold.next_renewal = time.monotonic() + min(hold.lease / 10, 0.5)
            finally:
                hold.checking = False
            with self._cond:
                if not self._closed:
                    self._look_by(hold.next_renewal)

        _own_thread(renew, hold, "mcp_redis-lock-renewal")

    def _extend(self, hold: Hold) -> None:
        started = time.monotonic()
        try:
            ok = hold.backend.extend(hold, hold.lease, True)
        except Exception as exc:
            self._not_renewed(hold, exc)
            return
        if ok:
            self._renewed(hold, started)
        else:
            self._lost(hold)

    def _extend_all(self, holds: List[Hold]) -> None:
        """Renew holds of one backend and connection in one round trip (`Backend.extend_all`)."""
        started = time.monotonic()
        try:
            done = holds[0].backend.extend_all(holds)
        except Exception as exc:  # the round trip failed (retried by the policy): each hold as one
            for hold in holds:
                self._not_renewed(hold, exc)
            return
        for hold, ok in zip(holds, done):
            if ok is None:  # an error reply of its own (READONLY, OOM...): on its own, through the policy
                self._extend(hold)
            elif ok:
                self._renewed(hold, started)
            else:
                self._lost(hold)

    @staticmethod
    def _renewed(hold: Hold, started: float) -> None:
        METRICS.inc("lock_renew_total", outcome="renewed")
        hold.next_renewal = started + _every(hold)

    def _not_renewed(self, hold: Hold, exc: Exception) -> None:
        """A renewal that raised: tried again shortly until the lease would have ended anyway."""
        if isinstance(exc, ConfigurationError) and not hold.misconfiguration_logged:
            hold.misconfiguration_logged = True
            log.error("lock: lease renewal refused, retrying until the lease ends: %s", exc)
        if time.monotonic() < hold.expires_at:
            METRICS.inc("lock_renew_total", outcome="error")
            hold.next_renewal = time.monotonic() + min(hold.lease / 10, 0.5)
            log.debug("lock: renewal failed, retrying: %s", type(exc).__name__)
            return
        self._lost(hold)


def _unbounded(hold: Hold) -> bool:
    """True when `hold`'s backend calls may have no client-side deadline (PostgreSQL: libpq cannot
    bound a server process that stopped answering). The watchdog makes such calls (session checks,
    renewals, releases of orphaned holds and their retries) in threads of their own: on its own
    thread one stopped backend would stop every renewal, liveness beat and check of the client, and
    a live holder's Redis lock would be taken over once its process's liveness lapsed."""
    return hold.backend.unbounded_calls


def _own_thread(work: Callable[[Hold], None], hold: Hold, name: str) -> None:
    threading.Thread(target=work, args=(hold,), name=name, daemon=True).start()


def _every(hold: Hold) -> float:
    """How often the watchdog renews `hold` (a third of its lease), or checks its session."""
    return hold.backend.session_check_every or hold.lease / 3
