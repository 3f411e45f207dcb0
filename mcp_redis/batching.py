"""Round trips shared by the threads of one process.

A legacy service scales by threads: many of them call the library at once,
and each call used to take its own pooled connection for its own round trip.
Redis serves one command at a time on one thread, and much of what a small
command costs it is the system calls around it (reading the request,
writing the reply), so at fleet scale the server's CPU per operation, not
the network, sets how many operations one Redis serves.

`SharedTrips` lets concurrent calls share trips, with no timer and no
waiting for company. A call made while none is in flight is sent at once, on
one pooled connection, by the thread that made it: a single caller pays
nothing but a lock. Calls made while a trip is in flight queue; when the
trip ends, the first of them takes every queued call (up to a cap) in one
write and reads their replies in order. Each call gets its own replies (an
error reply is that call's own exception).

Only non-blocking commands may be sent this way: a ``BLPOP`` would hold
every call queued behind it. The library's hot paths use it (rate-limit
hits, lock grants, releases and one-hold renewals, session and cache
reads); blocking waits, pub/sub and redis-py pipelines do not.

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
leaves its call, which is then dropped if not yet sent.

A call waits for the trips ahead of it (one per `MAX_CALLS` calls queued
before it) and its own, each bounded by the socket timeout. The hand-overs
run to their end through further interruptions (`_settled`); one landing in
the few instructions no Python code can guard can still lose the lead, and
then a waiting call takes it over once no trip has begun for `stall_after`
(the pool, connect and two socket timeouts: 10 s at the defaults).
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional

import redis

__all__ = ["SharedTrips", "shared_failure"]

log = logging.getLogger("mcp_redis.batching")

#: The most calls one trip carries.
MAX_CALLS = 128


#: The attribute that marks an exception as a copy of another call's failure.
_SHARED = "_mcp_redis_shared_trip"


def shared_failure(exc: BaseException) -> bool:
    """True for a call's copy of the failure of a trip another thread sent (see the module doc)."""
    return getattr(exc, _SHARED, False) is True


class _Call:
    __slots__ = ("data", "count", "got", "replies", "error", "lead", "started", "gone", "gate")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count  # replies expected
        self.got: List[Any] = []  # replies read so far
        self.replies: Optional[List[Any]] = None  # all of them, once read
        self.error: Optional[BaseException] = None
        self.lead = False  # set when the call's thread is to send the next trip
        self.started = False  # its thread began to (the lead is then passed on when it ends)
        self.gone = False  # its thread stopped waiting
        self.gate: Optional[Any] = None  # a held lock its thread waits on


class SharedTrips:
    """Concurrent calls on one connection pool share round trips. Thread-safe."""

    def __init__(self, pool: Any, stall_after: float = 10.0) -> None:
        self._pool = pool
        # Longer than any trip takes (a connection's wait, connect and replies): a lead
        # older than this was lost (see `send`), and a waiting call takes it over.
        self._stall_after = stall_after
        self._lead_at = 0.0  # when the lead in force began (monotonic)
        self.encoder = pool.get_encoder()  # how the calls' arguments are packed
        self._lock = threading.Lock()
        self._queue: Deque[_Call] = collections.deque()
        self._busy = False
        self._trips = 0  # trips sent
        self._calls = 0  # calls they carried
        _live.add(self)

    def __repr__(self) -> str:
        return f"SharedTrips(queued={len(self._queue)}, busy={self._busy})"

    def stats(self) -> Dict[str, int]:
        """Trips sent and the calls they carried (since made, or since a fork), calls queued now."""
        with self._lock:
            return {"trips": self._trips, "calls": self._calls, "queued": len(self._queue)}

    def send(self, data: bytes, count: int) -> List[Any]:
        """Send one call's packed commands (`count` of them); its replies, in order.

        An error reply is returned as its exception, in its place; an error
        of the connection is raised (after the trip dropped the connection).
        """
        alone = False
        call: Optional[_Call] = None
        try:
            with self._lock:
                if not self._busy:  # nothing in flight, so nothing queued: this call goes now, by itself
                    alone = True
                    self._busy = True
                    self._lead_at = time.monotonic()
                    self._trips += 1
                    self._calls += 1
                else:
                    call = _Call(data, count)
                    call.gate = gate = threading.Lock()
                    gate.acquire()
                    self._queue.append(call)
            if alone:
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
            if alone:
                progress = _Progress()
                _settled(lambda: self._pass_lead(progress))
        return _outcome(call)

    def _take_over(self, call: _Call) -> bool:
        """True when `call`, waiting on a lead that was lost, stops waiting.

        A signal handler's exception (``KeyboardInterrupt``) landing in the
        few instructions where a sending thread takes calls from the queue or
        hands the lead on can lose the lead, which would leave every later
        call of the process waiting. A call that has waited `stall_after`
        without a trip beginning takes the lead if it is still queued; if it
        was taken into the lost trip, it fails with a (marked)
        ``ConnectionError``, its reply lost, and the policy retries it. (Were
        the lead only slow, two trips go at once: harmless.)
        """
        with self._lock:
            now = time.monotonic()
            if now - self._lead_at < self._stall_after or call.replies is not None or call.error is not None:
                return False
            if call in self._queue:
                self._queue.remove(call)
                call.lead = True
                self._busy = True
                self._lead_at = now
            else:
                call.error = _mark(_interrupted())
                if not self._queue:
                    self._busy = False
        log.warning("mcp_redis: a shared round trip's sending thread was interrupted as it took calls or "
                    "handed the lead on; a waiting call stopped waiting after %.1f s", self._stall_after)
        return True

    def _leave(self, call: _Call, progress: _Progress) -> None:
        """A waiting thread leaves (interrupted): its call is dropped if not sent yet, and a
        lead handed to it before it began is passed on."""
        with self._lock:
            call.gone = True
            handed = call.lead and not call.started
        if handed:
            self._pass_lead(progress)

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
                self._lead_at = time.monotonic()
                queue = self._queue
                n = min(len(queue), MAX_CALLS - 1)
                if n:  # two steps in C: interrupted between them, the calls are in both
                    batch.extend(itertools.islice(queue, n))
                    self._queue = collections.deque(itertools.islice(queue, n, None))
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
        self._pass_lead(progress)

    def _pass_lead(self, progress: _Progress) -> None:
        """Hand the lead to the first call still waited on, else go idle (once per `progress`)."""
        if progress.passed:
            return
        with self._lock:
            queue = self._queue
            while queue:
                call = queue.popleft()
                if not call.gone:
                    call.lead = True
                    assert call.gate is not None
                    call.gate.release()
                    progress.passed = True  # (interrupted just before: a second leader, not a stall)
                    return
            self._busy = False
            progress.passed = True

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
        self._busy = False
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
