"""The process-wide Redis clients, built from `REDIS_URL`.

One `RedisConnection` per process holds the client (redis-py's own pools,
Sentinel and Cluster clients) and the `Resilience` policy every feature calls
through. The client's own retry is set to zero on purpose: redis-py 8.x
retries ten times with backoff by default, which blocks seconds per call
against a stopped server; here one policy owns retrying.

After ``os.fork()`` the child drops the parent's connection objects (without
closing the parent's sockets) and builds fresh ones on first use.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import re
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.client
import redis.commands.core
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool, SentinelConnectionPoolProxy

from .batching import SharedTrips, forget_after_fork
from .config import FEATURE_URLS, Settings, parse_host_list, redact_url, scrub, setting_variable, url_setting
from .errors import ConfigurationError, ReadOnlyServer
from .resilience import CircuitBreaker, Resilience, SentinelRefusal, WrongServerKind, redis_misconfiguration
from .scripts import ScriptSet

__all__ = [
    "RedisConnection",
    "get_redis",
    "connect",
    "redis_available",
    "build_client",
    "parse_host_list",
    "on_fork",
    "LazyCluster",
    "scan_keys",
]

log = logging.getLogger("mcp_redis.connections")
T = TypeVar("T")


@dataclasses.dataclass
class RedisConnection:
    """A client plus the policy that guards it. Thread-safe; shared per process."""

    client: Any  # redis.Redis or redis.cluster.RedisCluster (decode_responses=True)
    policy: Resilience
    kind: str  # "single" | "sentinel" | "cluster"
    url: str  # redacted, for display
    settings: Settings
    sentinel: Optional[Sentinel] = None
    service_name: Optional[str] = None
    # The client's one script registry (`mcp_redis.Client.scripts`).
    scripts: ScriptSet = dataclasses.field(default_factory=ScriptSet, repr=False, compare=False)
    # (sha, *keys) -> the packed start of an EVALSHA command (see run_script); ("SET", key, px) -> set_nx_get's
    _heads: Dict[Tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # The variable its URL came from (REDIS_URL, or a feature's MCP_REDIS_*_URL): errors name it.
    variable: str = "REDIS_URL"
    # When READONLY was last logged (monotonic): once a minute at most.
    _readonly_logged: float = dataclasses.field(default=float("-inf"), repr=False, compare=False)
    # The round trips the hot paths' calls share (a single server or a Sentinel master): see `trips`
    _trips: Optional[SharedTrips] = dataclasses.field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"RedisConnection(kind={self.kind!r}, url={self.url!r}, policy={self.policy!r})"

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` under the retry/breaker policy."""
        return self.policy.call(fn, *args, **kwargs)

    def recover(self, exc: ConfigurationError) -> bool:
        """The policy's cure for a misconfiguration: True when the call is worth one more try.

        ``READONLY`` from a plain URL's server (`ReadOnlyServer`) drops the
        idle pooled sockets: behind a DNS name that follows failovers (a
        managed service's primary endpoint), sockets opened before the
        failover still reach the demoted master, and a new one reaches the
        new master. When the fresh socket says ``READONLY`` too, the URL
        names a replica: `ReadOnlyServer`. A refused write changed nothing,
        so the second try cannot act twice.
        """
        if self.kind != "single" or not isinstance(exc, ReadOnlyServer):
            return False
        now = time.monotonic()
        if now - self._readonly_logged >= 60.0:
            self._readonly_logged = now
            log.warning("redis: %s answered READONLY (a master demoted behind its address?); reconnecting",
                        self.url)
        self.disconnect()
        return True

    def script(self, name: str) -> Any:
        """The script ``mcp_redis/lua/<name>.lua`` registered on this client (once)."""
        return self.scripts.get(self.client, name)

    def misconfiguration(self, exc: BaseException) -> Optional[ConfigurationError]:
        """The `ConfigurationError` a redis-py error from this client stands for, or None.

        The policy applies it to every call; background threads (which read
        outside the policy) use it to tell misconfiguration from an outage.
        """
        return redis_misconfiguration(exc, follows_failover=self.kind != "single", variable=self.variable)

    @property
    def trips(self) -> SharedTrips:
        """The round trips this process's threads share (`mcp_redis.batching`); not for a cluster."""
        trips = self._trips
        if trips is None:
            s = self.settings  # longer than a trip can take: a wait for a connection, its connect, two replies
            stall_after = s.pool_timeout + s.socket_connect_timeout + 2 * s.socket_timeout
            trips = self._trips = SharedTrips(self.client.connection_pool, stall_after, s.trips_in_flight)
        return trips

    def run_script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script (``client.register_script``) in one round trip.

        The hot path of locks and rate limits. On a single server or a
        Sentinel master it sends ``EVALSHA`` through `trips` (alone at once,
        or with the calls other threads made meanwhile: `mcp_redis.batching`)
        on a connection borrowed from redis-py's pool, and reads the reply
        with redis-py's parser, skipping only the client's per-command
        wrapper: its retry is off here anyway (see the module doc), and its
        OpenTelemetry bookkeeping costs about 10 us a call, a tenth of a
        loopback round trip. The command's start
        (sha and keys) is packed once per key set: redis-py's packer does
        Python work per argument. The connection still health-checks, reconnects,
        and drops its socket on any error before it goes back to the pool.
        A cluster (routed by key) and a ``NOSCRIPT`` reply (a restarted or
        failed-over server) take redis-py's ``Script`` path, which loads the
        script and runs it.
        """
        if not self.is_cluster:
            [reply] = self.trips.send(self._pack_evalsha(self._encoder, script.sha, keys, args), 1)
            if not isinstance(reply, Exception):
                return reply
            if not isinstance(reply, NoScriptError):
                raise reply
        return script(keys, args, self.client)

    def run_scripts(self, script: Any, calls: Sequence[Tuple[Sequence[str], Sequence[Any]]]) -> List[Any]:
        """Run a registered script once per ``(keys, args)`` of `calls` in one round trip (a
        pipeline without ``MULTI``; a cluster's is routed by key): the replies in order, a
        call's error reply as its exception (``NOSCRIPT`` included: `run_script` loads it)."""
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies = list(pipe.execute(raise_on_error=False))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # a server that has not loaded it (new, restarted, failed over): one call loads it
            replies[missing[0]] = self.run_script(script, *calls[missing[0]])
            if len(missing) > 1:  # then the others again (a cluster: each node loads its own)
                for i, reply in zip(missing[1:], self.run_scripts(script, [calls[i] for i in missing[1:]])):
                    replies[i] = reply
        return replies

    def run_command(self, *args: Any) -> Any:
        """One plain command in one round trip, the way `run_script` sends a script.

        The raw reply, without redis-py's per-command reply conversion (``SET``
        answers ``"OK"``, not True). A cluster routes it with redis-py's client.
        """
        if self.is_cluster:
            return self.client.execute_command(*args)
        [reply] = self.trips.send(_pack(self._encoder, args), 1)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def set_nx_get(self, key: str, value: str, px: int) -> Any:
        """``SET key value NX PX px GET`` the way `run_command` sends it (a lock's plain try),
        packed around `value` from a start and an end kept per ``(key, px)``: the raw reply."""
        if self.is_cluster:
            return self.client.execute_command("SET", key, value, "NX", "PX", px, "GET")
        encoder = self._encoder
        ends = self._heads.get(("SET", key, px))
        if ends is None:
            ends = (b"*7\r\n" + _resp_bulk(encoder, "SET") + _resp_bulk(encoder, key),
                    b"".join([_resp_bulk(encoder, "NX"), _resp_bulk(encoder, "PX"), _resp_bulk(encoder, px),
                              _resp_bulk(encoder, "GET")]))
            if len(self._heads) >= _HEADS_MAX:
                self._heads.clear()
            self._heads[("SET", key, px)] = ends
        [reply] = self.trips.send(b"".join([ends[0], _resp_bulk(encoder, value), ends[1]]), 1)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def get(self, key: str) -> Optional[str]:
        """``GET key`` the way `run_command` sends it (the hot reads of sessions and the cache)."""
        value: Optional[str] = self.run_command("GET", key)
        return value

    def run_command_and_script(self, command: Sequence[Any], script: Any, keys: Sequence[str],
                               args: Sequence[Any]) -> Tuple[Any, Any]:
        """`command`, then `script`, in one round trip (pipelined): both raw replies.

        The script runs right after the command, so it sees its outcome. An
        error reply to the command is raised after both replies are read; a
        ``NOSCRIPT`` reply runs the script again through redis-py's ``Script``
        (which loads it). A cluster sends the two one after the other.
        """
        if self.is_cluster:
            return self.client.execute_command(*command), script(keys, args, self.client)
        encoder = self._encoder
        first, second = self.trips.send(_pack(encoder, command)
                                        + self._pack_evalsha(encoder, script.sha, keys, args), 2)
        if isinstance(first, Exception):
            raise first
        if isinstance(second, NoScriptError):
            second = script(keys, args, self.client)
        elif isinstance(second, Exception):
            raise second
        return first, second

    @property
    def _encoder(self) -> Any:
        return self.trips.encoder

    def _pack_evalsha(self, encoder: Any, sha: str, keys: Sequence[str], args: Sequence[Any]) -> bytes:
        """``EVALSHA sha len(keys) *keys *args`` in RESP, as redis-py's packer writes it."""
        cached = (sha, *keys)
        head = self._heads.get(cached)
        if head is None:
            head = b"".join([_resp_bulk(encoder, "EVALSHA"), _resp_bulk(encoder, sha),
                             _resp_bulk(encoder, len(keys)), *(_resp_bulk(encoder, k) for k in keys)])
            if len(self._heads) >= _HEADS_MAX:
                self._heads.clear()
            self._heads[cached] = head
        return b"".join([b"*%d\r\n" % (3 + len(keys) + len(args)), head,
                         *(_resp_bulk(encoder, a) for a in args)])

    def pool_stats(self) -> Dict[str, Any]:
        """Connections created / in use / idle (summed over nodes for a cluster)."""
        pools: List[Any] = []
        if self.is_cluster:
            for node in self.client.get_nodes():
                if node.redis_connection is not None:
                    pools.append(node.redis_connection.connection_pool)
        else:
            pools.append(self.client.connection_pool)
        in_use = created = idle = 0
        max_connections = 0
        for pool in pools:
            in_use_set = getattr(pool, "_in_use_connections", None)
            all_conns = getattr(pool, "_connections", None)
            available = getattr(pool, "_available_connections", None)
            if in_use_set is not None:  # ConnectionPool
                in_use += len(in_use_set)
                created += getattr(pool, "_created_connections", 0)
                idle += len(available or [])
            elif all_conns is not None:  # BlockingConnectionPool
                created += len(all_conns)
                queue = getattr(pool, "pool", None)
                free = sum(1 for c in list(getattr(queue, "queue", [])) if c is not None)
                free += len(getattr(pool, "_parked", ()))  # ReadyCheckedPool: idle, out of redis-py's queue
                idle += free
                in_use += len(all_conns) - free
            max_connections += getattr(pool, "max_connections", 0) or 0
        return {
            "created": created,
            "in_use": in_use,
            "idle": idle,
            "max": max_connections,
        }

    def disconnect(self) -> None:
        """Close idle pooled sockets (used when the breaker opens): never one a thread is using."""
        try:
            if self.is_cluster:
                # Not redis-py's disconnect_connection_pools(): it closes the sockets in use too,
                # under the threads reading them.
                for node in self.client.get_nodes():
                    if node.redis_connection is not None:
                        node.redis_connection.connection_pool.disconnect(inuse_connections=False)
            else:
                self.client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # pragma: no cover - best effort
            log.debug("disconnect failed", exc_info=True)

    def close(self) -> None:
        """Close every pooled socket (the pool was passed in, so redis-py won't)."""
        try:
            if self.is_cluster:
                self.client.close()
            else:
                pool = self.client.connection_pool
                if isinstance(pool, WatchedSentinelPool):
                    pool.stop_watching()
                pool.disconnect()
        except Exception:  # pragma: no cover - best effort
            log.debug("close failed", exc_info=True)


def scan_keys(conn: RedisConnection, pattern: str, what: str, *, count: int = 1000) -> List[str]:
    """Every key matching `pattern` (``SCAN MATCH``, every primary of a cluster), through the policy.

    Managed services and least-privilege ACLs may refuse ``SCAN``: the
    `ConfigurationError` then names `what` needed it, instead of a bare
    ``NOPERM`` or ``unknown command``.
    """
    try:
        return conn.call(lambda: list(conn.client.scan_iter(match=pattern, count=count)))
    except ConfigurationError as exc:
        raise type(exc)(f"{what} needs SCAN, which this Redis refuses: {exc}. SCAN is not in the minimal "
                        "ACL of docs/security.md; grant '+scan' to the user of REDIS_URL for this call "
                        "(or run it with an operator account)", variable=exc.variable) from exc


_HEADS_MAX = 4096  # packed EVALSHA starts kept per client (cleared when full)


def _pack(encoder: Any, args: Sequence[Any]) -> bytes:
    """A command in RESP, as redis-py's packer writes it (for `run_command`)."""
    return b"".join([b"*%d\r\n" % len(args), *(_resp_bulk(encoder, a) for a in args)])


def _resp_bulk(encoder: Any, value: Any) -> bytes:
    """One argument as a RESP bulk string; ints and strs directly, the rest via redis-py's encoder."""
    if value.__class__ is str:
        data = value.encode(encoder.encoding, encoder.encoding_errors)
    elif value.__class__ is int:
        data = b"%d" % value
    else:
        data = encoder.encode(value)  # floats, bytes; rejects bools and None like redis-py
    return b"$%d\r\n%b\r\n" % (len(data), data)


class _QuickReadyCheck:
    """redis-py's check that a pooled connection is ready, in one ``select`` where it can.

    Before handing out a pooled connection, redis-py makes sure no reply is
    left unread on it and the server has not closed it: a non-blocking
    ``recv`` between two socket-timeout changes (three system calls per
    command: ``ioctl``, ``recvfrom``, ``ioctl``). With the
    pure-Python parser on a plain socket the same two facts come from the
    parser's buffer (nothing unread) and one ``select`` (nothing to read,
    no end of stream): both quiet, the connection is ready. Anything else
    (bytes buffered or arriving, a TLS socket whose plaintext may be
    buffered in OpenSSL, hiredis) runs redis-py's own check, which
    reconnects, or reads the push messages waiting there (RESP3 maintenance
    notifications). When both are quiet redis-py's check would find nothing
    to read and do nothing, whatever the protocol or settings: skipping it
    changes no outcome. (tests/test_connections.py: a connection left with a
    reply to read, or closed by the server, is never used as is.)
    """

    def ensure_connection(self, connection: Any) -> None:
        if _quiet(connection):
            return
        super().ensure_connection(connection)  # type: ignore[misc]


def _unread_of(connection: Any) -> Optional[Callable[[], int]]:
    """The pure-Python parser's count of bytes read but not parsed, or None (hiredis's parser
    keeps a bytearray there: not ours to judge)."""
    return getattr(getattr(getattr(connection, "_parser", None), "_buffer", None), "unread_bytes", None)


def _judged(connection: Any) -> bool:
    """True when `_quiet` can judge `connection`: a plain socket read by the pure-Python parser."""
    return type(getattr(connection, "_sock", None)) is socket.socket and _unread_of(connection) is not None


def _quiet(connection: Any) -> bool:
    """True when `connection` is connected, has nothing buffered or waiting to be read, and
    its socket keeps its timeout (redis-py's own check sets it to 0 and back: a signal
    handler's exception between the two leaves it non-blocking, and that check puts it back)."""
    sock = getattr(connection, "_sock", None)
    if sock is None or type(sock) is not socket.socket:  # not connected, or TLS
        return False
    if sock.gettimeout() != getattr(connection, "socket_timeout", None):
        return False
    unread = _unread_of(connection)
    try:
        if unread is None or unread():
            return False
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError, redis.ConnectionError):  # closed meanwhile, or a descriptor past FD_SETSIZE
        return False


class _ParkedAwareQueue(queue.LifoQueue):  # type: ignore[type-arg]
    """redis-py's queue of idle connections (`ReadyCheckedPool`), whose items include the
    parked connections: a thread about to wait on it for a connection takes a parked one
    instead. Parked ones go first, through the queue's own hooks (`_qsize`, `_get`), under
    its lock: as with every item, a parked connection is taken by one thread."""

    def __init__(self, maxsize: int = 0) -> None:
        self.parked: Deque[Any] = collections.deque()
        super().__init__(maxsize)

    def _qsize(self) -> int:
        return len(self.queue) + len(self.parked)

    def _get(self) -> Any:
        if self.parked:
            return self.parked.pop()
        return self.queue.pop()


class ReadyCheckedPool(_QuickReadyCheck, redis.BlockingConnectionPool):
    """redis-py's `BlockingConnectionPool` with the ready check above (single servers), a
    short way in and out for the connections just used, and idle sockets closed without
    racing the threads that take them.

    Taking a connection from redis-py's pool and giving it back runs some
    thirty Python calls (its queue's conditions, its observability hooks,
    its fork and ownership checks): a fifth of a loopback round trip on the
    project's VM (``python -m bench.bench_ratelimit``'s pool rows).
    Here a released connection that the quick ready check can judge (a
    plain socket read by the pure-Python parser) is *parked* instead, at
    most `PARKED` of them and only while no thread waits on redis-py's
    queue (then redis-py's put hands it over): kept beside the queue, under
    its lock, and counted as one of its items (`_ParkedAwareQueue`), so a
    thread that starts to wait takes it; redis-py itself counts it as in
    use (`RedisConnection.pool_stats` counts it idle). The next
    `get_connection` in the same process takes it back if the quick check
    finds it ready (one ``select``), else hands it to redis-py's own path,
    which checks it and reconnects it. A forked child, a maintenance event
    in progress and a connection marked for reconnect take redis-py's
    path. `disconnect` closes parked sockets as idle ones (the queue hands
    them out first); `reset` (a fork) forgets them with redis-py's queue.
    """

    #: The most connections parked at once (the shared trips use two at a time by default).
    PARKED = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["queue_class"] = _ParkedAwareQueue  # its hooks hand out the parked connections
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    @property
    def _parked(self) -> Deque[Any]:
        """The parked connections: the queue's own, so that `reset` (a fork: redis-py's
        `_checkpid`) forgets them with it; the parent's sockets are not the child's."""
        return self.pool.parked  # type: ignore[no-any-return]

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        # The pid first: in a forked child the queue's lock may have been held by a parent's
        # thread. redis-py's `reset` sets the pid last, so a child that passes has a new queue.
        if self.pid == os.getpid() and not self._in_maintenance and self.pool.parked:
            parked = self.pool.parked
            with self.pool.mutex:
                connection = parked.pop() if parked else None
            if connection is not None:
                try:
                    ready = _quiet(connection) and not connection.should_reconnect()
                except BaseException:  # a signal handler's exception: the connection is not lost
                    super().release(connection)  # type: ignore[no-untyped-call]
                    raise
                if ready:
                    return connection
                # redis-py's path below takes it back (its queue is LIFO), checks it, reconnects it.
                super().release(connection)  # type: ignore[no-untyped-call]
        return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    def release(self, connection: Any) -> None:
        parked = self.pool.parked
        if (len(parked) < self.PARKED and connection.pid == self.pid == os.getpid() and not self._in_maintenance
                and _judged(connection) and not connection.should_reconnect()):
            waiting = self.pool.not_empty
            with self.pool.mutex:
                # Not while a thread waits on the queue: redis-py's put below hands it over (and
                # this thread, calling again at once, queues behind it instead of taking it back).
                if len(parked) < self.PARKED and not getattr(waiting, "_waiters", True):
                    parked.append(connection)  # a thread that waits from now on counts it (`_qsize`)
                    return
        super().release(connection)  # type: ignore[no-untyped-call]

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Close every socket (`inuse_connections`), or only the idle ones.

        redis-py closes a snapshot of the idle connections after letting go
        of its lock, so a thread that takes one from the queue meanwhile has
        its socket closed under it: ``Bad file descriptor`` in its read (a CI
        run, the breaker opening in one thread while another read), or
        worse, the descriptor's number reused by another socket. Here each
        idle connection is taken out of the queue, closed, and put back: no
        other thread can hold it meanwhile.
        """
        if inuse_connections:
            super().disconnect(inuse_connections=True)
            return
        self._checkpid()
        taken: List[Any] = []
        try:
            while True:
                try:
                    taken.append(self.pool.get_nowait())
                except queue.Empty:
                    break
            for connection in taken:
                if connection is not None:
                    connection.disconnect()
        finally:
            for connection in reversed(taken):  # the queue is LIFO: the same order as before
                self.pool.put_nowait(connection)


class _WatchedProxy(SentinelConnectionPoolProxy):
    """Where new connections go: the address the pool's watcher holds, else Sentinel's."""

    def get_master_address(self) -> Any:
        pool = self.connection_pool_ref()
        if isinstance(pool, WatchedSentinelPool) and self.is_master:
            return pool.resolve_master()
        return super().get_master_address()  # type: ignore[no-untyped-call]


class WatchedSentinelPool(_QuickReadyCheck, SentinelConnectionPool):
    """A Sentinel pool that follows the Sentinels' failover as it happens.

    redis-py asks Sentinel only when it opens a socket, and Sentinel demotes
    a live old master only ~8-10 s after a failover (graceful or partition):
    until then pooled sockets keep writing to it, and those writes vanish
    when it resyncs as a replica. A daemon thread per pool (and process)
    therefore subscribes to every Sentinel's event channels and:

    - on ``+odown`` of the master or ``+selected-slave`` /
      ``+failover-state-send-slaveof-noone`` (the leader Sentinel is about
      to promote a replica) *fences* the pool: idle sockets are closed at
      once, busy ones are dropped when released, and new calls wait (up to
      the socket timeout, then `redis.ConnectionError`) instead of writing to
      a master whose writes are about to be dropped;
    - on ``+promoted-slave`` (the replica now answers as master) moves to it
      and lifts the fence, and disbelieves Sentinels that still name the old
      master (they do until the other replicas have resynced) until
      ``+switch-master`` or `promotion_timeout`; ``+switch-master`` moves
      too, should the first message be missed; ``-failover-abort-*`` and
      ``-odown`` lift the fence, and it never lasts longer than `fence_timeout`;
    - every `check_interval` seconds (the safety net for a lost message or
      a Sentinel that is down) asks every Sentinel for the master and keeps
      the answer with the highest config epoch, so one Sentinel that has not
      heard of the failover yet cannot send the pool back to the old master.

    Only the leader Sentinel publishes the failover-state events, hence one
    subscription per Sentinel (a few idle sockets, one thread).
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, check_interval: float = 1.0,
                 fence_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.proxy = _WatchedProxy(  # type: ignore[no-untyped-call]
            connection_pool=self, is_master=self.is_master, check_connection=self.check_connection,
            service_name=service_name, sentinel_manager=sentinel_manager)
        self.connection_kwargs["connection_pool"] = self.proxy
        self.check_interval = check_interval
        self.fence_timeout = fence_timeout
        self.promotion_timeout = 60.0  # how long +promoted-slave outweighs Sentinels naming the old master
        self.fence_wait = float(kwargs.get("socket_timeout") or 1.0)
        self._watch_lock = threading.Lock()
        self._watch_pid = 0
        self._stop = threading.Event()
        self._fence = threading.Condition()
        self._fenced_until = 0.0  # monotonic deadline; 0 when not fenced
        self._fence_reason = ""
        self._known: Optional[Tuple[str, int]] = None  # the master the watcher last saw
        self._known_at = 0.0
        # After +promoted-slave: the demoted master, which every Sentinel still
        # names until +switch-master, and until when to disbelieve them.
        self._demoted: Optional[Tuple[str, int]] = None
        self._demoted_until = 0.0
        self._unanimous = False  # the last poll's Sentinels all named one master
        self.switches = 0  # master changes seen (for tests and logs)
        self.last_switch: Tuple[float, str] = (0.0, "")  # (monotonic time, what told) of the last change
        self.polls = 0  # safety-net polls answered (for tests)

    # -- callers' side ---------------------------------------------------------
    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch_pid != os.getpid():
            self._start_watcher()
        if self._fenced_until:
            self._wait_for_fence()
        return super().get_connection(*args, **kwargs)

    def owns_connection(self, connection: Any) -> Any:
        if self._fenced_until and self.fenced:
            return False  # written to the master being replaced: drop it
        return super().owns_connection(connection)  # type: ignore[no-untyped-call]

    @property
    def fenced(self) -> bool:
        """True while a failover of the master is under way (see the class doc)."""
        until = self._fenced_until
        return bool(until) and time.monotonic() < until

    def _wait_for_fence(self) -> None:
        deadline = time.monotonic() + self.fence_wait
        with self._fence:
            while self.fenced:
                left = min(deadline, self._fenced_until) - time.monotonic()
                if left <= 0:
                    break
                self._fence.wait(left)
            if self.fenced:
                raise redis.exceptions.ConnectionError(
                    f"Sentinel failover of {self.service_name!r} in progress ({self._fence_reason})")

    def resolve_master(self) -> Tuple[str, int]:
        """The master new connections go to (the watcher's if fresh, else Sentinel's)."""
        known = self._known
        if known is not None and time.monotonic() - self._known_at < 2 * self.check_interval + 1.0:
            return known
        return self.follow(self.discover_master(), "discovered")

    def discover_master(self) -> Tuple[str, int]:
        """The master named by the Sentinel with the highest config epoch.

        Every Sentinel is asked (redis-py takes the first answer, which a
        Sentinel that has not heard of a failover yet gets wrong).
        """
        manager = self.sentinel_manager
        best: Optional[Tuple[int, Tuple[str, int]]] = None
        named: Set[Tuple[str, int]] = set()
        errors: List[str] = []
        not_sentinels = 0  # answered "unknown command": a data node, not a Sentinel
        refusals: List[str] = []  # refused the Sentinel credentials (or their absence)
        denied = False  # one of them: an ACL user without SENTINEL MASTERS
        monitored: Set[str] = set()  # the services of the Sentinels that answered
        sentinels = list(manager.sentinels)
        for sentinel in sentinels:
            try:  # SENTINEL MASTERS, as redis-py asks: the one command the Sentinel ACL grants
                masters = sentinel.sentinel_masters()
            except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError,
                    redis.exceptions.TimeoutError) as exc:
                errors.append(f"{sentinel} - {exc!r}" + (f": {exc}" if str(exc) else ""))  # as redis-py words it
                said = str(exc).upper()
                if isinstance(exc, redis.exceptions.ResponseError) and "UNKNOWN COMMAND" in said:
                    not_sentinels += 1
                elif isinstance(exc, (redis.exceptions.AuthenticationError,
                                      redis.exceptions.AuthenticationWrongNumberOfArgsError)) \
                        or said.startswith(("WRONGPASS", "NOAUTH")):
                    refusals.append(str(exc))
                elif isinstance(exc, (redis.exceptions.NoPermissionError, redis.exceptions.AuthorizationError)) \
                        or "NOPERM" in said:
                    refusals.append(str(exc))
                    denied = True
                continue
            monitored.update(str(name) for name in masters)
            state = masters.get(self.service_name)
            if not state or not manager.check_master_state(state, self.service_name):
                continue
            epoch = int(state.get("config-epoch", 0) or 0)
            force_ip = getattr(manager, "_force_master_ip", None)
            address = (str(force_ip if force_ip is not None else state["ip"]), int(state["port"]))
            named.add(address)
            if best is None or epoch > best[0]:
                best = (epoch, address)
        # Every Sentinel that answered names one master: a failover, if any,
        # is over everywhere (see `follow`).
        self._unanimous = len(named) == 1
        if best is None:
            # Only what every listed server said is the operator's to fix; a Sentinel down or
            # restarting among them may yet name the master: an outage, retried.
            answered = len(sentinels) - len(errors)  # with the masters they monitor
            if refusals and len(refusals) + not_sentinels == len(sentinels):
                raise SentinelRefusal(
                    f"every Sentinel of this URL refused the Sentinel credentials ({refusals[0].strip()}); set "
                    "MCP_REDIS_SENTINEL_PASSWORD (and MCP_REDIS_SENTINEL_USERNAME for an ACL user) to what "
                    "the Sentinels expect: their requirepass, or a user granted SENTINEL (docs/security.md)",
                    permission=denied)
            if sentinels and not_sentinels == len(sentinels):
                raise WrongServerKind(
                    "the servers of this redis+sentinel:// URL are not Sentinels (they do not know the "
                    "SENTINEL command): list the Sentinels (port 26379 by default), not the data nodes, "
                    "or use redis://host:port for a single server")
            if answered and answered + not_sentinels == len(sentinels) and self.service_name not in monitored:
                known = ", ".join(repr(name) for name in sorted(monitored)[:10]) or "none"
                also = f"; {not_sentinels} of its servers are not Sentinels" if not_sentinels else ""
                raise WrongServerKind(
                    f"no Sentinel of this URL monitors a master named {self.service_name!r} (they "
                    f"monitor: {known}{also}); the path of a redis+sentinel:// URL is the name given to "
                    "`sentinel monitor`")
            raise MasterNotFoundError(
                f"No master found for {self.service_name!r}" + (f" : {', '.join(errors)}" if errors else ""))
        return best[1]

    # -- the watcher's side ------------------------------------------------------
    def follow(self, address: Tuple[str, int], why: str) -> Tuple[str, int]:
        """What Sentinel names now: a move when it differs, else only a fresher `resolve_master`.

        The same address does not lift a fence: during a failover Sentinel
        keeps naming the old master until ``+switch-master``.
        """
        current = self.proxy.master_address
        if address == current and self._demoted is not None and self._unanimous:
            # Every Sentinel names the new master now: the failover is over,
            # and a later answer naming the old one is a new failover (a
            # failback), to follow at once.
            self._demoted = None
        if address == self._demoted and time.monotonic() < self._demoted_until and current is not None:
            # Promoted already: Sentinel names the old master until the other
            # replicas are reconfigured (+switch-master), which may take a resync.
            self._known, self._known_at = current, time.monotonic()
            return current  # type: ignore[no-any-return]
        if address != current:
            return self.switch_to(address, why)
        self._known, self._known_at = address, time.monotonic()
        return address

    def promoted(self, address: Tuple[str, int]) -> None:
        """``+promoted-slave``: `address` is the master now; its predecessor is disbelieved for a while."""
        old = self.proxy.master_address
        if old is not None and old != address:
            self._demoted, self._demoted_until = old, time.monotonic() + self.promotion_timeout
        self.switch_to(address, "+promoted-slave")

    def switch_to(self, address: Tuple[str, int], why: str) -> Tuple[str, int]:
        """Make `address` the master: close sockets to another one, lift the fence."""
        old = self.proxy.master_address
        self._known, self._known_at = address, time.monotonic()
        if why != "+promoted-slave" and address != old:
            # A move Sentinel announces, or a third master named: believe it
            # again. Not a `+switch-master` for the master already in use:
            # the other Sentinels announce it before the leader has finished,
            # and until then the leader (highest config epoch) still names
            # the demoted master to the poll.
            self._demoted = None
        if old != address:
            self.proxy.master_address = address
            if old is not None:
                self.switches += 1
                self.last_switch = (time.monotonic(), why)
                log.warning("sentinel %r: master moved (%s)", self.service_name, why)
            self.disconnect(inuse_connections=False)
        self.lift_fence()
        return address

    def raise_fence(self, reason: str) -> None:
        with self._fence:
            self._fenced_until = time.monotonic() + self.fence_timeout
            self._fence_reason = reason
        log.warning("sentinel %r: failover under way (%s): writes held", self.service_name, reason)
        self.disconnect(inuse_connections=False)

    def lift_fence(self, reason: Optional[str] = None) -> None:
        if not self._fenced_until or (reason is not None and reason != self._fence_reason):
            return
        with self._fence:
            self._fenced_until = 0.0
            self._fence.notify_all()

    def _start_watcher(self) -> None:
        with self._watch_lock:
            if self._watch_pid == os.getpid():
                return
            self._watch_pid = os.getpid()
            self._stop = threading.Event()
            self._fenced_until = 0.0
            thread = threading.Thread(
                target=_watch_master,
                args=(weakref.ref(self), self._stop, self.check_interval),
                name="mcp_redis-sentinel-watch",
                daemon=True,
            )
            thread.start()

    def stop_watching(self) -> None:
        self._stop.set()


# Sentinel events (https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/#pubsub-messages)
_FENCE_EVENTS = ("+odown", "+selected-slave", "+failover-state-send-slaveof-noone")
_WATCHED_CHANNELS = ("+switch-master", "+promoted-slave", "-odown", *_FENCE_EVENTS)
_ABORT_PATTERN = "-failover-abort-*"


def _event_service(channel: str, data: str) -> Optional[str]:
    """The master name an event is about (``master <name> ...`` or ``... @ <name> ip port``)."""
    words = data.split()
    if channel == "+switch-master":
        return words[0] if words else None
    if len(words) >= 2 and words[0] == "master":
        return words[1]
    if "@" in words and words.index("@") + 1 < len(words):
        return words[words.index("@") + 1]
    return None


def _handle_event(pool: WatchedSentinelPool, channel: str, data: str) -> None:
    if _event_service(channel, data) != pool.service_name:
        return
    if channel == "+switch-master":
        words = data.split()
        try:
            pool.switch_to((words[3], int(words[4])), "+switch-master")
        except (IndexError, ValueError):
            log.debug("sentinel: unreadable +switch-master %r", data)
    elif channel == "+promoted-slave":  # slave <ip:port> <ip> <port> @ <service> <ip> <port>
        words = data.split()
        try:
            pool.promoted((words[2], int(words[3])))
        except (IndexError, ValueError):
            log.debug("sentinel: unreadable +promoted-slave %r", data)
    elif channel in _FENCE_EVENTS:
        pool.raise_fence(channel)
    elif channel == "-odown":
        pool.lift_fence("+odown")
    elif channel.startswith("-failover-abort"):
        pool.lift_fence()


class _Subscriptions:
    """One pubsub per Sentinel of the pool's manager, reopened on error (at most once per interval).

    A Sentinel whose user may not subscribe (``NOPERM``) is not asked again
    in this process: the poll follows its failovers (docs/security.md lists
    the grants for the events).
    """

    def __init__(self, interval: float, service: str) -> None:
        self.interval = interval
        self.service = service
        self.open: Dict[int, Any] = {}  # id(sentinel client) -> PubSub
        self.names: Dict[int, str] = {}  # id(sentinel client) -> its address, for logs
        self.retry_at: Dict[int, float] = {}

    def refresh(self, sentinels: Sequence[Any]) -> bool:
        """Subscribe where not subscribed; True when a new subscription opened (events may be missed)."""
        opened = False
        now = time.monotonic()
        for sentinel in sentinels:
            key = id(sentinel)
            if key in self.open or self.retry_at.get(key, 0.0) > now:
                continue
            pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*_WATCHED_CHANNELS)
                pubsub.psubscribe(_ABORT_PATTERN)
            except redis.exceptions.NoPermissionError as exc:
                _close_quietly(pubsub)
                self._refused(key, str(sentinel), exc)
                continue
            except Exception:
                self.retry_at[key] = now + self.interval
                _close_quietly(pubsub)
                continue
            self.open[key] = pubsub
            self.names[key] = str(sentinel)
            opened = True
        return opened

    def _refused(self, key: int, name: str, exc: BaseException) -> None:
        """The Sentinel's user may not subscribe: never ask it again in this process."""
        self.retry_at[key] = float("inf")
        log.warning("sentinel %r: %s may not subscribe to failover events (%s); failovers are followed "
                    "by polling once a second (docs/security.md: the Sentinel user's grants)", self.service, name, exc)

    def sockets(self) -> List[Any]:
        out = []
        for pubsub in self.open.values():
            sock = getattr(pubsub.connection, "_sock", None) if pubsub.connection is not None else None
            if sock is not None:
                out.append(sock)
        return out

    def drain(self, pool: WatchedSentinelPool) -> None:
        for key, pubsub in list(self.open.items()):
            try:
                while True:
                    message = pubsub.get_message(timeout=0)
                    if message is None:
                        break
                    if message.get("type") in ("message", "pmessage"):
                        _handle_event(pool, str(message["channel"]), str(message["data"]))
            except redis.exceptions.NoPermissionError as exc:  # SUBSCRIBE's reply comes here
                _close_quietly(self.open.pop(key))
                self._refused(key, self.names.get(key, "a Sentinel"), exc)
            except Exception:
                log.debug("sentinel subscription lost", exc_info=True)
                _close_quietly(self.open.pop(key))
                self.retry_at[key] = time.monotonic() + self.interval

    def close(self) -> None:
        for pubsub in self.open.values():
            _close_quietly(pubsub)
        self.open.clear()


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception:  # noqa: S110 - a broken socket is being dropped anyway
        pass


def _watch_master(ref: weakref.ref[WatchedSentinelPool], stop: threading.Event, interval: float) -> None:
    """The pool's watcher thread: Sentinel events as they come, a poll every `interval`."""
    pool = ref()
    subs = _Subscriptions(interval, pool.service_name if pool is not None else "")
    del pool
    next_poll = 0.0
    try:
        while not stop.is_set():
            pool = ref()
            if pool is None:
                return
            try:
                if subs.refresh(list(pool.sentinel_manager.sentinels)):
                    next_poll = 0.0  # events before the subscription are unknown: ask now
                subs.drain(pool)
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + interval
                    try:
                        pool.follow(pool.discover_master(), "poll")
                        pool.polls += 1
                    except redis.exceptions.ConnectionError:
                        pass  # no master known right now: the next connect() says so
            except Exception:  # pragma: no cover - never let the watcher die
                log.debug("sentinel watch failed", exc_info=True)
            sockets = subs.sockets()
            del pool
            wait = min(_EVENT_WAIT, max(0.0, next_poll - time.monotonic()))
            if sockets:
                try:
                    select.select(sockets, [], [], wait)
                except (OSError, ValueError):
                    stop.wait(wait)
            else:
                stop.wait(wait)
    finally:
        subs.close()


_EVENT_WAIT = 0.25  # longest sleep between reads of the subscriptions (TLS may buffer)


class _RoutedScript(redis.commands.core.Script):
    """A cluster's script. redis-py's answers ``NOSCRIPT`` with ``SCRIPT LOAD`` sent to every
    master, so one master that stopped answering (SIGSTOP, a partition) held up a call to a
    healthy one, and the lock watchdog with it (its liveness lapsed; its locks on the healthy
    masters were taken over). This one answers it with ``EVAL``, routed by key like the
    ``EVALSHA``: it loads the script on that node alone."""

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        client = self.registered_client if client is None else client
        if isinstance(client, (redis.client.Pipeline, redis.cluster.ClusterPipeline)):
            return super().__call__(keys, args, client)
        keys, args = list(keys or ()), list(args or ())
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.script, len(keys), *keys, *args)


class LazyCluster:
    """A `RedisCluster` built on first use, so a cluster that is down at start degrades like a single server.

    redis-py's `RedisCluster` connects in its constructor (it reads the slot
    map). Built here, that made `connect()` raise for a process started
    while the cluster was down. This holder keeps the constructor's arguments
    and builds the client inside the first call made through the policy:
    a failed build is a transient `redis.ConnectionError` (counted by the
    breaker, answered by each feature's fallback), and the next call tries
    again, so the process recovers when the cluster comes up. Once built,
    every attribute is the client's own.
    """

    PRIMARIES = RedisCluster.PRIMARIES
    REPLICAS = RedisCluster.REPLICAS
    ALL_NODES = RedisCluster.ALL_NODES
    RANDOM = RedisCluster.RANDOM
    DEFAULT_NODE = RedisCluster.DEFAULT_NODE

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._client: Any = None  # RedisCluster once built
        self._lock = threading.Lock()
        self._encoder = redis.connection.Encoder(  # type: ignore[attr-defined,no-untyped-call]
            kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"),
            bool(kwargs.get("decode_responses", False)))

    def __repr__(self) -> str:
        return f"LazyCluster(built={self.built})"

    @property
    def built(self) -> bool:
        return self._client is not None

    def build(self) -> Any:
        """The client, built now if need be (`redis.ConnectionError` while the cluster is down)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                try:
                    self._client = RedisCluster(**self._kwargs)
                except redis.exceptions.RedisError as exc:
                    if redis_misconfiguration(exc, follows_failover=True) is not None:
                        raise  # the policy turns it into a ConfigurationError
                    raise redis.exceptions.ConnectionError(_cluster_down(self._kwargs, exc)) from None
                except redis.exceptions.RedisClusterException as exc:
                    refused = _refusal_behind(exc)  # redis-py words any refusal of CLUSTER SLOTS
                    if refused is not None:  # as "cluster mode is not enabled"
                        if redis_misconfiguration(refused, follows_failover=True) is not None:
                            raise refused from None  # NOPERM, WRONGPASS...: the policy names the fix
                        if "CLUSTER SUPPORT DISABLED" in str(refused).upper():
                            raise WrongServerKind(
                                f"the server is not in cluster mode ({str(refused).strip()}): a "
                                "redis+cluster:// URL lists cluster nodes; a single server is "
                                "redis://host:port") from None
                    raise redis.exceptions.ConnectionError(_cluster_down(self._kwargs, exc)) from None
                log.info("redis cluster client built")
            return self._client

    # Without a client: what needs no server.
    def get_encoder(self) -> Any:
        return self._client.get_encoder() if self._client is not None else self._encoder

    def register_script(self, script: Any) -> Any:
        return _RoutedScript(self, script)  # type: ignore[arg-type]  # runs through this holder

    def get_nodes(self) -> List[Any]:
        return self._client.get_nodes() if self._client is not None else []

    def disconnect_connection_pools(self) -> None:
        if self._client is not None:
            self._client.disconnect_connection_pools()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        client = self._client
        if client is not None:
            return getattr(client, name)
        if not callable(getattr(RedisCluster, name, None)):
            raise AttributeError(name)

        def deferred(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.build(), name)(*args, **kwargs)

        deferred.__name__ = name
        return deferred


def _refusal_behind(exc: BaseException) -> Optional[redis.exceptions.ResponseError]:
    """The server's error reply that a redis-py cluster exception was raised over, if any."""
    seen: BaseException = exc
    for _ in range(5):  # redis-py wraps it once or twice, without `from`
        inner = seen.__cause__ or seen.__context__
        if inner is None or isinstance(inner, redis.exceptions.ResponseError):
            return inner
        seen = inner
    return None


def _cluster_down(kwargs: Dict[str, Any], exc: BaseException) -> str:
    nodes = ", ".join(f"{n.host}:{n.port}" for n in kwargs.get("startup_nodes", []))
    said = str(exc).strip()  # redis-py's words: the node and the reason (refused, certificate...), no password
    return (f"Redis Cluster unreachable: no startup node ({nodes}) gave the slot map "
            f"({type(exc).__name__}{': ' + said if said else ''}); calls use each feature's fallback "
            "and the next one tries again")


def _split_userinfo(netloc: str) -> Tuple[Optional[str], Optional[str], str]:
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    if not colon:  # redis://secret@host: the lone userinfo is a password
        return None, unquote(user) or None, hosts
    return (unquote(user) or None), (unquote(password) or None), hosts


# redis-py >= 5 sends CLIENT SETINFO (lib-name, lib-ver) on connect to servers
# >= 7.2 and swallows a refusal: with the minimal ACL of docs/security.md each
# connect would leave a denial in ACL LOG. The library names its connections
# with CLIENT SETNAME instead, so SETINFO is not sent (the same handshake on
# Redis 7.0, 7.2+ and Valkey).
try:
    import redis.driver_info  # noqa: F401 - redis-py >= 7.1: lib_name/lib_version are deprecated

    _NO_SETINFO: Dict[str, Any] = {"driver_info": None}
except ImportError:  # pragma: no cover - older redis-py
    _NO_SETINFO = {"lib_name": None, "lib_version": None}


def _common_kwargs(s: Settings) -> Dict[str, Any]:
    return {
        **_NO_SETINFO,
        "socket_timeout": s.socket_timeout,
        "socket_connect_timeout": s.socket_connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": s.health_check_interval,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        "encoding_errors": "surrogatepass",
        "protocol": 2,
        # Not "client_name": redis-py fails the connect when CLIENT SETNAME is
        # refused, which some managed services and ACLs do (see _name_connection).
        "redis_connect_func": _connect_and_name,
    }


CLIENT_NAME = "mcp_redis"
_SETNAME_REFUSED: Set[Any] = set()  # servers (host, port) / socket paths that refused CLIENT SETNAME


def _connect_and_name(connection: Any) -> None:
    """redis-py's handshake (AUTH, SELECT), then `_name_connection`."""
    connection.on_connect()
    _name_connection(connection)


def _name_connection(connection: Any) -> None:
    """``CLIENT SETNAME mcp_redis``, or nothing where the server refuses it.

    Managed services (and least-privilege ACLs) may refuse ``CLIENT SETNAME``;
    redis-py's own ``client_name`` would then fail every connect. A refusal is
    logged once per server and the connections stay unnamed.
    """
    where = (getattr(connection, "host", None), getattr(connection, "port", None), getattr(connection, "path", None))
    if where in _SETNAME_REFUSED:
        return
    connection.send_command("CLIENT", "SETNAME", CLIENT_NAME, check_health=False)
    try:
        connection.read_response()
    except redis.exceptions.ResponseError as exc:
        _SETNAME_REFUSED.add(where)
        log.warning("the Redis server refused CLIENT SETNAME (%s): its connections stay unnamed", exc)


def _ssl_kwargs(s: Settings) -> Dict[str, Any]:
    # Chain and host name verified (redis-py turns the name check off only with ssl_cert_reqs="none").
    out: Dict[str, Any] = {"ssl_cert_reqs": s.ssl_cert_reqs, "ssl_check_hostname": True}
    if s.ssl_ca_certs:
        out["ssl_ca_certs"] = s.ssl_ca_certs
    if s.ssl_certfile:
        out["ssl_certfile"] = s.ssl_certfile
    if s.ssl_keyfile:
        out["ssl_keyfile"] = s.ssl_keyfile
    return out


def _tls_kwargs(s: Settings, tls: bool) -> Dict[str, Any]:
    """TLS for a client built from host lists (Sentinel, Cluster): the `_ssl_kwargs` of ``rediss://``."""
    return {"ssl": True, **_ssl_kwargs(s)} if tls else {}


def _sentinel_kwargs(s: Settings, tls: bool) -> Dict[str, Any]:
    """The connections to the Sentinels themselves: their own ACL user/password and TLS switch."""
    out: Dict[str, Any] = {
        **_NO_SETINFO,
        "socket_timeout": s.socket_timeout,
        "socket_connect_timeout": s.socket_connect_timeout,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        "protocol": 2,
    }
    if s.sentinel_username:
        out["username"] = s.sentinel_username
    if s.sentinel_password:
        out["password"] = s.sentinel_password
    return {**out, **_tls_kwargs(s, s.sentinel_tls if s.sentinel_tls is not None else tls)}


class _SentinelClient(redis.Redis):
    """A client of one Sentinel whose repr is its address.

    redis-py's "No master found" error quotes each Sentinel's repr, which is
    otherwise every connection keyword (certificate paths included) around
    the reason that matters (e.g. a failed certificate check).
    """

    def __repr__(self) -> str:
        kwargs = self.connection_pool.connection_kwargs
        return f"<sentinel {kwargs.get('host')}:{kwargs.get('port')}>"


class _Sentinel(Sentinel):
    """`Sentinel` whose Sentinel clients are `_SentinelClient` (a short error message)."""

    def __init__(self, sentinels: Sequence[Tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(sentinels, **kwargs)
        self.sentinels = [_SentinelClient(host, port, **self.sentinel_kwargs) for host, port in sentinels]


def _cluster_kwargs(s: Settings, tls: bool) -> Dict[str, Any]:
    """Every cluster node's connections: `_common_kwargs` with the cluster's retry, and TLS."""
    out = _common_kwargs(s)
    # MOVED/ASK are followed inside redis-py; a small retry lets it
    # re-read the slot map after a node goes away.
    out["retry"] = Retry(ExponentialBackoff(cap=0.1, base=0.01), 2)
    out.pop("health_check_interval", None)
    out["redis_connect_func"] = _name_connection  # RedisCluster runs redis-py's handshake first
    return {**out, **_tls_kwargs(s, tls)}


def _warn_if_plaintext(s: Settings, scheme: str, shown: str) -> None:
    """TLS material configured for a URL that will not use it: say so rather than connect in silence."""
    if scheme in ("redis", "redis+cluster") and (s.ssl_ca_certs or s.ssl_certfile):
        log.warning("MCP_REDIS_SSL_* is set but %s connects in plaintext; use rediss://, rediss+sentinel:// "
                    "or rediss+cluster:// for TLS", shown)
    elif scheme == "redis+sentinel" and (s.ssl_ca_certs or s.ssl_certfile):
        log.warning("MCP_REDIS_SSL_* is set but the data nodes of %s are reached in plaintext%s; use "
                    "rediss+sentinel:// for TLS", shown, "" if s.sentinel_tls else " (and the Sentinels)")


def _url_field(s: Settings, url: str) -> str:
    """The setting `url` comes from (a feature's own URL, else ``redis_url``): errors name it."""
    if url != s.redis_url:
        for field in FEATURE_URLS.values():
            if getattr(s, field) == url:
                return field
    return "redis_url"


def build_client(s: Settings, url: Optional[str] = None) -> Tuple[Any, str, Optional[Sentinel], Optional[str]]:
    """The redis-py client for `url` (default ``s.redis_url``): (client, kind, sentinel, service)."""
    url = s.redis_url if url is None else url
    if not url:
        raise ConfigurationError("REDIS_URL (redis_url): not set (local mode has no Redis client)")
    shown = redact_url(url)
    name = url_setting(_url_field(s, url))
    scheme = url.split("://", 1)[0].lower()
    common = _common_kwargs(s)
    _warn_if_plaintext(s, scheme, shown)
    try:
        if scheme in ("redis", "rediss", "unix"):
            extra = _ssl_kwargs(s) if scheme == "rediss" else {}
            if scheme == "unix":
                common.pop("socket_keepalive")  # TCP only
            pool = ReadyCheckedPool.from_url(
                url,
                max_connections=s.max_connections,
                timeout=s.pool_timeout,
                **common,
                **extra,
            )
            return redis.Redis(connection_pool=pool), "single", None, None
        parts = urlsplit(url)
        user, password, hosts_part = _split_userinfo(parts.netloc)
        query = dict(parse_qsl(parts.query))
        tls = scheme.startswith("rediss+")
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            path = [p for p in parts.path.split("/") if p]
            if not path:
                raise ConfigurationError(f"{name}: {shown!r} needs a service name: {scheme}://h:26379/<service>[/<db>]")
            service = unquote(path[0])
            db = int(path[1]) if len(path) > 1 else int(query.get("db", 0))
            sentinels = parse_host_list(hosts_part, 26379, name)
            sentinel = _Sentinel(
                sentinels,
                sentinel_kwargs=_sentinel_kwargs(s, tls),
                username=user,
                password=password,
                db=db,
                **common,
                **_tls_kwargs(s, tls),
            )
            client = sentinel.master_for(
                service,
                connection_pool_class=WatchedSentinelPool,
                max_connections=s.max_connections,
                check_interval=1.0,
            )
            return client, "sentinel", sentinel, service
        if scheme in ("redis+cluster", "rediss+cluster"):
            db_part = [p for p in parts.path.split("/") if p]
            db_given = db_part[0] if db_part else query.get("db", "0")
            if not (db_given.isascii() and db_given.isdigit() and int(db_given) == 0):
                raise ConfigurationError(
                    f"{name}: {shown!r} names database {db_given!r}; Redis Cluster has only "
                    "database 0 (managed clusters too): drop the '/<db>' (or db=) from the URL and give "
                    "this deployment its own MCP_REDIS_KEY_PREFIX instead")
            nodes = [ClusterNode(h, p) for h, p in parse_host_list(hosts_part, 6379, name)]  # type: ignore[no-untyped-call]
            client = LazyCluster(
                startup_nodes=nodes,
                username=user,
                password=password,
                max_connections=s.max_connections,
                require_full_coverage=True,
                **_cluster_kwargs(s, tls),
            )
            return client, "cluster", None, None
    except ConfigurationError as exc:
        said = scrub(str(exc), url)  # a misparsed password can be quoted as a host or a port
        if said == str(exc):
            raise
        failed = ""
    except (ValueError, TypeError) as exc:
        # redis-py's parse errors can quote the URL (a password with '/' or '#'
        # is cut into a "port"): raised outside this block, so not even the
        # exception's context keeps the message.
        failed = type(exc).__name__
    else:
        failed = said = ""
    if failed or said:  # raised outside the except blocks: no context keeps the original message
        hint = (" (a password with '/', '?', '#' or '@' must be percent-encoded)"
                if re.search(r"[/?#@]", url.split("://", 1)[-1].rpartition("@")[0]) else "")
        raise ConfigurationError(f"{name}: cannot use {shown!r}: {failed or said}{hint}")
    raise ConfigurationError(f"{name}: unsupported scheme in {shown!r}")


# -- building a connection ---------------------------------------------------------
def connect(s: Settings, url: Optional[str] = None, scripts: Optional[ScriptSet] = None) -> RedisConnection:
    """A new `RedisConnection` to `url` (default ``s.redis_url``) with its own policy.

    `mcp_redis.Client` builds one per distinct URL and owns it.
    """
    url = s.redis_url if url is None else url
    try:
        client, kind, sentinel, service = build_client(s, url)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        # A client that connects in its constructor must not let a down
        # server escape as a raw redis error (clusters are built lazily now).
        from .errors import BackendUnavailable

        misconfigured = redis_misconfiguration(exc, follows_failover=True)
        if misconfigured is not None:
            raise misconfigured from exc
        raise BackendUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc
    holder: List[RedisConnection] = []
    breaker = CircuitBreaker(
        "redis",
        failure_threshold=s.breaker_failure_threshold,
        reset_timeout=s.breaker_reset_timeout,
        on_open=lambda: holder[0].disconnect() if holder else None,
    )
    policy = Resilience(
        "redis",
        attempts=s.retry_attempts,
        initial_backoff=s.retry_initial_backoff,
        max_backoff=s.retry_max_backoff,
        breaker=breaker,
        misconfiguration=lambda exc: holder[0].misconfiguration(exc) if holder else None,
        recover=lambda exc: holder[0].recover(exc) if holder else False,
    )
    conn = RedisConnection(client, policy, kind, redact_url(url or ""), s, sentinel, service,
                           scripts=scripts if scripts is not None else ScriptSet(),
                           variable=setting_variable(_url_field(s, url or s.redis_url or "")))
    holder.append(conn)
    log.info("redis client ready: %s (%s)", conn.url, kind)
    return conn


def get_redis() -> RedisConnection:
    """Deprecated: the default client's `RedisConnection` for REDIS_URL.

    Use ``mcp_redis.default_client().redis(feature)``; nothing in the package
    calls this. Raises `ConfigurationError` in local mode (no `REDIS_URL`).
    """
    from .client import default_client

    return default_client().redis()


def redis_available() -> bool:
    """True when Redis is configured and its breaker is not open."""
    from .client import default_client

    client = default_client()
    if not client.settings.redis_url:
        return False
    return client.redis().policy.available


_fork_hooks: List[Callable[[], None]] = []


def on_fork(hook: Callable[[], None]) -> Callable[[], None]:
    """Run `hook` in a forked child (modules with threads or per-process state)."""
    _fork_hooks.append(hook)
    return hook


def _after_fork_in_child() -> None:
    for hook in list(_fork_hooks):
        try:
            hook()
        except Exception:  # pragma: no cover - defensive
            log.exception("fork hook failed")


def _at_fork_child() -> None:
    forget_after_fork()
    _after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_at_fork_child)
