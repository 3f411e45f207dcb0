"""Round trips shared by a process's threads (`mcp_redis.batching`), on real redis-servers.

Calls made while a trip is in flight queue and go together in the next one;
each gets its own replies, an error reply stays its call's own, a broken
trip fails its own calls alone (each with its own exception object, counted
once by the breaker), an interrupted thread's exception stays its own and
strands no one, and a forked child starts with an idle queue.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest
import redis

import mcp_redis
from mcp_redis.batching import SharedTrips
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
    mcp_redis.configure(redis_url=redis_factory(args=DEBUG).url)
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
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=0.5)
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
    try:
        first = Callers([lambda: busy(trips, 0.3)]).start()
        wait_for(lambda: trips.stats()["trips"] == 1, 5.0, what="the first trip sent")
        main = threading.get_ident()

        def interrupt() -> None:
            # The main thread queued first: it leads the second trip, with five more calls.
            queued(trips, 6)
            wait_for(lambda: trips.stats()["trips"] == 2, 5.0, what="the second trip sent")
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


def test_a_timed_out_trip_counts_against_the_breaker_per_call(redis_factory: Any) -> None:
    server = redis_factory(args=DEBUG)
    with FaultProxy("127.0.0.1", server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url(), socket_timeout=0.5, breaker_failure_threshold=3,
                            retry_attempts=3, breaker_reset_timeout=30)
        conn = get_redis()
        trips = conn.trips

        def six_calls_in_one_broken_trip(arm: Callable[[], None], seen: str,
                                         breaking: Callable[[], None]) -> Dict[int, Any]:
            base, before = trips.stats()["trips"], proxy.stats.get(seen, 0)
            slow = Callers([lambda: busy(trips, 0.3)]).start()
            wait_for(lambda: trips.stats()["trips"] == base + 1, 5.0, what="the slow trip sent")
            calls = Callers([lambda i=i: conn.call(conn.run_command, "INCR", f"c{i}", attempts=1)
                             for i in range(6)]).start()
            queued(trips, 6)
            arm()
            slow.join()
            wait_for(lambda: proxy.stats.get(seen, 0) > before, 5.0, what="the six calls' request in the proxy")
            breaking()
            outcomes = calls.join()
            proxy.delay_requests(0)
            proxy.swallow_requests(None)
            return outcomes

        # Never answered: each call waited its socket timeout, each counts (as on its own
        # connection before trips were shared): the breaker (threshold 3) opens.
        stalled = six_calls_in_one_broken_trip(lambda: proxy.swallow_requests(b"INCR"), "swallowed", lambda: None)
        assert all(isinstance(e, BackendUnavailable) for e in stalled.values()), stalled
        assert conn.policy.breaker.state.name == "OPEN"


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
    mcp_redis.configure(redis_url=server.url, socket_timeout=0.5)
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
    mcp_redis.configure(redis_url=server.url, socket_timeout=0.2, socket_connect_timeout=0.2, pool_timeout=0.2)
    trips = get_redis().trips
    assert command(trips, "PING") == "PONG"
    with trips._lock:  # a lead that began, then was lost
        trips._busy = True
    started = time.monotonic()
    outcomes = Callers([lambda i=i: command(trips, "INCR", f"t{i}") for i in range(4)]).start().join(10)
    assert outcomes == {0: 1, 1: 1, 2: 1, 3: 1}
    assert 0.8 <= time.monotonic() - started < 5.0
    assert command(trips, "PING") == "PONG"
    assert trips.stats()["queued"] == 0
