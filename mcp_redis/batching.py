"""Round trips shared by the threads of one process.

A legacy service scales by threads: many of them call the library at once,
and each call used to take its own pooled connection for its own round trip.
Redis serves one command at a time on one thread, and much of what a small
command costs it is the system calls around it (reading the request,
writing the reply), so at fleet scale the server's CPU per operation, not
the network, sets how many operations one Redis serves.

`SharedTrips` lets concurrent calls share trips, with no timer and no
waiting for company. A process keeps up to `lanes` trips in flight at once
(the `trips_in_flight` setting, 2 by default). A call made while fewer are
in flight is sent at once, on one pooled connection, by the thread that made
it: a single caller pays nothing but a lock. Calls made while every lane is
busy queue; when a trip ends, the first of them takes every queued call (up
to a cap) in one write and reads their replies in order. Each call gets its
own replies (an error reply is that call's own exception).

Fewer lanes, bigger trips: less of Redis's CPU per call, which is what
bounds a fleet on one Redis. More lanes, more calls in flight: over a slow
link (milliseconds per round trip) a queued call waits for a lane to free,
and with one lane a process's threads fell into two groups taking turns, at
about half the calls per second of one connection per call. Two lanes keep
most of the first and recover part of the second (docs/scaling.md).

Only non-blocking commands may be sent this way: a ``BLPOP`` would hold
every call queued behind it. The library's hot paths use it (rate-limit
hits, lock grants, releases and one-hold renewals, session reads and
writes, cache reads, fills and invalidations); blocking waits, pub/sub,
redis-py pipelines and event appends do not (an append is not idempotent:
see below).

A broken connection (a redis-py ``ConnectionError`` or ``TimeoutError``)
fails the calls of its trip alone, each with its own copy of the error, and
the connection is dropped; the retry policy retries each call as before. A
cut connection is one event: its copies are marked (`shared_failure`) and
the circuit breaker counts it once, through the call whose thread sent the
trip. A timeout counts per call, as before calls shared trips (each waited
its whole socket timeout), so a stalled server opens the breaker within
about two socket timeouts (the trip in flight, then the next). Any other
exception in the sending thread (``KeyboardInterrupt``, a signal handler's
own exception, a bug) is that thread's own: if nothing was sent yet, the
other calls go in the next trip; once sent, the replies not yet read are
lost to their calls, which get a (marked) ``ConnectionError`` and are
retried like any call whose reply was lost (a read resumed after an
interruption could have lost bytes between the socket and the parser and
handed a reply to the wrong call). A thread interrupted while it waits
leaves its call, which is then dropped if not yet sent. So one lost trip
is a lost reply for every call in it: only calls that are safe to run
again, or whose repeat is documented (a rate-limit hit), go this way.

A call waits for the trips ahead of it (one per `MAX_CALLS` calls queued
before it) and its own, each bounded by the socket timeout. The hand-overs
run to their end through further interruptions (`_settled`); one landing in
the few instructions no Python code can guard can still lose the lead, and
then a waiting call takes it over once no trip has begun for `stall_after`
(the pool, connect and two socket timeouts: 10 s at the defaults), or a
call that finds every lane busy takes over a lane that old. Lanes are
tokens, each freed once: a lead that was only slow (its process stopped)
and is taken over frees nothing when it ends.
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Set

import redis

__all__ = ["SharedTrips", "shared_failure"]

log = logging.getLogger("mcp_redis.batching")

#: The most calls one trip carries.
MAX_CALLS = 128

#: The most trips in flight at once, by default (the `trips_in_flight` setting; see the module doc).
LANES = 2


#: The attribute that marks an exception as a copy of another call's failure.
_SHARED = "_mcp_redis_shared_trip"


def shared_failure(exc: BaseException) -> bool:
    """True for a call's copy of the failure of a trip another thread sent (see the module doc)."""
    return getattr(exc, _SHARED, False) is True


class _Lane:
    """One of the trips a process may have in flight: its token, held by the thread that
    sends (or is about to send) a trip in it, and handed on with the lead."""

    __slots__ = ("since",)

    def __init__(self, since: float) -> None:
        self.since = since  # when its current trip, or the hand-over to it, began (monotonic)


class _Call:
    __slots__ = ("data", "count", "got", "replies", "error", "lead", "lane", "taken_by", "started", "gone",
                 "gate")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count  # replies expected
        self.got: List[Any] = []  # replies read so far
        self.replies: Optional[List[Any]] = None  # all of them, once read
        self.error: Optional[BaseException] = None
        self.lead = False  # set when the call's thread is to send the next trip
        self.lane: Optional[_Lane] = None  # the lane it was handed with the lead
        self.taken_by: Optional[_Lane] = None  # the lane of the trip that carries it
        self.started = False  # its thread began to (the lead is then passed on when it ends)
        self.gone = False  # its thread stopped waiting
        self.gate: Optional[Any] = None  # a held lock its thread waits on


class SharedTrips:
    """Concurrent calls on one connection pool share round trips. Thread-safe."""

    def __init__(self, pool: Any, stall_after: float = 10.0, lanes: int = LANES) -> None:
        if not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1:
            raise ValueError(f"lanes: must be an int >= 1, got {lanes!r}")
        self._pool = pool
        self._lanes = lanes  # trips in flight at once, at most
        # Longer than any trip takes (a connection's wait, connect and replies): a lead
        # older than this was lost (see `send`), and a waiting call takes it over.
        self._stall_after = stall_after
        self.encoder = pool.get_encoder()  # how the calls' arguments are packed
        self._lock = threading.Lock()
        self._queue: Deque[_Call] = collections.deque()
        self._active: Set[_Lane] = set()  # the lanes in use: at most `lanes`
        self._trips = 0  # trips sent
        self._calls = 0  # calls they carried
        _live.add(self)

    def __repr__(self) -> str:
        return f"SharedTrips(queued={len(self._queue)}, in_flight={len(self._active)}, lanes={self._lanes})"

    def stats(self) -> Dict[str, int]:
        """Trips sent and the calls they carried (since made, or since a fork), calls queued now."""
        with self._lock:
            return {"trips": self._trips, "calls": self._calls, "queued": len(self._queue)}

    def in_flight(self) -> int:
        """Lanes in use now: trips in flight, or about to be (at most `lanes`)."""
        with self._lock:
            return len(self._active)

    def send(self, data: bytes, count: int) -> List[Any]:
        """Send one call's packed commands (`count` of them); its replies, in order.

        An error reply is returned as its exception, in its place; an error
        of the connection is raised (after the trip dropped the connection).
        """
        lane: Optional[_Lane] = None
        call: Optional[_Call] = None
        lost = False
        try:
            with self._lock:
                # A lane is free (so nothing is queued), or one was lost: this call goes now, alone.
                if len(self._active) < self._lanes or (lost := self._drop_lost_lane(time.monotonic())):
                    lane = _Lane(time.monotonic())
                    self._active.add(lane)
                    self._trips += 1
                    self._calls += 1
                else:
                    call = _Call(data, count)
                    call.gate = gate = threading.Lock()
                    gate.acquire()
                    self._queue.append(call)
            if lane is not None:
                if lost:
                    self._warn_lost()
                return self._alone(data, count)
            assert call is not None
            while not gate.acquire(timeout=self._stall_after):  # released once answered, or handed the lead
                if self._take_over(call):
                    break
            if call.lead:
                self._lead(call)
        except BaseException:
            if call is not None:  # interrupted while it waited, or as it began to lead
                progress = _Progress()
                _settled(lambda: self._leave(call, progress))
            raise
        finally:
            if lane is not None:
                progress = _Progress()
                _settled(lambda: self._pass_lead(lane, progress))
        return _outcome(call)

    def _take_over(self, call: _Call) -> bool:
        """True when `call`, waiting on a lead that was lost, stops waiting.

        A signal handler's exception (``KeyboardInterrupt``) landing in the
        few instructions where a sending thread takes calls from the queue or
        hands the lead on can lose the lead, and with it a lane: with every
        lane lost, every later call of the process would wait. A call that
        has waited `stall_after` while a lane has seen no trip begin for as
        long takes that lane over: if the call is still queued, it leads the
        next trip in it; if it was taken into that lane's trip, it fails with
        a (marked) ``ConnectionError``, its reply lost, and the policy
        retries it, and the lane is freed; if its trip answered it but its
        lead was lost before waking it, it takes its outcome. A lead that
        was only slow (its process frozen, say) ends its trip in a lane no
        longer its own: it frees nothing and hands the lead on only into a
        free lane, so lanes are never counted twice.
        """
        with self._lock:
            if call.lead:
                return True  # handed the lead (the hand-over was interrupted before the gate)
            now = time.monotonic()
            lane = call.taken_by
            if call.replies is not None or call.error is not None:
                # Answered, and not woken within `stall_after` of queueing: its trip's lead was
                # lost after the trip, before its clean-up began (or is just about to run it:
                # then its lane, freed here, frees nothing when it does). Its outcome is here.
                if lane is not None and lane in self._active:
                    self._active.discard(lane)
                    self._wake_next()
            elif call in self._queue:
                if len(self._active) >= self._lanes and not self._drop_lost_lane(now):
                    return False
                self._queue.remove(call)
                self._hand(call, now)
            else:
                if lane is None or now - lane.since < self._stall_after:
                    return False
                call.error = _mark(_interrupted())
                self._active.discard(lane)
                self._wake_next()  # the lane freed goes to the calls queued behind
        self._warn_lost()
        return True

    def _drop_lost_lane(self, now: float) -> bool:
        """Free the oldest lane that has seen no trip begin for `stall_after`, if any (under the
        lock): its lead was lost, or is so slow (its process stopped) that it is taken for lost."""
        stale = [lane for lane in self._active if now - lane.since >= self._stall_after]
        if not stale:
            return False
        self._active.discard(min(stale, key=lambda lane: lane.since))
        return True

    def _warn_lost(self) -> None:
        log.warning("mcp_redis: a shared round trip took more than %.1f s to begin or to end (its sending "
                    "thread was interrupted, or the process was stopped); its lane was taken over",
                    self._stall_after)

    def _hand(self, call: _Call, now: float) -> None:
        """Give `call` the lead, in a new lane (under the lock; the caller releases its gate)."""
        lane = call.lane = _Lane(now)
        self._active.add(lane)
        call.lead = True

    def _leave(self, call: _Call, progress: _Progress) -> None:
        """A waiting thread leaves (interrupted): its call is dropped if not sent yet, and a
        lead handed to it before it began is passed on."""
        with self._lock:
            call.gone = True
            handed = call.lead and not call.started
        if handed:
            assert call.lane is not None
            self._pass_lead(call.lane, progress)

    def _alone(self, data: bytes, count: int) -> List[Any]:
        """A trip of one call: no one else's replies to read or errors to share (redis-py drops
        the connection on any error)."""
        pool = self._pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([data])
            replies = []
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            # Sent, its replies not all read: a signal handler's exception raised between the
            # send and the read (redis-py drops the connection on any error inside either)
            # would leave them to the connection's next user.
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _lead(self, own: _Call) -> None:
        """Send `own` and the calls queued behind it (up to `MAX_CALLS`) in one trip, answer
        them, pass the lead on."""
        batch = [own]
        began = False
        try:
            own.started = True
            with self._lock:
                lane = own.lane
                assert lane is not None
                lane.since = time.monotonic()
                queue = self._queue
                n = min(len(queue), MAX_CALLS - 1)
                if n:  # two steps in C: interrupted between them, the calls are in both
                    batch.extend(itertools.islice(queue, n))
                    self._queue = collections.deque(itertools.islice(queue, n, None))
                for call in batch:
                    call.taken_by = lane
                self._trips += 1
                self._calls += len(batch)
            began = True
            self._trip(batch)
        finally:
            if own.started:  # else its thread passes the lead on (see `send`)
                progress = _Progress()
                _settled(lambda: self._finish(batch, began, progress))

    def _finish(self, batch: List[_Call], began: bool, progress: _Progress) -> None:
        """After a trip: wake the calls it answered (or failed), put back those it did not send,
        pass the lead on. Safe to run again after an interruption (`_settled`)."""
        if not progress.answered:
            with self._lock:
                queue = self._queue
                if not began:  # interrupted before the trip: the others go first in the next one
                    queue.extendleft(reversed([call for call in batch[1:] if call not in queue]))
                else:
                    for call in batch[1:]:
                        if call in queue:  # put back by `_trip`, unsent
                            continue
                        if call.replies is None and call.error is None:
                            call.error = _mark(_interrupted())
                        assert call.gate is not None
                        if call.gate.locked():
                            call.gate.release()
            progress.answered = True
        assert batch[0].lane is not None
        self._pass_lead(batch[0].lane, progress)

    def _pass_lead(self, lane: _Lane, progress: _Progress) -> None:
        """`lane`'s trip is over: hand the lead to the first call still waited on, in a lane of
        its own, else free the lane (once per `progress`). A lane taken over meanwhile
        (`_take_over`) is no longer this thread's: the lead goes on only if a lane is free."""
        if progress.passed:
            return
        with self._lock:
            self._active.discard(lane)
            self._wake_next()
            # (Interrupted just before, this runs again: a second lead goes only into a free lane.)
            progress.passed = True

    def _wake_next(self) -> None:
        """If a lane is free, hand the lead to the first queued call still waited on (under the lock)."""
        queue = self._queue
        if len(self._active) < self._lanes:
            while queue:
                call = queue.popleft()
                if not call.gone:
                    self._hand(call, time.monotonic())
                    assert call.gate is not None
                    call.gate.release()
                    return

    def _trip(self, batch: List[_Call]) -> None:
        own = batch[0]
        batch = [own, *[call for call in batch[1:] if not call.gone]]  # a call left by its thread: not sent
        pool = self._pool
        connection = None
        sending = False
        try:
            connection = pool.get_connection()
            sending = True
            connection.send_packed_command([batch[0].data if len(batch) == 1
                                            else b"".join([call.data for call in batch])])
            _read(connection, batch)
        except BaseException as exc:
            others = batch[1:]
            if _broken(exc):  # the trip's failure: every call not answered shares it
                if connection is not None:
                    connection.disconnect()
                own.error = exc
                # A timeout counts against the breaker per call, as before calls shared trips:
                # each waited its whole socket timeout on a server that did not answer. A cut
                # connection is one event, counted once (through `own`).
                _fail(others, exc, mark=not isinstance(exc, redis.TimeoutError))
                return
            # The sending thread's own exception (an interruption, a signal handler's, a bug).
            own.error = exc
            if not sending:  # nothing sent: the others go first in the next trip
                with self._lock:
                    self._queue.extendleft(reversed(others))
            else:
                # Sent, in whole or in part: the replies not read are lost to their calls (a
                # read resumed after an interruption could have lost bytes between the socket
                # and the parser, and hand a reply to the wrong call).
                assert connection is not None
                connection.disconnect()
                _fail(others, _interrupted())
            raise
        finally:
            if connection is not None:
                pool.release(connection)

    def forget(self) -> None:
        """After ``fork``: the child's own lock and an empty queue (the parent's
        threads, and their calls, are not in the child)."""
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._active = set()
        self._trips = self._calls = 0


class _Progress:
    """How far a cleanup got, so that running it again after an interruption repeats nothing."""

    __slots__ = ("answered", "passed")

    def __init__(self) -> None:
        self.answered = False
        self.passed = False


#: How many interruptions a cleanup outlasts before it gives up (a bug, not a signal storm).
_RETRIES = 1000


def _settled(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` (safe to repeat) to its end even when a signal handler raises into it
    (``KeyboardInterrupt``, a SIGALRM timeout's exception): left half done, it would strand
    every thread waiting for a trip. The first such exception is raised once it is done."""
    pending: Optional[BaseException] = None
    for _ in range(_RETRIES):
        try:
            cleanup()
            break
        except BaseException as exc:  # noqa: BLE001 - raised again below
            if pending is None:
                pending = exc
    if pending is not None:
        raise pending


def _read(connection: Any, batch: List[_Call]) -> None:
    """Read the replies of `batch` not read yet, in order (an error reply in its place)."""
    for call in batch:
        if call.replies is not None:
            continue
        got = call.got
        while len(got) < call.count:
            try:
                got.append(connection.read_response())
            except redis.ResponseError as exc:
                got.append(exc)
        call.replies = got


def _broken(exc: BaseException) -> bool:
    """An error of the connection (as redis-py raises it), not of the thread that read it."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))


def _fail(calls: List[_Call], exc: BaseException, *, mark: bool = True) -> None:
    for call in calls:
        if call.replies is None:
            call.error = _mark(_copy(exc)) if mark else _copy(exc)


def _outcome(call: _Call) -> List[Any]:
    if call.error is not None:
        raise call.error
    assert call.replies is not None
    return call.replies


def _interrupted() -> BaseException:
    return redis.ConnectionError("a shared round trip was interrupted (its sending thread was)")


def _mark(exc: BaseException) -> BaseException:
    try:
        setattr(exc, _SHARED, True)
    except Exception:  # pragma: no cover - an exception that takes no attributes
        pass
    return exc


def _copy(exc: BaseException) -> BaseException:
    """Each waiting thread raises its own exception object (a traceback is per raise)."""
    try:
        return copy.copy(exc)
    except Exception:  # pragma: no cover - an exception class that cannot be copied
        return exc


_live: weakref.WeakSet[SharedTrips] = weakref.WeakSet()


def forget_after_fork() -> None:
    """In a forked child (`mcp_redis.connections` runs it): every `SharedTrips` starts idle."""
    for trips in list(_live):
        trips.forget()
