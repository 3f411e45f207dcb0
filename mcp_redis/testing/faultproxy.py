"""A fault-injecting TCP proxy for tests: put it between the library and Redis
(or PostgreSQL — it never parses the protocol).

    with FaultProxy("127.0.0.1", server.port) as proxy:
        mcp_redis.configure(redis_url=proxy.url())
        proxy.blackhole()          # accepted, never answered
        ...
        proxy.pass_through()       # heal

Faults (switchable at any time, from any thread; they apply to open and new
connections alike):

* ``pass``      — bytes flow unchanged.
* ``latency``   — every reply chunk is held ``latency`` seconds (plus up to
  ``jitter``) before it is forwarded.
* ``drop``      — every open connection is closed; new ones are accepted and
  closed at once.
* ``blackhole`` — connections are accepted (the kernel completes the
  handshake) but nothing is forwarded either way: the peer waits forever.
  Connections that had bytes withheld are closed when the fault clears, since
  their protocol stream can no longer be trusted.
* ``reset``     — requests are forwarded; the first reply chunk is cut in half
  and the connection is reset (RST) right after the partial reply.
* ``reset_once`` — like ``reset`` for the next reply only, then ``pass``: the
  request was executed, its reply lost — what a retry must cope with.

Loopback only, threads only (one acceptor, two pumps per connection), no
dependencies. Not part of the public API: a testing and benchmarking tool.
"""

from __future__ import annotations

import contextlib
import enum
import random
import select
import socket
import struct
import threading
import time
from typing import Dict, Iterator, List, Optional

__all__ = ["Fault", "FaultProxy"]

_POLL = 0.02  # seconds a pump waits before re-reading the fault in force
_CHUNK = 65536


class Fault(str, enum.Enum):
    """The fault a `FaultProxy` injects."""

    PASS = "pass"  # noqa: S105 - not a password
    LATENCY = "latency"
    DROP = "drop"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    RESET_ONCE = "reset_once"


class _Link:
    """One proxied connection: the client side, the upstream side, two pumps."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: Optional[socket.socket]) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.poisoned = False  # bytes were withheld (black hole): close on heal
        self.swallowing = False  # sent the proxy's `swallow_marker`: nothing passes any more
        self._close_lock = threading.Lock()

    def start(self) -> None:
        if self.upstream is None:
            threading.Thread(target=self._hold, name="faultproxy-hold", daemon=True).start()
            return
        threading.Thread(target=self._pump, args=(self.client, self.upstream, False),
                         name="faultproxy-up", daemon=True).start()
        threading.Thread(target=self._pump, args=(self.upstream, self.client, True),
                         name="faultproxy-down", daemon=True).start()

    def close(self, *, reset: bool = False) -> None:
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self.proxy._forget(self)

    def _hold(self) -> None:
        """A connection accepted during a black hole with no upstream: never answer."""
        while not self.closed.is_set():
            fault = self.proxy.fault
            if fault is Fault.DROP:
                self.close()
                return
            if fault is not Fault.BLACKHOLE:
                self.close()  # it never reached Redis: the client must reconnect
                return
            time.sleep(_POLL)

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        proxy = self.proxy
        try:
            while not self.closed.is_set():
                fault = proxy.fault
                if fault is Fault.DROP:
                    proxy._count("dropped")
                    self.close()
                    return
                if self.poisoned and fault is not Fault.BLACKHOLE:
                    proxy._count("poisoned_closed")
                    self.close()
                    return
                try:
                    readable, _, _ = select.select([src], [], [], _POLL)
                except (OSError, ValueError):
                    self.close()
                    return
                if not readable:
                    continue
                if fault is Fault.BLACKHOLE:
                    # Leave the bytes unread: the peer waits for ever.
                    self.poisoned = True
                    time.sleep(_POLL)
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    self.close()
                    return
                marker = proxy.swallow_marker
                if not reply and marker is not None and marker in data:
                    self.swallowing = True
                if self.swallowing:  # a flow dropped on the path: read, never delivered
                    proxy._count("swallowed", len(data))
                    continue
                if not reply and proxy.request_delay > 0:  # a slow path towards the server
                    proxy._count("requests_delayed")
                    if self.closed.wait(proxy.request_delay):
                        return
                if reply:
                    fault = proxy.fault  # may have changed while waiting
                    if fault is Fault.LATENCY:
                        delay = proxy.latency_seconds + random.uniform(0, proxy.jitter_seconds)
                        if self.closed.wait(delay):
                            return
                    elif fault is Fault.RESET or (fault is Fault.RESET_ONCE and proxy._claim_reset_once()):
                        cut = max(1, len(data) // 2) if len(data) > 1 else 0
                        if cut:
                            dst.sendall(data[:cut])
                            # Let the partial reply reach the client's parser
                            # before the RST discards the rest.
                            time.sleep(_POLL)
                        proxy._count("reset")
                        self.close(reset=True)
                        return
                    elif fault is Fault.DROP:
                        proxy._count("dropped")
                        self.close()
                        return
                    elif fault is Fault.BLACKHOLE:
                        self.poisoned = True
                        continue  # swallowed
                dst.sendall(data)
                proxy._count("bytes_down" if reply else "bytes_up", len(data))
        except OSError:
            self.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that injects `Fault`s between a client and `upstream`."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 port: int = 0, connect_timeout: float = 1.0) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("host: the fault proxy listens on loopback only")
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._requested_port = port
        self.connect_timeout = connect_timeout
        self.fault = Fault.PASS
        self.latency_seconds = 0.0
        self.jitter_seconds = 0.0
        self._listener: Optional[socket.socket] = None
        self._links: List[_Link] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._acceptor: Optional[threading.Thread] = None
        self._stats: Dict[str, int] = {}
        self.swallow_marker: Optional[bytes] = None
        self.request_delay = 0.0
        self.port = 0

    def __repr__(self) -> str:
        return f"FaultProxy({self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]}, fault={self.fault.value})"

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(128)
        listener.settimeout(_POLL * 5)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._stopped.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join the acceptor."""
        self._stopped.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.close_all()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, db: int = 0, *, scheme: str = "redis", username: Optional[str] = None,
            password: Optional[str] = None) -> str:
        """A Redis URL that goes through the proxy."""
        auth = ""
        if password is not None:
            auth = f"{username or ''}:{password}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{db}"

    # -- faults ------------------------------------------------------------------
    def set_fault(self, fault: Fault | str, *, latency: float = 0.0, jitter: float = 0.0) -> None:
        """Switch to `fault` now (open connections included)."""
        fault = Fault(fault)
        self.latency_seconds = float(latency)
        self.jitter_seconds = float(jitter)
        self.fault = fault
        self._count(f"fault_{fault.value}")
        if fault is Fault.DROP:
            self.close_all()

    def pass_through(self) -> None:
        self.set_fault(Fault.PASS)

    def add_latency(self, seconds: float, jitter: float = 0.0) -> None:
        self.set_fault(Fault.LATENCY, latency=seconds, jitter=jitter)

    def drop(self) -> None:
        self.set_fault(Fault.DROP)

    def blackhole(self) -> None:
        self.set_fault(Fault.BLACKHOLE)

    def delay_requests(self, seconds: float) -> None:
        """Hold every chunk a client sends `seconds` before passing it on (0: off), whatever the
        fault in force: a write reaches the server that much later than the client sent it."""
        self.request_delay = float(seconds)

    def swallow_requests(self, marker: Optional[bytes]) -> None:
        """A connection that sends a request containing `marker` (say ``b"SUBSCRIBE"``) from now
        on is never answered again: that request and all after it, both ways, are read and
        dropped, as on a path that drops one flow; other connections pass (their handshakes
        too). None stops marking connections; those marked stay so until closed."""
        self.swallow_marker = marker

    def reset_mid_reply(self) -> None:
        self.set_fault(Fault.RESET)

    def reset_next_reply(self) -> None:
        """Cut the next reply (from any connection) mid-way, then pass traffic again."""
        self.set_fault(Fault.RESET_ONCE)

    def _claim_reset_once(self) -> bool:
        with self._lock:
            if self.fault is not Fault.RESET_ONCE:
                return False
            self.fault = Fault.PASS
            return True

    @contextlib.contextmanager
    def injected(self, fault: Fault | str, *, latency: float = 0.0, jitter: float = 0.0) -> Iterator[FaultProxy]:
        """``with proxy.injected("blackhole"): ...`` — the fault for the block, then pass."""
        self.set_fault(fault, latency=latency, jitter=jitter)
        try:
            yield self
        finally:
            self.pass_through()

    # -- introspection -------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        with self._lock:
            return len(self._links)

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: accepted, dropped, reset, blackholed, bytes_up/down, fault_<name>."""
        with self._lock:
            return dict(self._stats)

    def close_all(self) -> None:
        """Close every proxied connection (FIN on both sides)."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    # -- internals -----------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] = self._stats.get(name, 0) + n

    def _forget(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._count("accepted")
            fault = self.fault
            if fault is Fault.DROP:
                self._count("dropped")
                client.close()
                continue
            upstream: Optional[socket.socket] = None
            if fault is Fault.BLACKHOLE:
                self._count("blackholed")
            else:
                try:
                    upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
                    upstream.settimeout(None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    self._count("upstream_refused")
                    client.close()
                    continue
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.append(link)
            link.start()
