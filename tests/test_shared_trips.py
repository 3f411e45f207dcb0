"""Round trips shared by a process's threads (`mcp_redis.batching`), on real redis-servers.

Calls made while a trip is in flight queue and go together in the next one;
each gets its own replies, an error reply stays its call's own, a broken
trip fails its own calls alone (each with its own exception object, counted
once by the breaker), an interrupted thread's exception stays its own and
strands no one, and a forked child starts with an idle queue. Most tests
keep one trip in flight (`trips_in_flight=1`), the simplest case to reason
about; the default of two is tested on its own.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest
import redis

import mcp_redis
from mcp_redis import batching
from mcp_redis.batching import SharedTrips, _Lane, shared_failure
from mcp_redis.connections import _pack, get_redis
from mcp_redis.errors import BackendUnavailable
from mcp_redis.testing import RedisServer, wait_for
from mcp_redis.testing.faultproxy import FaultProxy


def busy(trips: SharedTrips, seconds: float) -> Any:
    """A trip that stays in flight `seconds`: ``DEBUG SLEEP`` (the test servers enable it)."""
    return trips.send(_pack(trips.encoder, ("DEBUG", "SLEEP", seconds)), 1)[0]


def command(trips: SharedTrips, *args: Any) -> Any:
    [reply] = trips.send(_pack(trips.encoder, args), 1)
    if isinstance(reply, Exception):
        raise reply
    return reply


class Callers:
    """One thread per call; each outcome (reply or exception) kept by index."""

    def __init__(self, calls: List[Callable[[], Any]]) -> None:
        self.outcomes: Dict[int, Any] = {}
        self.threads = [threading.Thread(target=self._run, args=(i, call), daemon=True)
                        for i, call in enumerate(calls)]

    def _run(self, i: int, call: Callable[[], Any]) -> None:
        try:
            self.outcomes[i] = call()
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.outcomes[i] = exc

    def start(self) -> Callers:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float = 10.0) -> Dict[int, Any]:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a caller never returned"
        return self.outcomes


def queued(trips: SharedTrips, n: int) -> None:
    wait_for(lambda: trips.stats()["queued"] >= n, 5.0, what=f"{n} calls queued")


DEBUG = ["--enable-debug-command", "yes"]


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread, as in a Python started from a terminal.
    A process started in the background by a non-interactive shell (CI's parallel passes) ignores
    SIGINT, and Python then leaves it ignored: these tests would see no KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def trips(redis_factory: Any) -> SharedTrips:
    mcp_redis.configure(redis_url=redis_factory(args=DEBUG).url, trips_in_flight=1)
    return get_redis().trips


def test_calls_made_during_a_trip_share_the_next_one_and_each_gets_its_own_reply(trips: SharedTrips) -> None:
    slow = Callers([lambda: busy(trips, 0.3)]).start()
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the slow trip sent")
    callers = Callers([lambda i=i: command(trips, "INCRBY", f"k{i}", i + 1) for i in range(20)]).start()
    queued(trips, 20)
    assert slow.join() == {0: "OK"}
    assert callers.join() == {i: i + 1 for i in range(20)}
    assert trips.stats() == {"trips": 2, "calls": 21, "queued": 0}


def test_under_contention_every_thread_reads_its_own_replies_in_order(trips: SharedTrips) -> None:
    def count(i: int) -> List[int]:
        return [command(trips, "INCR", f"n{i}") for _ in range(300)]

    outcomes = Callers([lambda i=i: count(i) for i in range(16)]).start().join(60)
    assert outcomes == {i: list(range(1, 301)) for i in range(16)}
    stats = trips.stats()
    assert stats["calls"] == 16 * 300
    assert stats["trips"] < stats["calls"]  # shared: fewer trips than calls


def in_flight(trips: SharedTrips, seconds: float) -> Any:
    """A trip that stays in flight `seconds` without stopping the server (unlike ``DEBUG
    SLEEP``): a ``BLPOP`` on a list no one fills, which only its own connection waits for."""
    return trips.send(_pack(trips.encoder, ("BLPOP", "nothing-comes", seconds)), 1)[0]


def test_with_two_trips_in_flight_a_call_goes_at_once_beside_one_and_queues_behind_two(
        redis_factory: Any) -> None:
    mcp_redis.configure(redis_url=redis_factory().url)  # the default: trips_in_flight=2
    trips = get_redis().trips
    first = Callers([lambda: in_flight(trips, 1.0)]).start()
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the first slow trip sent")
    # A second lane: this call does not wait for the trip in flight.
    assert command(trips, "INCR", "beside") == 1
    assert first.threads[0].is_alive()
    second = Callers([lambda: in_flight(trips, 0.3)]).start()
    wait_for(lambda: trips.stats()["trips"] == 3, 5.0, what="the second slow trip sent")
    # Both lanes busy: these queue, and share the trip that goes when one of them ends.
    behind = Callers([lambda i=i: command(trips, "INCR", f"behind{i}") for i in range(5)]).start()
    queued(trips, 5)
    assert second.join() == {0: None}
    assert behind.join() == {i: 1 for i in range(5)}
    assert first.threads[0].is_alive()  # they went in the lane the second trip freed
    assert first.join() == {0: None}
    assert trips.stats() == {"trips": 4, "calls": 8, "queued": 0}


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", 10_001])
def test_trips_in_flight_refuses_what_is_not_a_whole_number_from_1_to_10000(value: Any) -> None:
    before = mcp_redis.settings()
    with pytest.raises(mcp_redis.ConfigurationError, match="^trips_in_flight: "):
        mcp_redis.configure(trips_in_flight=value)
    assert mcp_redis.settings() == before


def test_an_error_reply_is_its_own_calls_alone(trips: SharedTrips) -> None:
    command(trips, "SET", "text", "not a number")  # the first trip
    slow = Callers([lambda: busy(trips, 0.3)]).start()
    wait_for(lambda: trips.stats()["trips"] == 2, 5.0, what="the slow trip sent")
    calls: List[Callable[[], Any]] = [lambda: command(trips, "INCR", "text")]
    calls += [lambda i=i: command(trips, "INCR", f"ok{i}") for i in range(5)]
    callers = Callers(calls).start()
    queued(trips, 6)
    slow.join()
    outcomes = callers.join()
    assert isinstance(outcomes[0], redis.ResponseError) and "not an integer" in str(outcomes[0])
    assert [outcomes[i] for i in range(1, 6)] == [1] * 5
    assert trips.stats()["trips"] == 3  # the error reply shared the third trip


def test_a_trip_whose_connection_breaks_fails_its_own_calls_alone(redis_factory: Any) -> None:
    server = redis_factory(args=DEBUG)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=0.5, trips_in_flight=1)
        trips = get_redis().trips
        slow = Callers([lambda: busy(trips, 0.3)]).start()
        wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the slow trip sent")
        # The next trip carries these five, one of them marked: its connection is never answered.
        proxy.swallow_requests(b"cut-here")
        cut = Callers([lambda: command(trips, "SET", "cut-here", 1)]
                      + [lambda i=i: command(trips, "INCR", f"lost{i}") for i in range(4)]).start()
        queued(trips, 5)
        assert slow.join() == {0: "OK"}
        wait_for(lambda: trips.stats()["trips"] == 2, 5.0, what="the marked trip sent")
        after = Callers([lambda i=i: command(trips, "INCR", f"after{i}") for i in range(3)]).start()
        queued(trips, 3)  # queued behind the trip that will break
        errors = list(cut.join().values())
        assert all(isinstance(e, redis.TimeoutError) for e in errors), errors
        assert len({id(e) for e in errors}) == 5  # each thread raised its own object
        assert after.join() == {0: 1, 1: 1, 2: 1}  # the next trip, on a fresh connection
        assert command(trips, "PING") == "PONG"
        proxy.swallow_requests(None)


class AfterSend:
    """The real pool; each connection it lends runs `after()` right after its next request is
    written (a trip is counted in `SharedTrips.stats` as it takes its lane, before it takes a
    connection and writes)."""

    def __init__(self, pool: Any, after: Callable[[], None]) -> None:
        self.pool = pool
        self.after = after

    def get_connection(self) -> Any:
        connection = self.pool.get_connection()
        send = type(connection).send_packed_command

        def then(*args: Any, **kwargs: Any) -> None:
            del connection.send_packed_command  # once: the class's method again
            send(connection, *args, **kwargs)
            self.after()

        connection.send_packed_command = then
        return connection

    def release(self, connection: Any) -> None:
        self.pool.release(connection)


def test_a_call_interrupted_between_its_send_and_its_read_leaves_no_reply_to_the_next(trips: SharedTrips) -> None:
    def interrupted() -> None:  # as a signal handler's exception landing right after the write
        raise KeyboardInterrupt

    trips._pool = interrupting = AfterSend(trips._pool, interrupted)
    with pytest.raises(KeyboardInterrupt):
        command(trips, "BLPOP", "nothing-comes", "0.3")  # its reply (nil) is 0.3 s away
    trips._pool = interrupting.pool
    assert command(trips, "SET", "b", "bee") == "OK"  # not the nil meant for the BLPOP
    assert command(trips, "GET", "b") == "bee"


class Deadline(Exception):
    """What a legacy SIGALRM timeout decorator raises in the thread it interrupts."""


def _raise_deadline(signum: int, frame: Any) -> None:
    raise Deadline("request took too long")


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGUSR1, Deadline)],
                         ids=["KeyboardInterrupt", "a signal handler's exception"])
def test_a_leader_interrupted_mid_trip_raises_alone_and_the_others_are_retried(
        trips: SharedTrips, signum: int, raised: type, monkeypatch: pytest.MonkeyPatch,
        sigint_raises: None) -> None:
    assert threading.current_thread() is threading.main_thread()
    if signum == signal.SIGUSR1:
        monkeypatch.setattr(signal, "_test_previous", signal.signal(signal.SIGUSR1, _raise_deadline), raising=False)
    written: List[None] = []
    trips._pool = AfterSend(trips._pool, lambda: written.append(None))
    try:
        first = Callers([lambda: busy(trips, 0.3)]).start()
        wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the first trip sent")
        main = threading.get_ident()

        def interrupt() -> None:
            # The main thread queued first: it leads the second trip, with five more calls.
            queued(trips, 6)
            # Written, not only counted (a trip is counted as it takes its lane): the signal
            # lands while the main thread waits for the replies.
            wait_for(lambda: len(written) == 2, 5.0, what="the second trip written")
            later.start()
            queued(trips, 2)  # behind the trip about to be interrupted
            signal.pthread_kill(main, signum)

        conn = get_redis()
        # Through the retry policy, as the library's calls go: an idempotent command.
        others = Callers([lambda i=i: conn.call(conn.run_command, "SET", f"o{i}", i) for i in range(5)])
        later = Callers([lambda i=i: command(trips, "INCR", f"later{i}") for i in range(2)])
        helper = threading.Thread(target=interrupt, daemon=True)
        helper.start()

        def start_others() -> None:
            queued(trips, 1)
            others.start()

        threading.Thread(target=start_others, daemon=True).start()
        with pytest.raises(raised):
            busy(trips, 1.0)
        helper.join(5)
        first.join()
        # The interruption was the main thread's alone: the calls of its trip lost their
        # replies (as to a cut connection) and were retried; none saw the main thread's exception,
        # and the breaker (threshold 5) counted no failure for them.
        assert others.join() == {i: "OK" for i in range(5)}
        assert conn.policy.breaker.state.name == "CLOSED"
        assert later.join() == {0: 1, 1: 1}  # the lead passed on: the calls behind went
        assert command(trips, "PING") == "PONG"
        assert trips.stats()["queued"] == 0
    finally:
        if signum == signal.SIGUSR1:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)


class GatedPool:
    """The real pool behind a turnstile: each `get_connection` waits for a permit (the test's
    stand-in for a pool whose connections are all busy)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.permits = threading.Semaphore(0)
        self.waiting = 0

    def get_connection(self) -> Any:
        self.waiting += 1
        try:
            self.permits.acquire()
        finally:
            self.waiting -= 1
        return self.pool.get_connection()

    def release(self, connection: Any) -> None:
        self.pool.release(connection)


def test_a_leader_interrupted_before_it_sent_puts_the_others_back_in_line(trips: SharedTrips,
                                                                        sigint_raises: None) -> None:
    gated = GatedPool(trips._pool)
    trips._pool = gated
    main = threading.get_ident()
    first = Callers([lambda: command(trips, "INCR", "first")]).start()
    wait_for(lambda: gated.waiting == 1, 5.0, what="the first trip waiting for a connection")
    others = Callers([lambda i=i: command(trips, "INCR", f"back{i}") for i in range(3)])

    def interrupt() -> None:
        queued(trips, 1)  # the main thread, first in line: it sends the next trip, with the others
        others.start()
        queued(trips, 4)
        gated.permits.release()  # the first trip goes
        wait_for(lambda: trips.stats()["trips"] == 2 and gated.waiting == 1, 5.0,
                 what="the main thread's trip waiting for a connection")
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        command(trips, "INCR", "main")
    assert first.join() == {0: 1}
    gated.permits.release()  # the others' trip: back in line, it goes next
    assert others.join() == {0: 1, 1: 1, 2: 1}
    trips._pool = gated.pool
    assert command(trips, "GET", "main") is None  # the interrupted call was never sent
    assert trips.stats() == {"trips": 4, "calls": 1 + 4 + 3 + 1, "queued": 0}


def six_calls_in_one_trip(trips: SharedTrips, conn: Any, arm: Callable[[], None] = lambda: None) -> Callers:
    """Six `INCR`s through the retry policy (one attempt each) queued behind a slow trip: they
    share the next one (`arm` runs once they are queued, before it goes). Started; joined by
    the caller."""
    base = trips.stats()["trips"]
    slow = Callers([lambda: busy(trips, 0.3)]).start()
    wait_for(lambda: trips.stats()["trips"] == base + 1, 5.0, what="the slow trip sent")
    calls = Callers([lambda i=i: conn.call(conn.run_command, "INCR", f"c{i}", attempts=1)
                     for i in range(6)]).start()
    queued(trips, 6)
    arm()
    slow.join()
    return calls


def test_a_timed_out_trip_counts_against_the_breaker_per_call(redis_factory: Any) -> None:
    server = redis_factory(args=DEBUG)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=0.5, breaker_failure_threshold=3, trips_in_flight=1,
                            retry_attempts=3, breaker_reset_timeout=30)
        conn = get_redis()
        proxy.swallow_requests(b"INCR")  # the six calls' request is never answered
        stalled = six_calls_in_one_trip(conn.trips, conn).join()
        proxy.swallow_requests(None)
        # Each call waited its socket timeout, each counts (as on its own connection before
        # trips were shared): the breaker (threshold 3) opens.
        assert all(isinstance(e, BackendUnavailable) for e in stalled.values()), stalled
        assert conn.policy.breaker.state.name == "OPEN"


class CutAfterSend:
    """The real pool, but once armed the next connection it lends loses its link right after
    the trip is written: its first read fails as redis-py's does on a socket the server closed
    (the requests were sent and run; their replies are lost)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.armed = False
        self.cut = 0
        self.lent = 0

    def get_connection(self) -> Any:
        connection = self.pool.get_connection()
        self.lent += 1
        if self.armed:
            self.armed = False

            def read_after_the_cut(*args: Any, **kwargs: Any) -> Any:
                del connection.read_response  # once: the class's method again
                connection.disconnect()
                self.cut += 1
                raise redis.ConnectionError("Connection closed by server.")

            connection.read_response = read_after_the_cut
        return connection

    def release(self, connection: Any) -> None:
        self.pool.release(connection)


def test_a_cut_trip_counts_against_the_breaker_once(redis_factory: Any) -> None:
    mcp_redis.configure(redis_url=redis_factory(args=DEBUG).url, breaker_failure_threshold=3, trips_in_flight=1,
                        breaker_reset_timeout=30)
    conn = get_redis()
    trips = conn.trips
    cutter = CutAfterSend(trips._pool)
    trips._pool = cutter
    try:
        before = trips.stats()["trips"]

        def arm() -> None:
            # The slow trip is counted as it takes its lane, before it takes a connection: armed
            # only once it has one, the next connection lent is the six calls' trip's.
            wait_for(lambda: cutter.lent == 1, 5.0, what="the slow trip's connection lent")
            cutter.armed = True

        outcomes = six_calls_in_one_trip(trips, conn, arm=arm).join()
        assert cutter.cut == 1 and trips.stats()["trips"] == before + 2  # one trip carried all six
        # All six lost their replies (one attempt each). The trip is one event: it counted once
        # against the breaker (threshold 3), which stays closed.
        assert all(isinstance(e, BackendUnavailable) for e in outcomes.values()), outcomes
        assert conn.policy.breaker.state.name == "CLOSED"
        assert command(trips, "PING") == "PONG"
    finally:
        trips._pool = cutter.pool


def test_a_waiting_thread_interrupted_leaves_without_stranding_the_others(trips: SharedTrips,
                                                                         sigint_raises: None) -> None:
    first = Callers([lambda: busy(trips, 0.5)]).start()
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the first trip sent")
    main = threading.get_ident()
    behind = Callers([lambda i=i: command(trips, "INCR", f"b{i}") for i in range(3)])

    def interrupt() -> None:
        queued(trips, 1)  # the main thread waits first in line: it would lead the next trip
        behind.start()
        queued(trips, 4)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        command(trips, "INCR", "main")
    assert first.join() == {0: "OK"}
    assert behind.join() == {0: 1, 1: 1, 2: 1}
    assert command(trips, "GET", "main") is None  # the abandoned call was dropped, never sent
    assert trips.stats()["queued"] == 0


def test_a_child_forked_during_a_trip_starts_with_an_idle_queue(trips: SharedTrips) -> None:
    slow = Callers([lambda: busy(trips, 0.5)]).start()
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the slow trip sent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if command(trips, "INCR", "child") == 1 and trips.stats()["queued"] == 0:
                code = 0
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    try:
        answered, _, _ = select.select([read], [], [], 10)
        assert answered, "the forked child's call hung"
        assert os.read(read, 1) == b"\x00"
    finally:
        os.close(read)
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert slow.join() == {0: "OK"}


def test_a_stopped_server_fails_every_queued_call_within_two_socket_timeouts(redis_factory: Any) -> None:
    server: RedisServer = redis_factory()
    mcp_redis.configure(redis_url=server.url, socket_timeout=0.5, trips_in_flight=1)
    trips = get_redis().trips
    assert command(trips, "PING") == "PONG"  # a pooled connection, checked
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = Callers([lambda i=i: command(trips, "INCR", f"s{i}") for i in range(10)]).start().join(10)
        took = time.monotonic() - started
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert all(isinstance(e, (redis.TimeoutError, redis.ConnectionError)) for e in outcomes.values()), outcomes
    assert took < 2 * 0.5 + 0.8, took
    assert command(trips, "PING") == "PONG"


@pytest.fixture
def library_calls(redis_mode: str) -> Iterator[SharedTrips]:
    yield get_redis().trips


def test_the_librarys_hot_paths_share_trips(library_calls: SharedTrips) -> None:
    limiter = mcp_redis.RateLimiter("shared-trips", 1_000_000, 60)
    sessions = mcp_redis.SessionStore()
    sessions.bind("session", "agent")
    before = library_calls.stats()["calls"]

    def work(i: int) -> int:
        for _ in range(50):
            assert limiter.hit(f"k{i}").allowed
            with mcp_redis.agent_lock(f"agent-{i}"):
                pass
            assert sessions.get("session") == "agent"
            sessions.bind(f"session-{i}", f"agent-{i}")
        return i

    assert Callers([lambda i=i: work(i) for i in range(8)]).start().join(60) == {i: i for i in range(8)}
    stats = library_calls.stats()
    # A hit, a grant, a release, a session read and a bind each time.
    assert stats["calls"] - before >= 8 * 50 * 5
    assert stats["trips"] < stats["calls"]


def test_a_lost_lead_is_taken_over_by_a_waiting_call(redis_factory: Any) -> None:
    """The state a signal landing in the lead's hand-over can leave (no thread sends, and
    trips are marked in flight), made by hand: a later call takes the lead over after
    ``pool_timeout + socket_connect_timeout + 2 × socket_timeout`` and every call goes."""
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, socket_timeout=0.2, socket_connect_timeout=0.2, pool_timeout=0.2,
                        trips_in_flight=1)
    trips = get_redis().trips
    assert command(trips, "PING") == "PONG"
    with trips._lock:  # a lead that began, then was lost: its lane in use, no thread to free it
        trips._active.add(_Lane(time.monotonic()))
    started = time.monotonic()
    outcomes = Callers([lambda i=i: command(trips, "INCR", f"t{i}") for i in range(4)]).start().join(10)
    assert outcomes == {0: 1, 1: 1, 2: 1, 3: 1}
    assert 0.8 <= time.monotonic() - started < 5.0
    assert command(trips, "PING") == "PONG"
    assert trips.stats()["queued"] == 0
    assert trips.in_flight() == 0  # the lost lane was taken over, then freed


def test_a_lost_lane_is_taken_over_by_a_call_that_finds_every_lane_busy(redis_factory: Any) -> None:
    """Two lanes, one lost (a reviewer's case: the other lane kept serving the queue, so no call
    ever waited `stall_after`, and the process ran on one lane for good)."""
    mcp_redis.configure(redis_url=redis_factory().url, socket_timeout=0.5, socket_connect_timeout=0.2,
                        pool_timeout=0.2)  # stall_after: 1.4 s; trips_in_flight: 2
    trips = get_redis().trips
    with trips._lock:  # a lane whose lead was lost long ago
        trips._active.add(_Lane(time.monotonic() - 100))
    slow = Callers([lambda: in_flight(trips, 0.3)]).start()  # the other lane, busy
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the slow trip sent")
    assert command(trips, "INCR", "now") == 1  # took the lost lane over: did not queue
    assert slow.threads[0].is_alive()
    assert slow.join() == {0: None}
    assert trips.in_flight() == 0


def test_calls_answered_by_a_trip_whose_lead_was_lost_after_it_get_their_replies(
        redis_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reviewer's case: the lead lost in the one line between its trip and its clean-up (the
    calls it carried answered, never woken). They take their replies after `stall_after`, and
    the lost lane is freed."""
    mcp_redis.configure(redis_url=redis_factory().url, socket_timeout=0.5, socket_connect_timeout=0.2,
                        pool_timeout=0.2, trips_in_flight=1)  # stall_after: 1.4 s
    trips = get_redis().trips
    real = batching._Progress
    armed = [True]

    def progress_or_interruption() -> Any:
        if armed[0] and sys._getframe(1).f_code.co_name == "_lead":
            armed[0] = False
            raise KeyboardInterrupt  # as a signal handler's exception would, on entering _Progress()
        return real()

    monkeypatch.setattr(batching, "_Progress", progress_or_interruption)
    slow = Callers([lambda: in_flight(trips, 0.3)]).start()
    wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the slow trip sent")
    calls = Callers([lambda i=i: command(trips, "INCR", f"c{i}") for i in range(3)]).start()
    queued(trips, 3)
    started = time.monotonic()
    assert slow.join() == {0: None}
    outcomes = calls.join(5.0)
    assert sum(isinstance(v, KeyboardInterrupt) for v in outcomes.values()) == 1, outcomes  # the lead's own
    assert sorted(v for v in outcomes.values() if not isinstance(v, BaseException)) == [1, 1], outcomes
    assert 1.0 <= time.monotonic() - started < 5.0  # woken by their own wait's end
    assert trips.in_flight() == 0
    assert command(trips, "PING") == "PONG"


class SlowFirstConnection:
    """The real pool, but each of the first `n` connections it lends comes after `delay`
    seconds (a process stopped, or frozen, while its trips were in flight)."""

    def __init__(self, pool: Any, n: int, delay: float) -> None:
        self.pool, self.n, self.delay = pool, n, delay
        self.lending = 0  # connections being lent now
        self.most = 0  # the most lent at once

    def get_connection(self) -> Any:
        self.lending += 1
        self.most = max(self.most, self.lending)
        try:
            if self.n > 0:
                self.n -= 1
                time.sleep(self.delay)
            return self.pool.get_connection()
        finally:
            self.lending -= 1

    def release(self, connection: Any) -> None:
        self.pool.release(connection)


class HeldConnections:
    """The real pool, but the first `n` connections it lends are held until `free()`."""

    def __init__(self, pool: Any, n: int) -> None:
        self.pool, self.n = pool, n
        self.held = threading.Event()
        self.waiting = 0

    def get_connection(self) -> Any:
        if self.n > 0:
            self.n -= 1
            self.waiting += 1
            self.held.wait(30)
            self.waiting -= 1
        return self.pool.get_connection()

    def free(self) -> None:
        self.held.set()

    def release(self, connection: Any) -> None:
        self.pool.release(connection)


def test_calls_in_a_trip_that_never_ends_fail_and_free_its_lane_for_the_calls_behind(
        redis_factory: Any) -> None:
    """One lane; its trip never gets a connection, nor does the trip that takes the lane over
    with the calls queued behind. Those calls fail after `stall_after` (their replies as
    lost) and the lane they free goes at once to a call queued later, no new call needed."""
    mcp_redis.configure(redis_url=redis_factory().url, socket_timeout=0.2, socket_connect_timeout=0.2,
                        pool_timeout=0.2, trips_in_flight=1)  # stall_after: 0.8 s
    trips = get_redis().trips
    held = HeldConnections(trips._pool, n=2)
    trips._pool = held
    try:
        first = Callers([lambda: command(trips, "INCR", "first")]).start()
        wait_for(lambda: held.waiting == 1, 5.0, what="the first trip held")
        # Queued behind it: after 0.8 s the first of them takes the lane over, with the others.
        taken = Callers([lambda i=i: command(trips, "INCR", f"taken{i}") for i in range(3)]).start()
        queued(trips, 3)
        wait_for(lambda: held.waiting == 2, 5.0, what="the take-over's trip held")
        later = Callers([lambda: command(trips, "INCR", "later")]).start()
        queued(trips, 1)
        assert later.join(5.0) == {0: 1}  # went once the lane was freed, in a connection not held
        # The two calls the take-over carried fail, their replies as lost; its lead still waits.
        wait_for(lambda: len(taken.outcomes) == 2, 5.0, what="the two carried calls' outcomes")
        lost = list(dict(taken.outcomes).values())
        assert all(isinstance(e, redis.ConnectionError) and shared_failure(e) for e in lost), lost
        held.free()
        assert first.join() == {0: 1}
        assert sorted(v for v in taken.join().values() if not isinstance(v, Exception)) == [1]  # the lead
        assert trips.in_flight() == 0 and trips.stats()["queued"] == 0
    finally:
        held.free()
        trips._pool = held.pool


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_lead_slower_than_stall_after_is_taken_over_without_a_lane_counted_twice(
        redis_factory: Any, lanes: int) -> None:
    """A reviewer's case: a trip that takes longer than `stall_after` (its process frozen)
    looks lost; a queued call takes its lane over, then the slow trip ends too. Each lane is
    freed once: afterwards no more than `lanes` trips go at once."""
    mcp_redis.configure(redis_url=redis_factory().url, socket_timeout=0.2, socket_connect_timeout=0.2,
                        pool_timeout=0.2, trips_in_flight=lanes)  # stall_after: 0.8 s
    trips = get_redis().trips
    slow = SlowFirstConnection(trips._pool, n=lanes, delay=1.5)
    trips._pool = slow
    try:
        first = Callers([lambda i=i: command(trips, "INCR", f"first{i}") for i in range(lanes)]).start()
        wait_for(lambda: trips.stats()["trips"] == lanes, 5.0, what="every lane's slow trip")
        behind = Callers([lambda: command(trips, "INCR", "behind")]).start()
        queued(trips, 1)
        assert behind.join() == {0: 1}  # took a lane over after 0.8 s
        assert first.join() == {i: 1 for i in range(lanes)}
        assert trips.in_flight() == 0
        slow.most = 0
        slow.n, slow.delay = 1_000, 0.05  # every connection slow from here on
        many = Callers([lambda i=i: command(trips, "INCR", f"many{i}") for i in range(4 * lanes)]).start()
        assert many.join() == {i: 1 for i in range(4 * lanes)}
        assert slow.most <= lanes
        assert trips.in_flight() == 0 and trips.stats()["queued"] == 0
    finally:
        trips._pool = slow.pool
