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

import dataclasses
import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .config import Settings, redact_url
from .errors import ConfigurationError
from .resilience import CircuitBreaker, Resilience, redis_misconfiguration
from .scripts import ScriptSet

__all__ = [
    "RedisConnection",
    "get_redis",
    "connect",
    "redis_available",
    "build_client",
    "parse_host_list",
    "on_fork",
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
    # (sha, *keys) -> the packed start of an EVALSHA command: see run_script
    _heads: Dict[Tuple[Any, ...], bytes] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"RedisConnection(kind={self.kind!r}, url={self.url!r}, policy={self.policy!r})"

    @property
    def is_cluster(self) -> bool:
        return self.kind == "cluster"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` under the retry/breaker policy."""
        return self.policy.call(fn, *args, **kwargs)

    def script(self, name: str) -> Any:
        """The script ``mcp_redis/lua/<name>.lua`` registered on this client (once)."""
        return self.scripts.get(self.client, name)

    def misconfiguration(self, exc: BaseException) -> Optional[ConfigurationError]:
        """The `ConfigurationError` a redis-py error from this client stands for, or None.

        The policy applies it to every call; background threads (which read
        outside the policy) use it to tell misconfiguration from an outage.
        """
        return redis_misconfiguration(exc, follows_failover=self.kind != "single")

    def run_script(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script (``client.register_script``) in one round trip.

        The hot path of locks and rate limits. On a single server or a
        Sentinel master it writes ``EVALSHA`` on a connection borrowed from
        redis-py's pool and reads the reply with redis-py's parser, skipping
        only the client's per-command wrapper: its retry is off here anyway
        (see the module doc), and its OpenTelemetry bookkeeping costs about
        10 us a call, a tenth of a loopback round trip. The command's start
        (sha and keys) is packed once per key set: redis-py's packer does
        Python work per argument. The connection still health-checks, reconnects,
        and drops its socket on any error before it goes back to the pool.
        A cluster (routed by key) and a ``NOSCRIPT`` reply (a restarted or
        failed-over server) take redis-py's ``Script`` path, which loads the
        script and runs it.
        """
        if not self.is_cluster:
            pool = self.client.connection_pool
            connection = pool.get_connection()
            try:
                connection.send_packed_command([self._pack_evalsha(connection.encoder, script.sha, keys, args)])
                return connection.read_response()
            except NoScriptError:
                pass
            finally:
                pool.release(connection)
        return script(keys, args, self.client)

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
        """Close idle pooled sockets (used when the breaker opens)."""
        try:
            if self.is_cluster:
                self.client.disconnect_connection_pools()
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


_HEADS_MAX = 4096  # packed EVALSHA starts kept per client (cleared when full)


def _resp_bulk(encoder: Any, value: Any) -> bytes:
    """One argument as a RESP bulk string; ints and strs directly, the rest via redis-py's encoder."""
    if value.__class__ is str:
        data = value.encode(encoder.encoding, encoder.encoding_errors)
    elif value.__class__ is int:
        data = b"%d" % value
    else:
        data = encoder.encode(value)  # floats, bytes; rejects bools and None like redis-py
    return b"$%d\r\n%b\r\n" % (len(data), data)


class WatchedSentinelPool(SentinelConnectionPool):
    """A Sentinel pool whose daemon thread re-asks Sentinel for the master.

    redis-py asks Sentinel only when it opens a socket, and Sentinel demotes
    a live old master only ~8-10 s after a failover (graceful or partition):
    until then pooled sockets keep writing to it, and those writes vanish
    when it resyncs as a replica. Asking every `check_interval` seconds
    (off the callers' threads, so slow Sentinels never delay a call) closes
    idle sockets to the old master; busy ones are dropped when released.
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, check_interval: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.check_interval = check_interval
        self._watch_lock = threading.Lock()
        self._watch_pid = 0
        self._stop = threading.Event()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch_pid != os.getpid():
            self._start_watcher()
        return super().get_connection(*args, **kwargs)

    def _start_watcher(self) -> None:
        with self._watch_lock:
            if self._watch_pid == os.getpid():
                return
            self._watch_pid = os.getpid()
            self._stop = threading.Event()
            thread = threading.Thread(
                target=_watch_master,
                args=(weakref.ref(self), self._stop, self.check_interval),
                name="mcp_redis-sentinel-watch",
                daemon=True,
            )
            thread.start()

    def stop_watching(self) -> None:
        self._stop.set()


def _watch_master(ref: weakref.ref[WatchedSentinelPool], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        pool = ref()
        if pool is None:
            return
        try:
            pool.get_master_address()  # type: ignore[no-untyped-call]  # disconnects idle sockets if it moved
        except redis.exceptions.ConnectionError:
            pass  # no master known right now: the next connect() says so
        except Exception:  # pragma: no cover - never let the watcher die
            log.debug("sentinel watch failed", exc_info=True)
        del pool


def parse_host_list(netloc: str, default_port: int, argument: str = "REDIS_URL (redis_url)") -> List[Tuple[str, int]]:
    """``h1:1,h2:2`` (IPv6 in brackets) into ``[(host, port), ...]``."""
    hosts: List[Tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise ConfigurationError(f"{argument}: bad port in host {item!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigurationError(f"{argument}: bad host {item!r}")
        hosts.append((host, port))
    if not hosts:
        raise ConfigurationError(f"{argument}: no hosts given")
    return hosts


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
        "client_name": "mcp_redis",
    }


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
    return {**out, **_tls_kwargs(s, tls)}


def _warn_if_plaintext(s: Settings, scheme: str, shown: str) -> None:
    """TLS material configured for a URL that will not use it: say so rather than connect in silence."""
    if scheme in ("redis", "redis+cluster") and (s.ssl_ca_certs or s.ssl_certfile):
        log.warning("MCP_REDIS_SSL_* is set but %s connects in plaintext; use rediss://, rediss+sentinel:// "
                    "or rediss+cluster:// for TLS", shown)
    elif scheme == "redis+sentinel" and (s.ssl_ca_certs or s.ssl_certfile):
        log.warning("MCP_REDIS_SSL_* is set but the data nodes of %s are reached in plaintext%s; use "
                    "rediss+sentinel:// for TLS", shown, "" if s.sentinel_tls else " (and the Sentinels)")


def build_client(s: Settings, url: Optional[str] = None) -> Tuple[Any, str, Optional[Sentinel], Optional[str]]:
    """The redis-py client for `url` (default ``s.redis_url``): (client, kind, sentinel, service)."""
    url = s.redis_url if url is None else url
    if not url:
        raise ConfigurationError("REDIS_URL (redis_url): not set (local mode has no Redis client)")
    shown = redact_url(url)
    scheme = url.split("://", 1)[0].lower()
    common = _common_kwargs(s)
    _warn_if_plaintext(s, scheme, shown)
    try:
        if scheme in ("redis", "rediss", "unix"):
            extra = _ssl_kwargs(s) if scheme == "rediss" else {}
            if scheme == "unix":
                common.pop("socket_keepalive")  # TCP only
            pool = redis.BlockingConnectionPool.from_url(
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
                raise ConfigurationError(f"REDIS_URL (redis_url): {shown!r} needs a service name: {scheme}://h:26379/<service>[/<db>]")
            service = unquote(path[0])
            db = int(path[1]) if len(path) > 1 else int(query.get("db", 0))
            sentinels = parse_host_list(hosts_part, 26379)
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
            nodes = [ClusterNode(h, p) for h, p in parse_host_list(hosts_part, 6379)]  # type: ignore[no-untyped-call]
            client = RedisCluster(
                startup_nodes=nodes,
                username=user,
                password=password,
                max_connections=s.max_connections,
                require_full_coverage=True,
                **_cluster_kwargs(s, tls),
            )
            return client, "cluster", None, None
    except ConfigurationError:
        raise
    except (ValueError, TypeError) as exc:
        # redis-py's parse errors can quote the URL: never let it through.
        raise ConfigurationError(f"REDIS_URL (redis_url): cannot use {shown!r}: {type(exc).__name__}") from None
    raise ConfigurationError(f"REDIS_URL (redis_url): unsupported scheme in {shown!r}")


# -- building a connection ---------------------------------------------------------
def connect(s: Settings, url: Optional[str] = None, scripts: Optional[ScriptSet] = None) -> RedisConnection:
    """A new `RedisConnection` to `url` (default ``s.redis_url``) with its own policy.

    `mcp_redis.Client` builds one per distinct URL and owns it.
    """
    url = s.redis_url if url is None else url
    try:
        client, kind, sentinel, service = build_client(s, url)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        # RedisCluster connects eagerly; a down cluster must not escape
        # as a raw redis error.
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
    )
    conn = RedisConnection(client, policy, kind, redact_url(url or ""), s, sentinel, service,
                           scripts=scripts if scripts is not None else ScriptSet())
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
    _after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_at_fork_child)
