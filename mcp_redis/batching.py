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
the connection is dropped. The copies are marked (`shared_failure`): the
retry policy retries each call as before, and its circuit breaker counts the
trip's failure once, through the call whose thread sent it. Any other
exception in the sending thread (``KeyboardInterrupt``, a signal handler's
own exception, a bug) is that thread's own: if nothing was sent yet, the
other calls go in the next trip; once sent, the replies not yet read are
lost to their calls, which get a (marked) ``ConnectionError`` and are
retried like any call whose reply was lost (a read resumed after an
interruption could have lost bytes between the socket and the parser and
handed a reply to the wrong call). A thread interrupted while it waits
leaves its call, which is then dropped if not yet sent.

A call waits for the trips ahead of it (one per `MAX_CALLS` calls queued
before it) and its own, each bounded by the socket timeout.
"""

from __future__ import annotations

import collections
import copy
import threading
import weakref
from typing import Any, Deque, Dict, List, Optional

import redis

__all__ = ["SharedTrips", "shared_failure"]

#: The most calls, and the most request bytes, one trip carries.
MAX_CALLS = 128
MAX_BYTES = 1 << 20


#: The attribute that marks an exception as a copy of another call's failure.
_SHARED = "_mcp_redis_shared_trip"


def shared_failure(exc: BaseException) -> bool:
    """True for a call's copy of the failure of a trip another thread sent (see the module doc)."""
    return getattr(exc, _SHARED, False) is True


class _Call:
    __slots__ = ("data", "count", "got", "replies", "error", "lead", "started", "gone", "queued", "gate")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count  # replies expected
        self.got: List[Any] = []  # replies read so far
        self.replies: Optional[List[Any]] = None  # all of them, once read
        self.error: Optional[BaseException] = None
        self.lead = False  # set when the call's thread is to send the next trip
        self.started = False  # its thread began to (the lead is then passed on when it ends)
        self.gone = False  # its thread stopped waiting
        self.queued = False  # in the queue
        self.gate: Optional[Any] = None  # a held lock its thread waits on


class SharedTrips:
    """Concurrent calls on one connection pool share round trips. Thread-safe."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
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
                    self._trips += 1
                    self._calls += 1
                else:
                    call = _Call(data, count)
                    call.gate = gate = threading.Lock()
                    gate.acquire()
                    call.queued = True
                    self._queue.append(call)
            if alone:
                return self._alone(data, count)
            gate.acquire()  # released once answered, or handed the lead
            assert call is not None
            if call.lead:
                self._lead(call)
        except BaseException:
            if call is not None:  # interrupted while it waited, or as it began to lead
                with self._lock:
                    call.gone = True
                    handed = call.lead and not call.started
                if handed:  # handed the lead before it began: pass it on
                    self._pass_lead()
            raise
        finally:
            if alone:
                self._pass_lead()
        return _outcome(call)

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
        """Send `own` and the calls queued behind it (up to the caps) in one trip, answer
        them, pass the lead on."""
        own.started = True
        batch = [own]
        try:
            size = len(own.data)
            with self._lock:
                queue = self._queue
                while queue and len(batch) < MAX_CALLS and size < MAX_BYTES:
                    call = queue.popleft()
                    call.queued = False
                    if not call.gone:
                        batch.append(call)
                        size += len(call.data)
                self._trips += 1
                self._calls += len(batch)
            self._trip(batch)
        finally:
            for i, call in enumerate(batch):
                if call.queued:  # put back, unsent: it goes in the next trip
                    continue
                if call.replies is None and call.error is None:  # interrupted before the trip began
                    call.error = _mark(_interrupted())
                if i:
                    assert call.gate is not None
                    call.gate.release()
            self._pass_lead()

    def _pass_lead(self) -> None:
        with self._lock:
            queue = self._queue
            while queue:
                call = queue.popleft()
                call.queued = False
                if not call.gone:
                    call.lead = True
                    assert call.gate is not None
                    call.gate.release()
                    return
            self._busy = False

    def _trip(self, batch: List[_Call]) -> None:
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
            own, others = batch[0], batch[1:]
            if _broken(exc):  # the trip's failure: every call not answered shares it
                if connection is not None:
                    connection.disconnect()
                own.error = exc
                _fail(others, exc)
                return
            # The sending thread's own exception (an interruption, a signal handler's, a bug).
            own.error = exc
            if not sending:  # nothing sent: the others go in the next trip
                with self._lock:
                    for call in others:
                        call.queued = True
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


def _fail(calls: List[_Call], exc: BaseException) -> None:
    for call in calls:
        if call.replies is None and not call.queued:
            call.error = _mark(_copy(exc))


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
