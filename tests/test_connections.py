"""Clients from URLs, the retry policy and the circuit breaker on real servers."""

from __future__ import annotations

import os
import queue
import statistics
import sys
import threading
import time
from typing import Any, Dict, List

import pytest
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.sentinel import SentinelConnectionPool

import mcp_redis
from mcp_redis.config import Settings
from mcp_redis.connections import ReadyCheckedPool, _pack, _quiet, build_client, get_redis, parse_host_list
from mcp_redis.errors import BackendUnavailable, ConfigurationError
from mcp_redis.metrics import METRICS
from mcp_redis.resilience import BreakerState, CircuitBreaker, Resilience
from mcp_redis.testing import RedisServer, wait_for


def test_redis_url_gives_a_client_over_a_blocking_pool_without_client_retries() -> None:
    client, kind, _, _ = build_client(Settings(redis_url="redis://127.0.0.1:6390/3", max_connections=7))
    pool = client.connection_pool
    assert kind == "single" and isinstance(pool, redis.BlockingConnectionPool) and isinstance(pool, ReadyCheckedPool)
    assert pool.max_connections == 7
    kw = pool.connection_kwargs
    assert kw["db"] == 3 and kw["socket_timeout"] == 2.0 and kw["socket_connect_timeout"] == 1.0
    assert kw["health_check_interval"] == 15
    assert kw["retry"].get_retries() == 0  # one policy (ours) owns retrying


def test_rediss_url_uses_tls_connections_with_the_configured_ca(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    client, kind, _, _ = build_client(Settings(redis_url="rediss://127.0.0.1:6390/0", ssl_ca_certs=str(ca)))
    pool = client.connection_pool
    assert kind == "single" and pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def test_unix_url_talks_to_a_real_unix_socket_server(tmp_path: Any) -> None:
    sock = str(tmp_path / "r.sock")
    with RedisServer(args=["--unixsocket", sock, "--unixsocketperm", "700"]):
        mcp_redis.configure(redis_url=f"unix://{sock}?db=2")
        conn = get_redis()
        assert conn.client.connection_pool.connection_class is UnixDomainSocketConnection
        assert conn.call(conn.client.set, "mcp:t", "1") and conn.call(conn.client.get, "mcp:t") == "1"


def test_sentinel_url_gives_a_master_for_client_with_every_sentinel() -> None:
    client, kind, sentinel, service = build_client(
        Settings(redis_url="redis+sentinel://:pw@127.0.0.1:26379,[::1]:26380,127.0.0.1/mymaster/4")
    )
    assert kind == "sentinel" and service == "mymaster"
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    hosts = [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
             for c in sentinel.sentinels]
    assert hosts == [("127.0.0.1", 26379), ("::1", 26380), ("127.0.0.1", 26379)]
    assert client.connection_pool.connection_kwargs["db"] == 4
    assert client.connection_pool.connection_kwargs["password"] == "pw"


def test_cluster_url_builds_a_redis_cluster_from_every_startup_node(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: Dict[str, Any] = {}

    class FakeCluster:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

    monkeypatch.setattr("mcp_redis.connections.RedisCluster", FakeCluster)
    client, kind, _, _ = build_client(Settings(redis_url="redis+cluster://u:pw@127.0.0.1:7000,127.0.0.1:7001"))
    assert kind == "cluster" and isinstance(client.build(), FakeCluster)  # built on first use
    assert [(n.host, n.port) for n in seen["startup_nodes"]] == [("127.0.0.1", 7000), ("127.0.0.1", 7001)]
    assert seen["username"] == "u" and seen["password"] == "pw"


@pytest.mark.parametrize("url", ["redis+sentinel://127.0.0.1:26379", "redis+cluster://", "redis+cluster://h:notaport"])
def test_malformed_topology_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="redis_url"):
        build_client(Settings(redis_url=url))


def test_host_lists_parse_ipv6_and_default_ports() -> None:
    assert parse_host_list("[::1]:7000,h", 6379) == [("::1", 7000), ("h", 6379)]


def test_breaker_makes_calls_fail_fast_while_redis_is_down_and_recovers_after_restart(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, breaker_reset_timeout=0.5)
    conn = get_redis()
    assert conn.call(conn.client.set, "mcp:k", "v")
    server.kill()
    # Trip the breaker: the first calls retry and fail (connection refused).
    while conn.policy.breaker.state is BreakerState.CLOSED:
        with pytest.raises(BackendUnavailable):
            conn.call(conn.client.get, "mcp:k")
    durations: List[float] = []
    for _ in range(50):
        start = time.perf_counter()
        with pytest.raises(BackendUnavailable):
            conn.call(conn.client.get, "mcp:k")
        durations.append(time.perf_counter() - start)
    # "Well under one connect timeout" (1 s): open-breaker calls don't touch the network.
    assert statistics.median(durations) < 0.005 and max(durations) < 0.25
    server.start()  # same port, empty
    deadline = time.monotonic() + 5
    while True:
        try:
            assert conn.call(conn.client.get, "mcp:k") is None
            break
        except BackendUnavailable:
            assert time.monotonic() < deadline, "did not recover within 5 s"
            time.sleep(0.05)
    assert conn.policy.breaker.state is BreakerState.CLOSED
    assert METRICS.counter("breaker_transitions_total", backend="redis", to="open") >= 1
    assert METRICS.counter("breaker_transitions_total", backend="redis", to="closed") >= 1


def test_transient_timeout_is_retried_transparently(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, socket_timeout=0.1, retry_attempts=8, retry_max_backoff=0.05,
                        breaker_failure_threshold=10)
    conn = get_redis()
    conn.call(conn.client.set, "mcp:k", "v")
    # CLIENT PAUSE returns at once and stalls every client for 300 ms, so the
    # first attempts time out and a later one succeeds.
    server.client().execute_command("CLIENT", "PAUSE", "300", "ALL")
    assert conn.call(conn.client.get, "mcp:k") == "v"
    assert METRICS.counter("backend_retries_total", backend="redis") >= 1
    assert conn.policy.breaker.state is BreakerState.CLOSED


def test_error_replies_are_not_retried_and_do_not_trip_the_breaker(redis_mode: str) -> None:
    conn = get_redis()
    conn.call(conn.client.set, "mcp:s", "text")
    for _ in range(10):
        with pytest.raises(redis.ResponseError):
            conn.call(conn.client.incr, "mcp:s")
    assert METRICS.counter("backend_retries_total", backend="redis") == 0
    assert conn.policy.breaker.state is BreakerState.CLOSED


def test_half_open_breaker_lets_one_probe_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker("t", failure_threshold=2, reset_timeout=1.0, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 1.5
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    now[0] = 3.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


def test_policy_retries_with_backoff_then_gives_up_with_backend_unavailable() -> None:
    calls: List[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise redis.ConnectionError("boom")
        return "ok"

    policy = Resilience("t", attempts=3, initial_backoff=0.01, max_backoff=0.05)
    assert policy.call(flaky) == "ok" and len(calls) == 3
    calls.clear()

    def down() -> None:
        calls.append(time.monotonic())
        raise redis.TimeoutError("slow")

    with pytest.raises(BackendUnavailable) as info:
        policy.call(down)
    assert len(calls) == 3 and isinstance(info.value.__cause__, redis.TimeoutError)


def test_forked_child_gets_fresh_connections_and_parent_keeps_working(redis_mode: str) -> None:
    conn = get_redis()
    conn.call(conn.client.set, "mcp:parent", "1")
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            child = get_redis()
            ok = child is not conn and child.call(child.client.incr, "mcp:parent") == 2
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert get_redis() is conn
    assert conn.call(conn.client.incr, "mcp:parent") == 3


def test_connection_repr_never_shows_the_password(redis_factory: Any) -> None:
    server = redis_factory(password="s3cr3t-pw")
    mcp_redis.configure(redis_url=server.url)
    conn = get_redis()
    assert conn.call(conn.client.ping)
    assert "s3cr3t-pw" not in repr(conn) and "s3cr3t-pw" not in repr(mcp_redis.settings())
    assert "s3cr3t-pw" not in str(mcp_redis.health())


# -- run_script: EVALSHA on a pooled connection, packed by hand -----------------------
def test_run_script_packs_evalsha_byte_for_byte_as_redis_py() -> None:
    mcp_redis.configure(redis_url="redis://127.0.0.1:1/0")
    conn = get_redis()
    wire = conn.client.connection_pool.make_connection()
    cases = [
        (["k1", "k2"], ["token", 30000, "3"]),
        (["mcp:lock:{é\udcff}"], [1, -7, 2.5, b"\x00raw", "x" * 7000]),  # surrogatepass, float, bytes, big
        ([], []),
    ]
    for keys, args in cases:
        for _ in range(2):  # packed afresh, then from the cached start
            mine = conn._pack_evalsha(wire.encoder, "a" * 40, keys, args)
            assert mine == b"".join(wire.pack_command("EVALSHA", "a" * 40, len(keys), *keys, *args))
    for bad in (True, None, object()):
        with pytest.raises(redis.DataError):
            conn._pack_evalsha(wire.encoder, "a" * 40, [], [bad])


def test_run_script_survives_script_flush_error_replies_and_killed_connections(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=3)
    conn = get_redis()
    echo = conn.client.register_script("return {KEYS[1], ARGV[1], ARGV[2]}")
    fails = conn.client.register_script("return redis.error_reply('ERR refused by script')")
    assert conn.call(conn.run_script, echo, ["mcp:k"], ["a", 5]) == ["mcp:k", "a", "5"]
    server.client().script_flush()  # as after a restart: NOSCRIPT, then loaded again
    assert conn.call(conn.run_script, echo, ["mcp:k"], ["b", 6]) == ["mcp:k", "b", "6"]
    with pytest.raises(redis.ResponseError, match="refused by script"):
        conn.call(conn.run_script, fails, [], [])
    assert conn.call(conn.run_script, echo, ["mcp:k"], ["c", 7]) == ["mcp:k", "c", "7"], "the socket stays usable"
    server.client().client_kill_filter(_type="normal", skipme=True)  # the pooled socket dies under us
    assert conn.call(conn.run_script, echo, ["mcp:k"], ["d", 8]) == ["mcp:k", "d", "8"]
    assert conn.pool_stats()["in_use"] == 0, "every borrowed connection went back to the pool"


def test_run_command_and_the_pipelined_pair_pack_as_redis_py_and_read_raw_replies(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=3)
    conn = get_redis()
    wire = conn.client.connection_pool.get_connection()
    args = ("SET", "mcp:k{é\udcff}", "v", "NX", "PX", 30000, "GET", 2.5, b"\x00raw")
    assert _pack(wire.encoder, args) == b"".join(wire.pack_command(*args))
    conn.client.connection_pool.release(wire)
    assert conn.call(conn.run_command, "SET", "mcp:a", "1", "NX", "PX", 30000, "GET") is None  # raw: nil, not True
    assert conn.call(conn.run_command, "SET", "mcp:a", "2", "NX", "PX", 30000, "GET") == "1"
    echo = conn.client.register_script("return {KEYS[1], ARGV[1], redis.call('GET', KEYS[1])}")
    server.client().script_flush()  # NOSCRIPT on the pipelined script: loaded and run again
    first, second = conn.call(conn.run_command_and_script, ("SET", "mcp:b", "x"), echo, ["mcp:b"], ["y"])
    assert first == "OK" and second == ["mcp:b", "y", "x"]  # the script ran after the command
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        conn.call(conn.run_command_and_script, ("SET", "mcp:b"), echo, ["mcp:b"], ["z"])
    assert conn.call(conn.run_command, "GET", "mcp:b") == "x", "both replies were read: the socket stays in step"
    assert conn.pool_stats()["in_use"] == 0


# -- the pool's ready check (one select instead of redis-py's non-blocking recv) --------
def test_a_pooled_connection_left_with_a_reply_to_read_is_never_used_as_is(redis_mode: str) -> None:
    conn = get_redis()
    pool = conn.client.connection_pool
    assert isinstance(pool, ReadyCheckedPool)
    connection = pool.get_connection()
    stale_id = connection.send_command("CLIENT", "ID") or connection.read_response()
    connection.send_command("ECHO", "stale reply")  # sent, never read: the reply waits on the socket
    wait_for(lambda: _readable(connection), timeout=5, what="the stale reply to arrive")
    pool.release(connection)
    for i in range(3):  # LIFO pool: the dirty connection is the next one handed out
        assert conn.call(conn.run_command, "ECHO", f"fresh {i}") == f"fresh {i}"
    assert conn.call(conn.run_command, "CLIENT", "ID") != stale_id, "the dirty connection was replaced"


def test_closing_idle_sockets_never_closes_one_another_thread_can_take_meanwhile(redis_factory: Any) -> None:
    """The breaker opening (or a READONLY reconnect) closes the idle pooled sockets. redis-py's
    pool closed a snapshot of them outside its lock, and a CI run saw a thread that had just
    taken one read ``Bad file descriptor``. Here, while each idle socket is closed, no other
    thread can take any idle connection from the pool."""
    mcp_redis.configure(redis_url=redis_factory().url)
    pool = get_redis().client.connection_pool
    assert isinstance(pool, ReadyCheckedPool)
    idle = [pool.get_connection() for _ in range(3)]
    for connection in idle:
        connection.send_command("PING")
        assert connection.read_response() in (b"PONG", "PONG")
        pool.release(connection)
    seen: List[Any] = []  # what another thread could take from the pool as each socket closes

    def take_meanwhile() -> None:
        got: List[Any] = []
        t = threading.Thread(target=lambda: got.append(_take_idle(pool)))
        t.start()
        t.join(5)
        seen.extend(got)

    for connection in idle:
        real = connection.disconnect

        def disconnect(*args: Any, _real: Any = real, **kwargs: Any) -> None:
            take_meanwhile()
            _real(*args, **kwargs)

        connection.disconnect = disconnect  # type: ignore[method-assign]
    get_redis().disconnect()  # what the breaker does as it opens
    for connection in idle:
        del connection.disconnect
    assert len(seen) == 3 and not any(seen), f"an idle connection was taken while being closed: {seen}"
    assert all(connection._sock is None for connection in idle)
    assert get_redis().call(get_redis().run_command, "PING") in (b"PONG", "PONG")  # the pool is whole


@pytest.mark.cluster
def test_on_a_cluster_closing_idle_sockets_leaves_the_ones_in_use_open(cluster_topology: Any) -> None:
    """redis-py's `disconnect_connection_pools()` closed every node's sockets, those other threads
    were reading from included; the breaker opening closes the idle ones only."""
    mcp_redis.configure(redis_url=cluster_topology.url)
    conn = get_redis()
    assert conn.call(conn.run_command, "SET", "k", "v") in (b"OK", "OK", True)
    pools = [n.redis_connection.connection_pool for n in conn.client.get_nodes() if n.redis_connection]
    in_use = [pool.get_connection() for pool in pools]  # as another thread's call would hold them
    for connection in in_use:
        connection.connect()
    idle = [pool.get_connection() for pool in pools]
    for connection in idle:
        connection.connect()
    for pool, connection in zip(pools, idle):
        pool.release(connection)
    try:
        conn.disconnect()  # what the breaker does as it opens
        assert all(connection._sock is not None for connection in in_use), "a socket in use was closed"
        assert all(connection._sock is None for connection in idle)
    finally:
        for pool, connection in zip(pools, in_use):
            pool.release(connection)


def _take_idle(pool: Any) -> Any:
    """An idle connection from the pool's queue, if any (put back at once); else None."""
    try:
        connection = pool.pool.get_nowait()
    except queue.Empty:
        return None
    pool.pool.put_nowait(connection)
    return connection


def test_a_pooled_connection_the_server_closed_is_replaced_before_use(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, retry_attempts=1)  # no retry to hide a failed first try
    conn = get_redis()
    first = conn.call(conn.run_command, "CLIENT", "ID")
    server.client().client_kill_filter(_type="normal", skipme=True)
    wait_for(lambda: server.client().client_list(_type="normal") and
             all(int(c["id"]) != first for c in server.client().client_list(_type="normal")),
             timeout=5, what="the pooled connection to be closed")
    assert conn.call(conn.run_command, "ECHO", "after the kill") == "after the kill"
    assert conn.call(conn.run_command, "CLIENT", "ID") != first


def test_a_clean_pooled_connection_skips_redis_pys_non_blocking_read(redis_mode: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The point of the quick check: redis-py's `can_read` (a non-blocking recv between two
    # timeout changes) does not run for a connection with nothing to read. With hiredis's
    # parser (CI's hiredis pass) redis-py's own check runs every time.
    if not hasattr(redis.BlockingConnectionPool, "ensure_connection"):
        pytest.skip("redis-py before 8.2 checks a pooled connection inline: no hook for the quick check")
    quick = not redis.utils.HIREDIS_AVAILABLE
    conn = get_redis()
    pool = conn.client.connection_pool
    conn.call(conn.run_command, "PING")
    connection = pool.get_connection()
    calls: List[float] = []
    real = connection.can_read
    monkeypatch.setattr(connection, "can_read", lambda timeout=0: calls.append(timeout) or real(timeout))
    pool.ensure_connection(connection)
    assert (calls == []) is quick
    connection.send_command("ECHO", "unread")
    wait_for(lambda: _readable(connection), timeout=5, what="the reply to arrive")
    pool.ensure_connection(connection)  # something to read: redis-py's check runs (and reconnects)
    assert calls
    pool.release(connection)


def test_a_clean_pooled_connection_is_reused_without_reconnecting(redis_mode: str) -> None:
    conn = get_redis()
    ids = {conn.call(conn.run_command, "CLIENT", "ID") for _ in range(20)}
    assert len(ids) == 1


def test_the_quick_ready_check_defers_to_redis_py_for_other_parsers_and_tls(redis_mode: str) -> None:
    # hiredis's parser keeps a bytearray as `_buffer`; TLS sockets are not plain sockets:
    # neither is judged by the quick check (redis-py's own check runs), and none raises.
    import socket
    import types
    sock = socket.socket()
    try:
        for parser in (types.SimpleNamespace(_buffer=bytearray(b"+OK\r\n")), types.SimpleNamespace(), None):
            assert _quiet(types.SimpleNamespace(_sock=sock, _parser=parser)) is False
    finally:
        sock.close()
    assert _quiet(types.SimpleNamespace(_sock=object(), _parser=None)) is False
    assert _quiet(types.SimpleNamespace(_sock=None)) is False


def _readable(connection: Any) -> bool:
    import select
    return bool(select.select([connection._sock], [], [], 0)[0])


# -- parked connections (ReadyCheckedPool's short way in and out) ------------------------------
class _CountedQueue:
    """Counts the calls that reach redis-py's queue of idle connections (wrapping its methods)."""

    def __init__(self, pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("get", "put", "get_nowait", "put_nowait"):
            real = getattr(pool.pool, name)

            def counted(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                self.calls += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(pool.pool, name, counted)


#: hiredis's parser keeps its unread bytes where the quick check cannot look (CI's hiredis pass):
#: nothing is parked, every connection goes through redis-py's queue.
PARKS = not redis.utils.HIREDIS_AVAILABLE
needs_parking = pytest.mark.skipif(not PARKS, reason="hiredis's parser: connections are not parked")


def test_a_connection_just_used_is_taken_back_without_redis_pys_queue(redis_mode: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    conn = get_redis()
    pool = conn.client.connection_pool
    first = conn.call(conn.run_command, "CLIENT", "ID")
    assert conn.pool_stats()["in_use"] == 0 and conn.pool_stats()["idle"] >= 1  # parked counts as idle
    assert len(pool._parked) == PARKS
    counted = _CountedQueue(pool, monkeypatch)
    ids = {conn.call(conn.run_command, "CLIENT", "ID") for _ in range(10)}
    assert conn.call(conn.client.get, "mcp:nothing") is None  # redis-py's own commands take it too
    assert ids == {first} and (counted.calls == 0) is PARKS


@needs_parking
def test_a_parked_connection_marked_for_reconnect_is_not_used_as_is(redis_mode: str) -> None:
    conn = get_redis()
    first = conn.call(conn.run_command, "CLIENT", "ID")
    [parked] = conn.client.connection_pool._parked
    parked._should_reconnect = True  # as redis-py marks one during a server's maintenance event
    assert conn.call(conn.run_command, "CLIENT", "ID") != first


@needs_parking
def test_a_forked_child_never_takes_its_parents_parked_connection(redis_factory: Any) -> None:
    mcp_redis.configure(redis_url=redis_factory().url)
    conn = get_redis()
    pool = conn.client.connection_pool
    parent_id = conn.call(conn.run_command, "CLIENT", "ID")
    [parked] = pool._parked
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child uses the inherited pool object itself, not a client of its own
        code = 1
        try:
            connection = pool.get_connection()
            ok = connection is not parked and connection._sock is not parked._sock
            connection.send_command("CLIENT", "ID")
            os.write(write, b"%d" % connection.read_response())
            pool.release(connection)
            code = 0 if ok else 1
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_id = int(os.read(read, 64) or b"0")
    os.close(read)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert child_id not in (0, parent_id)
    assert conn.call(conn.run_command, "CLIENT", "ID") == parent_id  # the parent's socket is whole


def _waiting(pool: Any) -> int:
    """Threads asleep on the pool's queue of idle connections."""
    return len(pool.pool.not_empty._waiters)


@needs_parking
def test_threads_waiting_on_an_exhausted_pool_are_handed_the_connections_released(redis_factory: Any) -> None:
    # Two threads wait; two connections come back at once, before either thread runs: neither
    # is parked (the threads would sleep through their whole pool timeout beside two idle
    # connections); redis-py's put hands each to a thread.
    mcp_redis.configure(redis_url=redis_factory().url, max_connections=2, pool_timeout=60)
    pool = get_redis().client.connection_pool
    held = [pool.get_connection(), pool.get_connection()]  # exhausted
    for connection in held:
        connection.connect()
    got: List[Any] = []
    waiters = [threading.Thread(target=lambda: got.append(pool.get_connection()), daemon=True) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    wait_for(lambda: _waiting(pool) == 2, timeout=5, what="two threads waiting on the queue")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)  # both releases before either woken thread runs
    try:
        pool.release(held[0])
        pool.release(held[1])
        parked = len(pool._parked)
    finally:
        sys.setswitchinterval(interval)
    for waiter in waiters:
        waiter.join(10)
    assert parked == 0 and sorted(map(id, got)) == sorted(map(id, held)), "a waiting thread was not woken"
    for connection in got:
        pool.release(connection)


@needs_parking
def test_a_thread_waiting_on_an_exhausted_pool_sleeps_until_a_connection_comes_back(redis_factory: Any,
                                                                                    monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    mcp_redis.configure(redis_url=redis_factory().url, max_connections=1, pool_timeout=60)
    pool = get_redis().client.connection_pool
    held = pool.get_connection()
    held.connect()
    wakes: List[Any] = []
    real = pool.pool.not_empty.wait
    monkeypatch.setattr(pool.pool.not_empty, "wait", lambda *a, **k: wakes.append(a) or real(*a, **k))
    got: List[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get_connection()), daemon=True)
    waiter.start()
    wait_for(lambda: _waiting(pool) == 1, timeout=5, what="the thread waiting on the queue")
    time.sleep(0.2)  # long enough for a thread that polls to have woken dozens of times
    pool.release(held)  # not parked: handed to the thread
    waiter.join(10)
    assert got == [held] and len(wakes) == 1, f"the waiting thread woke {len(wakes)} times"
    pool.release(held)


@needs_parking
def test_a_parked_connection_is_one_of_the_queue_items_a_waiting_thread_takes(redis_factory: Any) -> None:
    # A thread that found nothing parked goes on to redis-py's queue; a connection parked
    # meanwhile must be there for it, not beside an empty queue it sleeps on.
    mcp_redis.configure(redis_url=redis_factory().url, max_connections=1)
    pool = get_redis().client.connection_pool
    held = pool.get_connection()
    held.connect()
    pool.release(held)
    assert list(pool._parked) == [held] and not pool.pool.queue and pool.pool.qsize() == 1
    assert pool.pool.get(True, 5) is held and not pool._parked
    pool.pool.put_nowait(held)


@needs_parking
def test_a_forked_child_can_close_the_inherited_pool(redis_factory: Any) -> None:
    # A post-fork hook's `pool.disconnect()`: the parent's parked connections are not the child's
    # to give back (redis-py's release would refuse them into a queue already full).
    mcp_redis.configure(redis_url=redis_factory().url)
    conn = get_redis()
    pool = conn.client.connection_pool
    conn.call(conn.run_command, "PING")
    assert pool._parked
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            pool.disconnect()
            pool.disconnect(inuse_connections=False)
            connection = pool.get_connection()
            connection.send_command("PING")
            code = 0 if connection.read_response() in (b"PONG", "PONG") else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert conn.call(conn.run_command, "PING") in (b"PONG", "PONG")


@pytest.mark.skipif(not PARKS, reason="with hiredis's parser, redis-py's ready check polls: no timeout to put back")
def test_a_pooled_socket_left_non_blocking_is_put_right_before_use(redis_factory: Any) -> None:
    # redis-py's own ready check (pure-Python parser) sets a socket's timeout to 0 and back; a
    # signal handler's exception between the two leaves it non-blocking, and the next slow
    # reply would fail.
    mcp_redis.configure(redis_url=redis_factory().url, retry_attempts=1)  # no retry to hide it
    conn = get_redis()
    conn.call(conn.run_command, "PING")
    pool = conn.client.connection_pool
    connection = pool.get_connection()
    connection._sock.settimeout(0)
    pool.release(connection)
    assert conn.call(conn.run_command, "BLPOP", "mcp:nothing", "0.2") is None  # a reply 0.2 s away
    assert conn.policy.breaker._failures == 0


@needs_parking
def test_closing_the_idle_sockets_closes_the_parked_ones(redis_factory: Any) -> None:
    mcp_redis.configure(redis_url=redis_factory().url)
    conn = get_redis()
    conn.call(conn.run_command, "PING")
    [parked] = conn.client.connection_pool._parked
    assert parked._sock is not None
    conn.disconnect()  # what the breaker does as it opens
    assert parked._sock is None and not conn.client.connection_pool._parked
    assert conn.call(conn.run_command, "PING") in (b"PONG", "PONG")


def test_a_connection_the_quick_check_cannot_judge_is_not_parked() -> None:
    # A TLS socket (an ssl.SSLSocket, not a plain socket): its plaintext may wait in OpenSSL's
    # buffer, where the quick check cannot look; it goes back to redis-py's queue.
    import ssl
    import types
    pool = ReadyCheckedPool.from_url("rediss://127.0.0.1:1", max_connections=4)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    sock = context.wrap_socket(__import__("socket").socket(), do_handshake_on_connect=False)
    tls = types.SimpleNamespace(pid=pool.pid, _sock=sock, should_reconnect=lambda: False)
    assert pool.pool.get_nowait() is None  # its slot, as when it was made
    try:
        pool.release(tls)
        assert not pool._parked and tls in pool.pool.queue
    finally:
        tls._sock.close()
