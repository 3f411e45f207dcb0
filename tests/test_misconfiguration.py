"""Misconfiguration is an error, not an outage (issue 19).

One real server per error class: a password-protected server (wrong
password), an ACL user lacking a command (``NOPERM``), a DB index the server
does not have, a replica (``READONLY``), a key of another type under the
prefix (``WRONGTYPE``) and a command the server does not know (renamed away,
as on an older server). Each raises its `ConfigurationError` subclass at the
call site, naming the variable to fix; none trips the breaker (its threshold
is 1 here, so a single counted failure would open it), none is retried, none
falls back; and the background listener logs it once, not once per retry.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Callable, Dict

import pytest

import mcp_redis
from mcp_redis.connections import get_redis
from mcp_redis.metrics import METRICS
from mcp_redis.pubsub import Subscriber
from mcp_redis.resilience import BreakerState
from mcp_redis.testing import RedisServer, wait_for
from mcp_redis.testing.faultproxy import FaultProxy

# One counted failure would open the breaker; rate limits would fall back to local.
STRICT: Dict[str, Any] = dict(breaker_failure_threshold=1, retry_attempts=3, socket_timeout=2.0)
PASSWORD = "right-pw-9d2e"


def take_lock() -> None:
    with mcp_redis.agent_lock("agent-1", blocking_timeout=0):
        pass


def hit_rate_limit() -> None:
    mcp_redis.RateLimiter("misconf", 5, 60).hit("agent-1")


def assert_refused_as(kind: type, variable: str, *calls: Callable[[], None]) -> None:
    """Every call raises `kind` naming `variable`; no breaker trip, no retry, no fallback."""
    for call in calls:
        for _ in range(2):  # the second call would meet an open breaker if the first tripped it
            with pytest.raises(kind) as info:
                call()
            assert isinstance(info.value, mcp_redis.ConfigurationError)
            assert variable in str(info.value)
            assert info.value.variable == variable
    conn = get_redis()
    assert conn.policy.breaker.state is BreakerState.CLOSED
    assert METRICS.counter("backend_failures_total", backend="redis") == 0
    assert METRICS.counter("backend_retries_total", backend="redis") == 0
    assert METRICS.counter("breaker_rejections_total", backend="redis") == 0
    assert METRICS.counter("ratelimit_fallback_total", backend="redis", to="local") == 0
    assert METRICS.counter("configuration_errors_total", backend="redis") >= 2 * len(calls)


def test_wrong_password_is_authentication_failed_naming_redis_url(redis_factory: Any) -> None:
    server = redis_factory(password=PASSWORD)
    mcp_redis.configure(redis_url=f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0", **STRICT)
    assert_refused_as(mcp_redis.AuthenticationFailed, "REDIS_URL", take_lock, hit_rate_limit)


def test_missing_password_is_authentication_failed(redis_factory: Any) -> None:
    server = redis_factory(password=PASSWORD)
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{server.port}/0", **STRICT)
    assert_refused_as(mcp_redis.AuthenticationFailed, "REDIS_URL", take_lock)


def test_acl_user_lacking_a_command_is_permission_denied(redis_factory: Any) -> None:
    server = redis_factory()
    server.client().execute_command("ACL", "SETUSER", "limited", "on", ">limited-pw", "~mcp:*", "&mcp:*",
                                    "+@all", "-evalsha", "-eval")
    mcp_redis.configure(redis_url=f"redis://limited:limited-pw@127.0.0.1:{server.port}/0", **STRICT)
    assert_refused_as(mcp_redis.PermissionDenied, "REDIS_URL", take_lock, hit_rate_limit)


def test_database_index_the_server_lacks_is_bad_database_index(redis_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{redis_server.port}/99", **STRICT)
    assert_refused_as(mcp_redis.BadDatabaseIndex, "REDIS_URL", take_lock, hit_rate_limit)


def test_a_sentinel_url_listing_a_data_node_is_a_configuration_error(redis_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=f"redis+sentinel://127.0.0.1:{redis_server.port}/mymaster", **STRICT)
    assert_refused_as(mcp_redis.ConfigurationError, "REDIS_URL", take_lock, hit_rate_limit)
    with pytest.raises(mcp_redis.ConfigurationError, match="not Sentinels"):
        take_lock()


def test_a_sentinel_url_naming_a_service_no_sentinel_monitors_is_a_configuration_error(
        sentinel_topology: Any) -> None:
    url = sentinel_topology.url.rsplit("/", 1)[0] + "/no-such-service"
    mcp_redis.configure(redis_url=url, **STRICT)
    assert_refused_as(mcp_redis.ConfigurationError, "REDIS_URL", take_lock, hit_rate_limit)
    with pytest.raises(mcp_redis.ConfigurationError, match=f"monitor: '{sentinel_topology.service}'"):
        take_lock()
    # A data node listed among them answers too ("unknown command"): still the URL to fix.
    data_node = sentinel_topology.nodes[0]
    mcp_redis.configure(redis_url=url.replace("/no-such-service", f",127.0.0.1:{data_node.port}/no-such-service"),
                        **STRICT)
    with pytest.raises(mcp_redis.ConfigurationError, match="1 of its servers are not Sentinels"):
        take_lock()


def test_sentinels_refusing_the_sentinel_password_is_authentication_failed(redis_server: RedisServer) -> None:
    """A wrong or missing MCP_REDIS_SENTINEL_PASSWORD used to be an outage (MasterNotFoundError,
    the breaker tripped, limits fell back), never naming the variable to fix."""
    from mcp_redis.testing.topology import SentinelServer

    config = f"port 0\nsentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    with SentinelServer(config, password="sentinel-pw-4b1c") as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        for password in ("wrong-pw", None):
            mcp_redis.configure(redis_url=url, sentinel_password=password, **STRICT)
            assert_refused_as(mcp_redis.AuthenticationFailed, "MCP_REDIS_SENTINEL_PASSWORD", take_lock,
                              hit_rate_limit)
        with pytest.raises(mcp_redis.AuthenticationFailed) as info:
            take_lock()
        assert "wrong-pw" not in str(info.value) and "sentinel-pw-4b1c" not in str(info.value)
        mcp_redis.configure(redis_url=url, sentinel_password="sentinel-pw-4b1c", **STRICT)
        take_lock()  # the right one works


def test_a_cluster_url_at_a_server_without_cluster_mode_is_a_configuration_error(redis_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=f"redis+cluster://127.0.0.1:{redis_server.port}", **STRICT)
    assert_refused_as(mcp_redis.ConfigurationError, "REDIS_URL", take_lock, hit_rate_limit)
    with pytest.raises(mcp_redis.ConfigurationError, match="not in cluster mode"):
        take_lock()
    assert mcp_redis.health()["redis"]["error"].startswith("ConfigurationError: REDIS_URL: ")


def test_a_cluster_user_refused_cluster_slots_is_permission_denied_not_an_outage(cluster_topology: Any) -> None:
    """redis-py words any refusal of CLUSTER SLOTS as "cluster mode is not enabled": the
    server's own reply (NOPERM) is what names the fix."""
    nodes = [*cluster_topology.masters, *cluster_topology.replicas]
    for node in nodes:
        node.client().execute_command("ACL", "SETUSER", "noslots", "on", ">noslots-pw", "~*", "&*", "+@all",
                                      "-cluster|slots")
    try:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in cluster_topology.masters)
        mcp_redis.configure(redis_url=f"redis+cluster://noslots:noslots-pw@{hosts}", **STRICT)
        assert_refused_as(mcp_redis.PermissionDenied, "REDIS_URL", take_lock)
    finally:
        mcp_redis.reset(configuration=True)
        for node in nodes:
            node.client().execute_command("ACL", "DELUSER", "noslots")


def test_replica_url_is_read_only_server(redis_factory: Any) -> None:
    master = redis_factory()
    replica = redis_factory(args=["--replicaof", "127.0.0.1", str(master.port)])
    wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up",
             what="the replica to sync")
    mcp_redis.configure(redis_url=replica.url, **STRICT)
    assert_refused_as(mcp_redis.ReadOnlyServer, "REDIS_URL", take_lock, hit_rate_limit)


def test_a_master_demoted_behind_its_address_is_left_for_the_new_master(redis_factory: Any) -> None:
    # A plain URL to a name that follows failovers (a managed service's primary
    # endpoint; here a proxy switched to the promoted replica): pooled sockets
    # still reach the demoted master and get READONLY. Each feature's next call
    # must run on a fresh socket, at the new master, not fail as a
    # misconfiguration; and the refused try must not count as one that ran.
    old = redis_factory()
    new = redis_factory(args=["--replicaof", "127.0.0.1", str(old.port)])
    wait_for(lambda: new.client().info("replication")["master_link_status"] == "up", what="the replica to sync")
    with FaultProxy("127.0.0.1", old.port) as endpoint:
        mcp_redis.configure(redis_url=endpoint.url(), **STRICT)
        store = mcp_redis.SessionStore()
        store.bind("s-1", "agent-1")
        hit_rate_limit()
        lock_client = mcp_redis.Client(redis_url=endpoint.url(), **STRICT)  # its own pool, also on the old master
        new.client().execute_command("REPLICAOF", "NO", "ONE")
        # A grant the failover loses (made on the old master after the
        # promotion), and another process holding the lock on the new one.
        held = mcp_redis.lock("job", timeout=30, client=lock_client)
        assert held.acquire(blocking=False)
        other = mcp_redis.Client(redis_url=new.url)
        assert mcp_redis.lock("job", timeout=30, client=other).acquire(blocking=False)
        old.client().execute_command("REPLICAOF", "127.0.0.1", str(new.port))
        endpoint.upstream = ("127.0.0.1", new.port)
        # The release's refused first try (READONLY) is no lost reply: the
        # holder is told it lost the lock, not that it released it.
        with pytest.raises(mcp_redis.LockNotOwned):
            held.release()
        # Rate limits and sessions call the policy directly: they recover too.
        hit_rate_limit()
        store.bind("s-2", "agent-2")
        assert store.get("s-2") == "agent-2"
        take_lock()
        other.close()
        lock_client.close()
    assert get_redis().policy.breaker.state is BreakerState.CLOSED


def test_foreign_key_under_the_prefix_is_wrong_key_type(redis_url: str, redis_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=redis_url, **STRICT)
    take_lock()
    hit_rate_limit()
    admin = redis_server.client()
    # the lock's key (free again) and the limiter's log
    keys = ["mcp:agent-lock:{agent-1}", *admin.scan_iter("mcp:ratelimit:{misconf:agent-1}*")]
    assert len(keys) == 2 and not admin.exists(keys[0])
    for key in keys:  # something else now writes hashes where the library keeps its state
        admin.delete(key)
        admin.hset(key, "foreign", "1")
        admin.expire(key, 60)
    assert_refused_as(mcp_redis.WrongKeyType, "MCP_REDIS_KEY_PREFIX", take_lock, hit_rate_limit)
    assert admin.hgetall(keys[0]) == {"foreign": "1"}, "the lock wrote nothing over it"


def test_command_the_server_lacks_is_unsupported_server(redis_factory: Any) -> None:
    server = redis_factory(args=["--rename-command", "EVALSHA", ""])  # as a server without it
    mcp_redis.configure(redis_url=server.url, **STRICT)
    with pytest.raises(mcp_redis.UnsupportedServer) as info:
        take_lock()
    assert "Redis 7.0" in str(info.value)
    assert_refused_as(mcp_redis.UnsupportedServer, "REDIS_URL", take_lock, hit_rate_limit)


def test_transient_fault_stays_on_the_resilience_path(redis_factory: Any) -> None:
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, **STRICT)
    server.stop()
    with pytest.raises(mcp_redis.BackendUnavailable) as info:
        take_lock()
    assert not isinstance(info.value, mcp_redis.ConfigurationError)
    assert get_redis().policy.breaker.state is not BreakerState.CLOSED


def test_invalidation_listener_logs_a_bad_database_index_once_while_it_retries(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    from mcp_redis.cache import invalidation
    from mcp_redis.client import default_client

    caplog.set_level(logging.DEBUG, logger="mcp_redis")
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{redis_server.port}/99")
    admin = redis_server.client()

    def connections() -> int:
        return int(admin.info("stats")["total_connections_received"])

    before = connections()
    listener = invalidation.of(default_client())
    listener.listen("mcp:misconf-invalidation")
    # Three reconnection attempts (max_backoff apart: a few seconds) ...
    wait_for(lambda: connections() >= before + 4, timeout=30, what="three retries of the listener")
    sub = listener.subscriber
    assert sub is not None and not sub.active
    assert isinstance(sub.misconfigured, mcp_redis.BadDatabaseIndex)
    # ... and one log line, naming the variable, without a traceback.
    records = [r for r in caplog.records if r.name == "mcp_redis.pubsub" and r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "REDIS_URL" in records[0].getMessage()
    assert records[0].exc_info is None
    assert METRICS.counter("pubsub_reconnects_total") == 0


def test_subscribing_under_a_wrong_password_raises_authentication_failed_not_unavailable(redis_factory: Any) -> None:
    server = redis_factory(password=PASSWORD)
    mcp_redis.configure(redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0")
    sub = Subscriber(lambda channel, data: None, channels=["mcp:misconf"], max_backoff=0.05)
    with pytest.raises(mcp_redis.AuthenticationFailed):
        sub.start(wait=True, timeout=30)
    assert not sub.alive or not sub.active


# -- settings read from the environment name the variable ------------------------------------


def test_fractional_session_ttl_names_the_variable_and_wants_whole_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SESSION_TTL", "1.5")
    with pytest.raises(mcp_redis.ConfigurationError) as info:
        mcp_redis.settings()
    assert str(info.value) == "REDIS_SESSION_TTL must be a whole number of seconds, got '1.5'"
    assert info.value.variable == "REDIS_SESSION_TTL"


def test_out_of_range_lock_timeout_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_LOCK_TIMEOUT", "-1")
    with pytest.raises(mcp_redis.ConfigurationError) as info:
        mcp_redis.settings()
    assert str(info.value).startswith("REDIS_LOCK_TIMEOUT (lock_timeout, seconds): ")
    assert info.value.variable == "REDIS_LOCK_TIMEOUT"


def test_bad_backend_switch_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_REDIS_LOCKS_BACKEND", "memcached")
    with pytest.raises(mcp_redis.ConfigurationError, match=r"^MCP_REDIS_LOCKS_BACKEND \(locks\): must be one of"):
        mcp_redis.settings()


def test_misspelled_variable_warns_once_naming_the_closest_known_one(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcp_redis.config")
    monkeypatch.setenv("MCP_REDIS_LOCK_BACKEND", "local")  # the real one is MCP_REDIS_LOCKS_BACKEND
    for _ in range(3):
        mcp_redis.reset()
        mcp_redis.settings()
    warnings = [r.getMessage() for r in caplog.records if "MCP_REDIS_LOCK_BACKEND" in r.getMessage()]
    assert len(warnings) == 1
    assert "did you mean MCP_REDIS_LOCKS_BACKEND?" in warnings[0]


# -- health and stats say when nothing is shared ----------------------------------------------


def test_health_and_stats_in_local_mode_say_nothing_is_shared() -> None:
    for report in (mcp_redis.health(), mcp_redis.stats()):
        assert report["shared"] is False
        assert any(w.startswith("REDIS_URL is not set: local mode, nothing is shared") for w in report["warnings"])
    assert mcp_redis.health()["ok"] is True  # not an outage: nothing is down


def test_health_names_a_feature_switched_off_or_kept_local(redis_mode: str) -> None:
    mcp_redis.configure(locks="off", rate_limits="local")
    report = mcp_redis.health()
    assert report["shared"] is True
    assert "locks is off (MCP_REDIS_LOCKS_BACKEND=off): calls to it raise FeatureDisabled" in report["warnings"]
    assert any(w.startswith("rate_limits is local (MCP_REDIS_RATE_LIMITS_BACKEND=local)") for w in report["warnings"])
    assert not any(w.startswith("REDIS_URL") for w in report["warnings"])


def test_cli_health_prints_the_local_mode_warning() -> None:
    from tests.test_cli import run_cli

    out = run_cli("health", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["shared"] is False and report["warnings"][0].startswith("REDIS_URL is not set")


def test_cli_sessions_cleanup_without_database_url_says_so_instead_of_removing_nothing() -> None:
    from tests.test_cli import run_cli

    out = run_cli("sessions", "cleanup")
    assert out.returncode == 2
    assert "DATABASE_URL is not set" in out.stderr
    assert "removed" not in out.stdout


# -- PostgreSQL refusals are configuration errors too ----------------------------------------


def test_unknown_postgres_role_is_authentication_failed_naming_database_url(pg_database: Any) -> None:
    url = f"postgresql://no_such_role_{uuid.uuid4().hex[:8]}@127.0.0.1:5432/{pg_database.name}"
    mcp_redis.configure(database_url=url, rate_limits="postgres", **STRICT)
    for _ in range(2):
        with pytest.raises(mcp_redis.AuthenticationFailed, match="^DATABASE_URL: PostgreSQL refused"):
            mcp_redis.RateLimiter("misconf", 5, 60).hit("agent-1")
    from mcp_redis.postgres import get_postgres

    assert get_postgres().policy.breaker.state is BreakerState.CLOSED
    assert METRICS.counter("backend_failures_total", backend="postgres") == 0


def test_postgres_user_without_privileges_is_permission_denied(pg_database: Any) -> None:
    import psycopg2

    role = f"mcp_noperm_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN")  # may connect; may neither create nor write tables
        mcp_redis.configure(database_url=f"postgresql://{role}@127.0.0.1:5432/{pg_database.name}",
                            rate_limits="postgres", **STRICT)
        with pytest.raises(mcp_redis.PermissionDenied, match="^DATABASE_URL: .* may not create it: run `mcp-redis "
                           "migrate` once as the schema's owner"):
            mcp_redis.RateLimiter("misconf", 5, 60).hit("agent-1")
        from mcp_redis.postgres import get_postgres

        assert get_postgres().policy.breaker.state is BreakerState.CLOSED
    finally:
        mcp_redis.reset(configuration=True)
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def test_health_names_the_fix_for_a_wrong_password(redis_factory: Any) -> None:
    server = redis_factory(password=PASSWORD)
    mcp_redis.configure(redis_url=f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0")
    report = mcp_redis.health()
    assert report["ok"] is False
    assert report["redis"]["error"].startswith("AuthenticationFailed: REDIS_URL: the Redis server refused")
    assert PASSWORD not in repr(report)


def test_lock_watchdog_logs_a_refused_renewal_once_until_the_lease_ends(
        redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_redis")
    server = redis_factory()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "holder", "on", ">holder-pw", "~mcp:*", "&mcp:*", "+@all")
    mcp_redis.configure(redis_url=f"redis://holder:holder-pw@127.0.0.1:{server.port}/0")
    with pytest.raises(mcp_redis.PermissionDenied):  # leaving the block: the release is refused too
        with mcp_redis.agent_lock("agent-1", timeout=1.5, blocking_timeout=0) as held:
            admin.execute_command("ACL", "SETUSER", "holder", "-evalsha", "-eval")  # renewals now refused
            assert held.lost_event.wait(30), "the lease should run out"
    records = [r for r in caplog.records if r.name == "mcp_redis.locks" and r.levelno >= logging.ERROR]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "REDIS_URL" in records[0].getMessage() and records[0].exc_info is None


def test_stream_consumer_logs_a_refused_read_once_while_it_retries(
        redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_redis")
    server = redis_factory()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw", "~mcp:*", "&mcp:*", "+@all", "-xreadgroup")
    mcp_redis.configure(redis_url=f"redis://reader:reader-pw@127.0.0.1:{server.port}/0")
    stream = mcp_redis.EventStream("misconf", group="g", consumer="c")

    def refusals() -> int:
        return sum(int(e["count"]) for e in admin.execute_command("ACL", "LOG") if e["object"] == "xreadgroup")

    consumer = stream.run_in_thread(lambda event: None, block_ms=100)
    try:
        wait_for(lambda: refusals() >= 3, timeout=30, what="three refused reads")
    finally:
        consumer.close()
    records = [r for r in caplog.records if r.name == "mcp_redis.events" and r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "PermissionDenied" not in records[0].getMessage() and "REDIS_URL" in records[0].getMessage()
    assert records[0].exc_info is None


def test_session_replayer_logs_a_refused_replay_once_while_it_retries(
        redis_factory: Any, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcp_redis")
    server = redis_factory()
    mcp_redis.configure(redis_url=server.url, database_url=database_url)
    store = mcp_redis.SessionStore()
    store.bind("warm-up", "agent-0")
    server.stop()
    store.bind("while-down", "agent-1", ttl=600)  # PostgreSQL takes it; the replayer starts
    server.password = PASSWORD  # back, but now asking for a password REDIS_URL lacks
    server.start()
    admin = server.client()

    def connections() -> int:
        return int(admin.info("stats")["total_connections_received"])

    before = connections()
    wait_for(lambda: connections() >= before + 3, timeout=30, what="three replay attempts")
    records = [r for r in caplog.records if r.name == "mcp_redis.sessions" and r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "REDIS_URL" in records[0].getMessage() and records[0].exc_info is None


@pytest.mark.parametrize("url", ["redis+sentinel://127.0.0.1:26379", "redis+cluster://h:notaport"])
def test_a_malformed_redis_url_names_the_variable(url: str) -> None:
    from mcp_redis.connections import build_client

    with pytest.raises(mcp_redis.ConfigurationError, match=r"^REDIS_URL \(redis_url\): "):
        build_client(mcp_redis.Settings(redis_url=url))
