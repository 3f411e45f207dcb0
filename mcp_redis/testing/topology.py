"""Real multi-node Redis topologies on loopback, for tests and benchmarks.

`SentinelTopology` is one master, its replicas and three Sentinels
(``redis-server --sentinel``) tuned to fail over within a few seconds;
`ClusterTopology` is a Redis Cluster of three masters (with replicas) made by
``redis-cli --cluster create``. Both are context managers built on
`mcp_redis.testing.RedisServer`: every process runs on a free 127.0.0.1 port
in a temporary directory that is removed on exit, and each topology's ``url``
is what `mcp_redis.configure(redis_url=...)` takes.

They also hold the faults the library must survive: `SentinelTopology.kill_master`
and `wait_for_failover` (then `heal` to get back to full strength), and
`ClusterTopology.migrate_slot` / `SlotMigration` to move a hash slot between
masters step by step, so that clients see ASK and MOVED redirections.

Test tooling, over the 500-line guideline: the two topologies share their
process handling and are read together when a topology test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from redis.crc import key_slot as _key_slot

from .servers import RedisServer, free_port, redis_binary, wait_for

if TYPE_CHECKING:
    from .tls import Pki

__all__ = [
    "SentinelServer",
    "SentinelTopology",
    "ClusterTopology",
    "SlotMigration",
    "key_slot",
    "CLUSTER_SLOTS",
]

CLUSTER_SLOTS = 16384
# Replicas sync at once (the default waits 5 s for more replicas to share a
# diskless transfer), which is what makes a topology start in seconds.
_DATA_NODE_ARGS = ("--repl-diskless-sync-delay", "0")
Address = Tuple[str, int]


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of `key` (honours ``{hash tags}``)."""
    return int(_key_slot(key.encode("utf-8", "surrogatepass")))


def _admin(server: RedisServer, timeout: float = 2.0) -> Any:
    """A short-timeout plain client for administrative commands."""
    return server.client(socket_timeout=timeout, socket_connect_timeout=timeout)


def _command(server: RedisServer, *args: Any, timeout: float = 2.0) -> Any:
    """One command on a fresh short-timeout connection (closed after)."""
    client = _admin(server, timeout)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _info(server: RedisServer, section: str) -> Dict[str, Any]:
    client = _admin(server)
    try:
        return dict(client.info(section))
    finally:
        client.close()


class SentinelServer(RedisServer):
    """A redis-server in Sentinel mode.

    Sentinel needs a writable configuration file (it records what it learns
    there), and redis-server only reads a file named as its first argument.
    """

    def __init__(self, config: str, port: Optional[int] = None, *, directory: Optional[str] = None,
                 password: Optional[str] = None, tls: Optional[Pki] = None) -> None:
        super().__init__(port, directory=directory, password=password, tls=tls)
        self.config_file = os.path.join(self.directory, "sentinel.conf")
        with open(self.config_file, "w", encoding="utf-8") as f:
            f.write(config)

    def __repr__(self) -> str:
        return f"SentinelServer(port={self.port}, running={self.running})"

    def command_line(self) -> List[str]:
        base = super().command_line()
        return [base[0], self.config_file, *base[1:], "--sentinel"]


class SentinelTopology:
    """One master, `replicas` replicas and `sentinels` Sentinels on loopback.

    ``down_after_ms`` and ``failover_timeout_ms`` are short so a killed master
    is replaced within a few seconds. Use as a context manager::

        with SentinelTopology() as topo:
            mcp_redis.configure(redis_url=topo.url)
            old = topo.kill_master()
            new = topo.wait_for_failover(old)
            topo.heal()          # restart `old` as a replica of `new`

    ``password`` is the data nodes' (``requirepass``, ``masterauth``, Sentinel
    ``auth-pass``), ``sentinel_password`` the Sentinels' own (``requirepass``,
    ``sentinel-pass`` between them). With ``tls=`` (a
    `mcp_redis.testing.tls.Pki`) every process serves TLS only, replication
    and Sentinel links included, and `url` is ``rediss+sentinel://``.
    """

    def __init__(
        self,
        service: str = "mymaster",
        *,
        replicas: int = 2,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 4000,
        password: Optional[str] = None,
        sentinel_password: Optional[str] = None,
        tls: Optional[Pki] = None,
    ) -> None:
        if redis_binary() is None:
            raise FileNotFoundError("redis-server not found on PATH")
        if not 1 <= quorum <= sentinels:
            raise ValueError(f"quorum: must be between 1 and sentinels ({sentinels}), got {quorum}")
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.directory = tempfile.mkdtemp(prefix="mcp_redis_sentinel_")
        self.nodes: List[RedisServer] = [
            RedisServer(directory=self._subdir(f"node{i}"), password=password, args=_DATA_NODE_ARGS, tls=tls)
            for i in range(1 + replicas)
        ]
        self._initial_master = self.nodes[0]
        for node in self.nodes[1:]:
            node.args = self._replica_args(self._initial_master)
        self.sentinels: List[SentinelServer] = []
        self._sentinel_count = sentinels

    def __repr__(self) -> str:
        return f"SentinelTopology(service={self.service!r}, nodes={self.nodes}, sentinels={self.sentinels})"

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:p1,...,127.0.0.1:pN/<service>`` (``rediss+`` with TLS)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{self.service}"

    @property
    def sentinel_addresses(self) -> List[Address]:
        return [("127.0.0.1", s.port) for s in self.sentinels]

    def master_address(self) -> Address:
        """The master's address as the first answering Sentinel reports it."""
        errors: List[str] = []
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = _admin(sentinel)
            try:
                host, port = client.sentinel_get_master_addr_by_name(self.service)
                return str(host), int(port)
            except Exception as exc:
                errors.append(f"{sentinel.port}: {exc!r}")
            finally:
                client.close()
        raise RuntimeError(f"no Sentinel names a master for {self.service!r}: {errors}")

    @property
    def master(self) -> RedisServer:
        """The data node the Sentinels currently name as master."""
        return self._node_at(self.master_address())

    @property
    def replicas(self) -> List[RedisServer]:
        """The running data nodes that are not the master."""
        master = self.master
        return [n for n in self.nodes if n is not master and n.running]

    def _node_at(self, address: Address) -> RedisServer:
        for node in self.nodes:
            if node.port == address[1]:
                return node
        raise RuntimeError(f"Sentinels name {address} as master, which is not one of ours")

    def _subdir(self, name: str) -> str:
        path = os.path.join(self.directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _replica_args(self, master: RedisServer) -> List[str]:
        args = [*_DATA_NODE_ARGS, "--replicaof", "127.0.0.1", str(master.port)]
        if self.password:
            args += ["--masterauth", self.password]
        return args

    def _sentinel_config(self) -> str:
        s = self.service
        lines = [
            "sentinel resolve-hostnames no",
            f"sentinel monitor {s} 127.0.0.1 {self._initial_master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {s} {self.down_after_ms}",
            f"sentinel failover-timeout {s} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {s} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {s} {self.password}")
        if self.sentinel_password:
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
        return "\n".join(lines) + "\n"

    # -- life cycle ------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> SentinelTopology:
        """Start the data nodes, wait for replication, then the Sentinels (once per topology)."""
        _check_startable(self, bool(self.sentinels))
        try:
            for node in self.nodes:
                node.start()
            self._wait_replicas_online(self._initial_master, len(self.nodes) - 1, timeout)
            config = self._sentinel_config()
            self.sentinels = [
                SentinelServer(config, directory=self._subdir(f"sentinel{i}"), password=self.sentinel_password,
                               tls=self.tls)
                for i in range(self._sentinel_count)
            ]
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_until_healthy(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _wait_replicas_online(self, master: RedisServer, count: int, timeout: float) -> None:
        def online() -> bool:
            info = _info(master, "replication")
            if info.get("role") != "master":
                return False
            states = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return sum(1 for v in states if v.get("state") == "online") >= count

        wait_for(online, timeout, interval=0.05, what=f"{count} replicas online on port {master.port}")

    def healthy(self) -> bool:
        """Every process runs, and every Sentinel sees the master, all replicas and its peers."""
        return self.problem() is None

    def problem(self) -> Optional[str]:
        """Why the topology is not at full strength (None when it is)."""
        if not self.sentinels:
            return "not started"
        down = [str(x.port) for x in [*self.nodes, *self.sentinels] if not x.running]
        if down:
            return f"not running: {', '.join(down)}"
        try:
            for sentinel in self.sentinels:
                problem = self._sentinel_problem(sentinel)
                if problem:
                    return f"sentinel {sentinel.port}: {problem}"
            return self._replication_problem()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def _sentinel_problem(self, sentinel: SentinelServer) -> Optional[str]:
        """Could this Sentinel fail over right now? (It sees its peers and good replicas.)

        A replica is good when Sentinel's link to it is up and its last INFO
        says it replicates from the master (what ``SENTINEL FAILOVER`` needs
        to find a candidate rather than answer NOGOODSLAVE).
        """
        client = _admin(sentinel)
        try:
            state = client.sentinel_master(self.service)
            replicas = client.sentinel_slaves(self.service)
        finally:
            client.close()
        flags = str(state.get("flags", ""))
        if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown") or "failover" in flags:
            return f"master flags {flags}"
        if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
            return f"sees {state.get('num-other-sentinels')} other sentinels"
        master_port = int(state.get("port", 0))
        if master_port != self.master_address()[1]:
            return f"names master {master_port}, another sentinel {self.master_address()[1]}"
        bad = [
            f"{r.get('port')}({r.get('flags')}, link {r.get('master-link-status')}, of {r.get('master-port')})"
            for r in replicas
            if r.get("is_sdown") or r.get("is_odown") or r.get("is_disconnected")
            or r.get("master-link-status") != "ok"
            or int(r.get("master-port", 0)) != master_port
        ]
        if len(replicas) - len(bad) < len(self.nodes) - 1:
            return f"replicas not ready: {bad or 'none known'}"
        return None

    def _replication_problem(self) -> Optional[str]:
        master = self.master
        info = _info(master, "replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"]
        if info.get("role") != "master" or len(online) < len(self.nodes) - 1:
            return f"master {master.port}: role {info.get('role')}, {len(online)} replicas online"
        return None

    def wait_until_healthy(self, timeout: float = 30.0) -> None:
        """Wait for `healthy`; the timeout error says what was still wrong."""
        try:
            wait_for(self.healthy, timeout, interval=0.1, what="a healthy Sentinel topology")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.problem()}") from None

    # -- faults ----------------------------------------------------------------
    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (a crash: nothing is flushed); returns it."""
        master = self.master
        master.kill()
        return master

    def wait_for_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until every running Sentinel names a new, writable master; return it."""

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                if not sentinel.running:
                    continue
                client = _admin(sentinel)
                try:
                    ports.add(int(client.sentinel_get_master_addr_by_name(self.service)[1]))
                finally:
                    client.close()
            if len(ports) != 1 or old.port in ports:
                return False
            node = self._node_at(("127.0.0.1", ports.pop()))
            return _info(node, "replication").get("role") == "master"

        wait_for(promoted, timeout, interval=0.05, what=f"Sentinels to replace the master on port {old.port}")
        return self.master

    @contextlib.contextmanager
    def replication_cut(self) -> Iterator[RedisServer]:
        """Cut every replica off from the master for the block; yields the master.

        Writes the master acknowledges inside the block reach no replica, so a
        failover before the block ends loses them: the asynchronous-replication
        window, made deterministic. (Replicas get a wrong ``masterauth``, so the
        master refuses their resync; a SIGSTOP would not do: the kernel still
        buffers the replication stream for them.) ``WAIT`` on the master returns
        0 inside the block.
        """
        master = self.master
        replicas = [n for n in self.nodes if n is not master and n.running]
        for replica in replicas:
            _command(replica, "CONFIG", "SET", "masterauth", "mcp-redis-replication-cut")
        try:
            _command(master, "CLIENT", "KILL", "TYPE", "replica")
            wait_for(
                lambda: all(_info(r, "replication").get("master_link_status") == "down" for r in replicas)
                and int(_info(master, "replication").get("connected_slaves", 0)) == 0,
                10,
                what="replicas to lose their link to the master",
            )
            yield master
        finally:
            for replica in replicas:
                if replica.running:
                    _command(replica, "CONFIG", "SET", "masterauth", self.password or "")

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """A graceful, forced failover (``SENTINEL FAILOVER``); returns the new master."""
        old = self.master
        sentinel = next(s for s in self.sentinels if s.running)

        def started() -> bool:
            # NOGOODSLAVE / INPROG while Sentinel's view is catching up: ask again.
            _command(sentinel, "SENTINEL", "FAILOVER", self.service)
            return True

        wait_for(started, timeout, interval=0.1, what=f"Sentinel on port {sentinel.port} to accept FAILOVER")
        return self.wait_for_failover(old, timeout)

    def heal(self, timeout: float = 30.0) -> None:
        """Restart every stopped process (old masters as replicas of the current one).

        An old master still running as a master (after a graceful failover) is
        restarted as a replica at once: Sentinel converts it only after ~8 s,
        and a ``REPLICAOF`` sent to it live is seen by the Sentinels only at
        their next 10 s ``INFO`` of it (a restarted node is asked at once).
        """
        for sentinel in self.sentinels:
            if not sentinel.running:
                sentinel.start()
        master = self.master
        if not master.running:  # killed, and not failed over yet
            master = self.wait_for_failover(master, timeout)
        for node in self.nodes:
            if node.running and node is not master and _info(node, "replication").get("role") == "master":
                node.kill()  # a demoted master that Sentinel has not converted yet
            if not node.running:
                node.args = self._replica_args(master)
                node.start()
        try:
            self.wait_until_healthy(min(timeout, 3.0))
        except TimeoutError:
            # A Sentinel's view of a running replica can lag by its 10 s INFO period (seen to
            # last 20 s after a failover); a restarted replica is asked at once.
            master = self.master
            for node in self.nodes:
                if node is not master and node.running:
                    node.kill()
                    node.args = self._replica_args(master)
                    node.start()
            self.wait_until_healthy(timeout)

    def flushall(self) -> None:
        """Empty the dataset (on the master; the replicas follow)."""
        client = _admin(self.master)
        try:
            client.flushall()
        finally:
            client.close()

    def client(self, **kwargs: Any) -> Any:
        """A plain client to the current master."""
        return self.master.client(**kwargs)

    def cleanup(self) -> None:
        """Kill every process and remove the directory."""
        for server in [*self.sentinels, *self.nodes]:
            server.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    stop = cleanup

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


def _check_startable(topology: Any, started: bool) -> None:
    """A topology starts once: a second start would leak (Sentinel) or wreck (Cluster) the first."""
    if started or not os.path.isdir(topology.directory):
        raise RuntimeError(f"{type(topology).__name__}.start(): already started or cleaned up; "
                           "build a new topology")


class ClusterTopology:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback.

    Made with ``redis-cli --cluster create ... --cluster-yes``; ready when
    every node reports ``cluster_state:ok`` and agrees on the slot map::

        with ClusterTopology() as cluster:
            mcp_redis.configure(redis_url=cluster.url)
            cluster.migrate_slot(key_slot("{agent:1}"))   # clients see ASK then MOVED

    With ``tls=`` (a `mcp_redis.testing.tls.Pki`) every node serves TLS only
    (``tls-cluster`` and ``tls-replication`` too) and `url` is ``rediss+cluster://``.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 2000,
        password: Optional[str] = None,
        tls: Optional[Pki] = None,
    ) -> None:
        if redis_binary() is None or redis_binary("redis-cli") is None:
            raise FileNotFoundError("redis-server and redis-cli must be on PATH")
        if masters < 3:
            raise ValueError(f"masters: Redis Cluster needs at least 3, got {masters}")
        self.masters_count = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.tls = tls
        self.directory = tempfile.mkdtemp(prefix="mcp_redis_cluster_")
        self.nodes: List[RedisServer] = []
        for i in range(masters * (1 + replicas)):
            directory = os.path.join(self.directory, f"node{i}")
            os.makedirs(directory)
            args = [
                *_DATA_NODE_ARGS,
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # An explicit bus port: port+10000 can overflow from the ephemeral range.
                "--cluster-port", str(free_port()),
            ]
            if password:
                args += ["--masterauth", password]
            if tls:
                args += ["--tls-cluster", "yes"]
            self.nodes.append(RedisServer(directory=directory, args=args, password=password, tls=tls))
        self._migrations: List[SlotMigration] = []
        self._started = False

    def __repr__(self) -> str:
        return f"ClusterTopology(nodes={self.nodes})"

    @property
    def url(self) -> str:
        """``redis+cluster://[:password@]127.0.0.1:p1,...`` naming every node (``rediss+`` with TLS)."""
        auth = f":{self.password}@" if self.password else ""
        return ("rediss+cluster://" if self.tls else "redis+cluster://") + auth + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    # -- life cycle ------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> ClusterTopology:
        """Start the nodes, join them with ``redis-cli --cluster create``, wait for ok (once per topology)."""
        _check_startable(self, self._started)
        self._started = True
        try:
            for node in self.nodes:
                node.start()
            cmd = [str(redis_binary("redis-cli"))]
            if self.tls:
                cmd += ["--tls", "--cacert", self.tls.path("ca.crt"), "--cert", self.tls.path("client.crt"),
                        "--key", self.tls.path("client.key")]
            cmd += ["--cluster", "create"]
            cmd += [f"127.0.0.1:{n.port}" for n in self.nodes]
            cmd += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            env = dict(os.environ)
            if self.password:
                env["REDISCLI_AUTH"] = self.password  # not on the command line
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
            if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
                raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
            self.wait_until_healthy(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _cluster_view(self, node: RedisServer) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        client = _admin(node)
        try:
            # Two words, so that redis-py applies no reply parser: raw text.
            info = client.execute_command("CLUSTER", "INFO")
            raw = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        fields = dict(line.split(":", 1) for line in str(info).strip().splitlines() if ":" in line)
        return fields, _parse_nodes(str(raw))

    def healthy(self) -> bool:
        """All nodes up, ``cluster_state:ok``, one slot map, replicas in sync, no open migration."""
        return self.problem() is None

    def problem(self) -> Optional[str]:
        """Why the cluster is not healthy (None when it is)."""
        down = [str(n.port) for n in self.nodes if not n.running]
        if down:
            return f"not running: {', '.join(down)}"
        try:
            maps = set()
            for node in self.nodes:
                info, nodes = self._cluster_view(node)
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return f"node {node.port}: state {info.get('cluster_state')}, knows {info.get('cluster_known_nodes')}"
                odd = [f"{n['port']}({n['flags']})" for n in nodes if "fail" in n["flags"] or n["migrating"]]
                if odd:
                    return f"node {node.port} sees failing or migrating nodes: {odd}"
                maps.add(tuple(sorted((n["port"], tuple(n["slots"])) for n in nodes if "master" in n["flags"])))
                me = next(n for n in nodes if "myself" in n["flags"])
                if "slave" in me["flags"] and _info(node, "replication").get("master_link_status") != "up":
                    return f"replica {node.port}: link to its master down"
            if len(maps) != 1:
                return "nodes disagree on the slot map"
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def wait_until_healthy(self, timeout: float = 60.0) -> None:
        """Wait for `healthy`; the timeout error says what was still wrong."""
        try:
            wait_for(self.healthy, timeout, interval=0.1, what="a healthy Redis Cluster")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self.problem()}") from None

    # -- the slot map ----------------------------------------------------------
    def _view(self) -> List[Dict[str, Any]]:
        errors: List[str] = []
        for node in self.nodes:
            if node.running:
                try:
                    return self._cluster_view(node)[1]
                except Exception as exc:
                    errors.append(f"{node.port}: {exc!r}")
        raise RuntimeError(f"no cluster node answers: {errors}")

    def _server(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise RuntimeError(f"no node of ours on port {port}")

    @property
    def masters(self) -> List[RedisServer]:
        return [self._server(n["port"]) for n in self._view() if "master" in n["flags"] and "fail" not in n["flags"]]

    @property
    def replicas(self) -> List[RedisServer]:
        return [self._server(n["port"]) for n in self._view() if "slave" in n["flags"]]

    def node_id(self, server: RedisServer) -> str:
        client = _admin(server)
        try:
            return str(client.execute_command("CLUSTER MYID"))
        finally:
            client.close()

    def owner(self, slot: int) -> RedisServer:
        """The master serving `slot` (as the first answering node sees it)."""
        for n in self._view():
            if "master" in n["flags"] and any(lo <= slot <= hi for lo, hi in n["slots"]):
                return self._server(n["port"])
        raise RuntimeError(f"slot {slot} is not served")

    def owner_of(self, key: str) -> RedisServer:
        return self.owner(key_slot(key))

    # -- faults ----------------------------------------------------------------
    def kill_master(self, slot: int) -> RedisServer:
        """SIGKILL the master serving `slot`; its replica takes over after ``node_timeout_ms``."""
        master = self.owner(slot)
        master.kill()
        return master

    def wait_for_failover(self, old: RedisServer, slot: int, timeout: float = 60.0) -> RedisServer:
        """Wait until every running node says a live replica of `old` now serves `slot`; return it."""

        def promoted() -> bool:
            owners: Set[int] = set()
            for node in self.nodes:
                if not node.running:
                    continue
                info, nodes = self._cluster_view(node)
                if info.get("cluster_state") != "ok":
                    return False
                owners.update(n["port"] for n in nodes
                              if "master" in n["flags"] and any(lo <= slot <= hi for lo, hi in n["slots"]))
            return len(owners) == 1 and old.port not in owners and self._server(owners.pop()).running

        wait_for(promoted, timeout, interval=0.05, what=f"a replica to replace the master on port {old.port}")
        return self.owner(slot)

    def migrate_slot(
        self,
        slot: int,
        target: Optional[RedisServer] = None,
        *,
        batch: int = 10,
        between_batches: Optional[Callable[[int], None]] = None,
    ) -> RedisServer:
        """Move `slot` to `target` (default: the next master), keys in batches.

        ``between_batches(moved_so_far)`` runs after each batch, while the slot
        is half-moved (clients get ASK); afterwards they get MOVED once.
        """
        migration = SlotMigration(self, slot, target)
        migration.begin()
        while True:
            moved = migration.move_keys(batch)
            if between_batches is not None:
                between_batches(migration.moved)
            if moved == 0:
                break
        migration.finish()
        return migration.target

    def abort_migrations(self) -> None:
        """Put every half-moved slot back to a stable state."""
        for migration in list(self._migrations):
            migration.abort()

    def flushall(self) -> None:
        """Empty every master (the replicas follow)."""
        for master in self.masters:
            client = _admin(master)
            try:
                client.flushall()
            finally:
                client.close()

    def heal(self, timeout: float = 60.0) -> None:
        """Restart stopped nodes (they rejoin from nodes.conf), close migrations, wait for ok."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.abort_migrations()
        self.wait_until_healthy(timeout)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    stop = cleanup

    def __enter__(self) -> ClusterTopology:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class SlotMigration:
    """One slot moving between masters, step by step (what ``redis-cli --cluster reshard`` does).

    `begin` marks the slot IMPORTING on the target and MIGRATING on the
    source (from then on, a key missing on the source gets ``-ASK``);
    `move_keys` MIGRATEs a batch of keys; `finish` assigns the slot to the
    target everywhere (the source then answers ``-MOVED``).
    """

    def __init__(self, cluster: ClusterTopology, slot: int, target: Optional[RedisServer] = None) -> None:
        if not 0 <= slot < CLUSTER_SLOTS:
            raise ValueError(f"slot: must be in [0, {CLUSTER_SLOTS}), got {slot}")
        self.cluster = cluster
        self.slot = slot
        self.source = cluster.owner(slot)
        masters = cluster.masters
        if target is None:
            target = masters[(masters.index(self.source) + 1) % len(masters)]
        if target is self.source or target not in masters:
            raise ValueError(f"target: must be another master than the source {self.source}")
        self.target = target
        self.source_id = cluster.node_id(self.source)
        self.target_id = cluster.node_id(target)
        self.moved = 0
        self.state = "new"

    def __repr__(self) -> str:
        return f"SlotMigration(slot={self.slot}, {self.source.port}->{self.target.port}, {self.state}, moved={self.moved})"

    def _run(self, server: RedisServer, *args: Any) -> Any:
        return _command(server, *args, timeout=5.0)

    def begin(self) -> None:
        self._run(self.target, "CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        self._run(self.source, "CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)
        self.state = "migrating"
        self.cluster._migrations.append(self)

    def move_keys(self, count: int = 10) -> int:
        """MIGRATE up to `count` keys of the slot; returns how many moved (0: none left)."""
        keys: Sequence[str] = self._run(self.source, "CLUSTER", "GETKEYSINSLOT", self.slot, count)
        if not keys:
            return 0
        args: List[Any] = ["MIGRATE", "127.0.0.1", self.target.port, "", 0, 5000]
        if self.cluster.password:
            args += ["AUTH", self.cluster.password]
        self._run(self.source, *args, "KEYS", *keys)
        self.moved += len(keys)
        return len(keys)

    def finish(self, timeout: float = 30.0) -> None:
        """Give the slot to the target on every master, and wait until all nodes agree."""
        while self.move_keys(100):
            pass
        # The target first, so that the source's MOVED never points at a node
        # that still thinks the slot belongs elsewhere.
        self._run(self.target, "CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        self._run(self.source, "CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        for master in self.cluster.masters:
            if master is not self.source and master is not self.target:
                self._run(master, "CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
        self.state = "done"
        self._forget()
        wait_for(self._agreed, timeout, interval=0.05, what=f"every node to see slot {self.slot} on port {self.target.port}")

    def abort(self) -> None:
        """Leave the slot with its source (keys already moved stay on the target, unreachable)."""
        for server in (self.source, self.target):
            if server.running:
                self._run(server, "CLUSTER", "SETSLOT", self.slot, "STABLE")
        self.state = "aborted"
        self._forget()

    def _forget(self) -> None:
        if self in self.cluster._migrations:
            self.cluster._migrations.remove(self)

    def _agreed(self) -> bool:
        for node in self.cluster.nodes:
            if not node.running:
                continue
            _, nodes = self.cluster._cluster_view(node)
            owners = [n["port"] for n in nodes if "master" in n["flags"] and any(lo <= self.slot <= hi for lo, hi in n["slots"])]
            if owners != [self.target.port]:
                return False
        return True


def _parse_nodes(raw: str) -> List[Dict[str, Any]]:
    """``CLUSTER NODES`` text as a list of {id, port, flags, master, slots, migrating}."""
    out: List[Dict[str, Any]] = []
    for line in raw.strip().splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        addr = parts[1].split("@", 1)[0]
        slots: List[Tuple[int, int]] = []
        migrating = False
        for item in parts[8:]:
            if item.startswith("["):
                migrating = True
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        out.append({
            "id": parts[0],
            "port": int(addr.rsplit(":", 1)[1]),
            "flags": parts[2],
            "master": parts[3],
            "slots": slots,
            "migrating": migrating,
        })
    return out

