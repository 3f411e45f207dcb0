"""Configuration: environment, configure() overrides, switches, redaction."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

import mcp_redis
from mcp_redis.config import LockFallback, Mode, Settings, redact_url, settings
from mcp_redis.errors import ConfigurationError


def test_defaults_without_environment_are_local_mode() -> None:
    s = settings()
    assert s.redis_url is None and s.local_mode
    assert (s.session_ttl, s.metadata_ttl, s.lock_timeout, s.rate_limit_window) == (3600, 300, 30.0, 3600.0)
    assert s.key_prefix == "mcp:"
    assert {s.mode(f) for f in ("sessions", "locks", "rate_limits", "metadata_cache")} == {Mode.LOCAL}


def test_environment_is_read_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("REDIS_SESSION_TTL", "60")
    monkeypatch.setenv("MCP_REDIS_KEY_PREFIX", "svc:")
    monkeypatch.setenv("MCP_REDIS_LOCKS_BACKEND", "local")
    mcp_redis.reset()
    s = settings()
    assert s.session_ttl == 60 and s.key_prefix == "svc:"
    assert s.mode("sessions") is Mode.REDIS  # REDIS_URL set: redis unless switched
    assert s.mode("locks") is Mode.LOCAL


def test_configure_overrides_environment_and_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SESSION_TTL", "60")
    monkeypatch.setenv("REDIS_METADATA_TTL", "77")
    mcp_redis.configure(session_ttl=10, lock_fallback="postgres", database_url="postgresql://127.0.0.1/x")
    s = settings()
    assert s.session_ttl == 10 and s.metadata_ttl == 77
    assert s.lock_fallback is LockFallback.POSTGRES


def test_bad_configure_changes_nothing() -> None:
    before = mcp_redis.configure(session_ttl=10)
    for bad in ({"session_ttl": 0}, {"session_ttl": 10**12}, {"lock_timeout": 1e300},
                {"lock_fallback": "postgres"}, {"rate_limit_fallback": "postgres"}, {"session_ttl": "x"}, {"lock_timeout": float("nan")},
                {"locks": "sometimes"}, {"metadata_cache": "postgres"}, {"no_such_setting": 1},
                {"redis_url": "http://x"}, {"key_prefix": "a*"}):
        with pytest.raises(ConfigurationError):
            mcp_redis.configure(**bad)
    assert settings() == before


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_LOCK_TIMEOUT", "soon")
    mcp_redis.reset()
    with pytest.raises(ConfigurationError, match="REDIS_LOCK_TIMEOUT"):
        settings()


def test_redis_switch_without_url_and_postgres_without_dsn_are_errors() -> None:
    mcp_redis.configure(sessions="redis", rate_limits="postgres")
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        settings().mode("sessions")
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        settings().mode("rate_limits")


def test_configure_calls_add_up_and_reset_configuration_goes_back_to_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SESSION_TTL", "60")
    mcp_redis.configure(session_ttl=10)
    mcp_redis.configure(metadata_ttl=20)  # names another setting: session_ttl keeps 10
    assert (settings().session_ttl, settings().metadata_ttl) == (10, 20)
    mcp_redis.reset(configuration=True)
    assert settings().session_ttl == 60


def test_reset_configuration_forgets_overrides() -> None:
    mcp_redis.configure(session_ttl=5)
    mcp_redis.reset()
    assert settings().session_ttl == 5
    mcp_redis.reset(configuration=True)
    assert settings().session_ttl == 3600


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:s3cr3t-pw@127.0.0.1:6379/0",
        "rediss://:s3cr3t-pw@127.0.0.1:6380/0",
        "redis://s3cr3t-pw@127.0.0.1:6379",
        "redis+sentinel://:s3cr3t-pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0",
        "redis+cluster://u:s3cr3t-pw@127.0.0.1:7000,127.0.0.1:7001",
        "redis://127.0.0.1:6379/0?password=s3cr3t-pw",
        "postgresql://bob:s3cr3t-pw@127.0.0.1/db",
        "host=127.0.0.1 password=s3cr3t-pw dbname=db",
        "host=127.0.0.1 password='s3cr3t-pw' dbname=db",
        "host=127.0.0.1 password s3cr3t-pw dbname=db",
        "postgresql:/bob:s3cr3t-pw@127.0.0.1/db",
        "redis://127.0.0.1:6379/0?password=s3cr3t-pw@tail",  # '@' in the query, not a userinfo
        "redis://127.0.0.1:6379/0?password=ab@s3cr3t-pw:Tail99",
        "postgresql://bob@127.0.0.1:5432/db?password=s3cr3t-pw@x&bogus_option=1",
    ],
)
def test_passwords_are_redacted_everywhere(url: str, caplog: pytest.LogCaptureFixture) -> None:
    assert "s3cr3t-pw" not in redact_url(url)
    assert "127.0.0.1" in redact_url(url) or "127.0.0.1" not in url  # it still says which server
    with caplog.at_level(logging.DEBUG, logger="mcp_redis"):
        if "://" in url and url.startswith("redis"):
            s = Settings(redis_url=url)
        else:
            s = Settings(database_url=url)
        assert "s3cr3t-pw" not in repr(s) and "s3cr3t-pw" not in str(s)
    assert "s3cr3t-pw" not in caplog.text


@pytest.mark.parametrize("url, password, host", [
    ("unix:///tmp/x.sock?password=Ab@cdefgh", "Ab@cdefgh", "/tmp/x.sock"),
    ("redis://127.0.0.1:1/0?password=Ab@cdefgh&", "Ab@cdefgh", "127.0.0.1:1"),
    ("postgresql:///db?host=/var/run/postgresql&password=Ab@cdefgh", "Ab@cdefgh", "/var/run/postgresql"),
    ("postgresql://127.0.0.1/db?password=Ab@cdefgh&", "Ab@cdefgh", "127.0.0.1"),
    ("postgresql://127.0.0.1:1/db?password=Ab#cdefgh", "Ab#cdefgh", "127.0.0.1:1"),  # libpq keeps the '#'
    ("host=127.0.0.1 port=1 dbname=db password=Ab\\ cdefgh", "Ab cdefgh", "127.0.0.1"),  # a libpq escape
    ("redis://user:?client_name=Tr0ub4dor3@redis.example.com:6379/0", "?client_name=Tr0ub4dor3",
     "redis.example.com:6379"),
    ("redis://:pa/ssword@h.example:1/0", "pa/ssword", "h.example:1"),
    ("redis://:e@redis.example.com:6379/0", "e", "redis.example.com:6379"),  # short: masked in place
    ("redis://:1@10.0.0.1:6379/0", "1", "10.0.0.1:6379"),
    # a fifth review's: masking by position alone missed a password cut short in these
    ("unix://:S3cretPass/word@/tmp/redis.sock", "S3cretPass/word", "/tmp/redis.sock"),
    ("redis://:Pa@ssw0rd#1@redis.example.com:6379/0", "Pa@ssw0rd#1", "redis.example.com:6379"),
    ("redis://Tr0ub4dor#3@redis.example.com:6379/0", "Tr0ub4dor#3", "redis.example.com:6379"),
    ("redis://Tr0ub4dor?x=3@redis.example.com:6379/0", "Tr0ub4dor?x=3", "redis.example.com:6379"),
    ("postgresql://app:2024?k=Tr0ub4dor@db.example.com/app", "2024?k=Tr0ub4dor", "db.example.com"),
    ("host=127.0.0.1 password=Secret1234 dbname=db application_name=http://svc", "Secret1234", "127.0.0.1"),
    ("host=127.0.0.1 password=Sec://ret1234 dbname=db", "Sec://ret1234", "127.0.0.1"),
    ("valkey://S3cretPass@cache.example.com:6379/0", "S3cretPass", "cache.example.com"),
    ("redis://:pa/ss@host.example:6379/0#Secret1234", "Secret1234", "host.example:6379"),
    ("unix:///run/redis@main/redis.sock?password=longsecret", "longsecret", "/run/redis@main/redis.sock"),
])
def test_redaction_masks_the_password_where_its_parsers_read_it_and_keeps_the_host(
        url: str, password: str, host: str) -> None:
    """A second review's misses: a query password holding '@' or '#' (libpq keeps '#'), a query
    after no host or with a trailing '&', a libpq escape, a userinfo password that looks like a
    query, a short password that garbled the host (scrubbed out of every word)."""
    shown = redact_url(url)
    assert host in shown, shown
    if len(password) < 4:  # too short to search for: masked where it stands, the host intact
        assert f":***@{host}" in shown, shown
        return
    pieces = [password, *(p for p in re.split(r"[/?#@:% ]", password) if len(p) >= 4)]
    assert not [p for p in pieces if p in shown.replace(host, "")], shown


@pytest.mark.parametrize("url", ["http://u:s3cr3t-pw@host/", "redis:/:s3cr3t-pw@10.0.0.5:6379/0",
                                 "redis:s3cr3t-pw@10.0.0.5", "redis//:s3cr3t-pw@10.0.0.5", "//:s3cr3t-pw@10.0.0.5"])
def test_unsupported_scheme_error_does_not_leak_the_password(url: str) -> None:
    """A mistyped "://" used to be taken for a key/value DSN and quoted whole."""
    with pytest.raises(ConfigurationError) as info:
        mcp_redis.configure(redis_url=url)
    assert "s3cr3t-pw" not in str(info.value)
    assert url.startswith("http") or "10.0.0.5" in str(info.value)  # still says which URL
    assert "s3cr3t-pw" not in redact_url(url)


@pytest.mark.parametrize("url, words", [
    ("redis://127.0.0.1:65536/0", "bad host or port"),
    ("redis://127.0.0.1:abc/0", "bad host or port"),
    ("redis://127.0.0.1:0/0", "bad host"),
    ("redis://:pw-secret@/0", "bad host|no hosts|one host"),
    ("redis://:pw-secret@:/0", "bad host|no hosts|one host"),
    ("redis://", "no hosts|one host"),
    ("redis://h1:6379,h2:6379/0", "one host"),
    ("redis://:pw-secret@127.0.0.1:6379/0?db=5", "database twice"),
    ("redis://127.0.0.1:6379/0?foo=bar", "query option 'foo'"),
    ("redis://127.0.0.1:6379/0?ssl_cert_reqs=none", "query option 'ssl_cert_reqs'"),
    ("redis://127.0.0.1:6379/0?protocol=3", "query option 'protocol'"),
    ("redis://127.0.0.1:6379?db=1&db=2", "given twice"),
    ("redis://127.0.0.1:6379/0?socket_timeout=-1", "socket_timeout"),
    ("redis://127.0.0.1:6379/0?socket_timeout=nan", "socket_timeout"),
    ("redis://127.0.0.1:6379/0?socket_timeout=100000", "socket_timeout"),
    ("redis://127.0.0.1:6379/0?max_connections=0", "max_connections"),
    ("unix://?db=0", "socket path"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/notanumber", "must be a number"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/0?socket_timeout=1", "query option 'socket_timeout'"),
    ("redis+cluster://127.0.0.1:99999", "bad host"),
    # a second review: what configure() still let through
    ("redis://127.0.0.1:6379/99999999999999999999", "the database"),
    ("redis://127.0.0.1:6379/\u00b2", "the database"),  # '²' passes str.isdigit(), not int()
    ("redis://127.0.0.1:6379/0?max_connections=1000000000000", "max_connections"),
    ("redis://127.0.0.1:6379/0?health_check_interval=1.5", "health_check_interval"),
    ("redis://127.0.0.1:+6379/0", "bad host or port"),
    ("redis://127.0.0.1: 6379/0", "bad host or port"),
    ("redis://[::1/0", "can be read"),
    ("redis://\ud800:6379/0", "bad host or port"),
    ("redis://:pw-secret/more@127.0.0.1:6379/0", "bad host or port"),  # an unencoded '/' cuts the host
    ("redis+sentinel://127.0.0.1:26379/mymaster/1?db=2", "database twice"),
    ("redis+cluster://127.0.0.1:7000/0?db=3", "only database 0"),
    ("redis+cluster://127.0.0.1:7000/1", "only database 0"),
    ("redis+sentinel://127.0.0.1:26379", "the path is /<service>"),
    ("redis://127.0.0.1:1:6379/0", "bad host or port"),
    ("redis+sentinel://[::1]x:7000/mymaster", "bad host or port"),
])
def test_a_redis_url_that_could_never_work_is_refused_by_configure_and_changes_nothing(url: str, words: str) -> None:
    """Each of these used to be accepted, then failed on every call (raw TypeError/ValueError,
    an outage, or a silent localhost:6379 / database 5)."""
    before = mcp_redis.settings()
    with pytest.raises(ConfigurationError, match=rf"REDIS_URL \(redis_url\): .*({words})") as info:
        mcp_redis.configure(redis_url=url)
    assert "pw-secret" not in str(info.value)
    assert mcp_redis.settings() == before
    for fine in ("redis://127.0.0.1:6379/3?socket_timeout=1.5&health_check_interval=0&client_name=x",
                 "unix:///run/redis.sock?db=2", "redis://127.0.0.1:6379?db=2&password=pw-secret",
                 "redis+sentinel://127.0.0.1:26379/mymaster/1", "redis+cluster://[::1]:7000,127.0.0.1",
                 "redis://127.0.0.1:6379/?db=", "unix:///run/redis.sock?db=", "redis://127.0.0.1:6379/0?db=",
                 "redis://127.0.0.1:6379/0?password=pw@secret&client_name=a@b", "redis+sentinel://h:26379/mymaster/",
                 "redis://:pw%2Fsecret@[::1]:6379/0"):
        mcp_redis.configure(redis_url=fine)


def test_pool_sizes_are_bounded() -> None:
    """max_connections=10**12 was accepted, and the first call hung filling the pool's queue."""
    for name in ("max_connections", "postgres_max_connections"):
        with pytest.raises(ConfigurationError, match=f"{name}: at most 10,000"):
            mcp_redis.configure(**{name: 10**12})
    mcp_redis.configure(max_connections=10_000)


def test_a_nopermission_inside_a_master_not_found_error_is_not_the_urls_user() -> None:
    """MasterNotFoundError lists each Sentinel's words: a NOPERM there is the Sentinel user's
    (one Sentinel down, one refusing: an outage, retried), not a PermissionDenied naming REDIS_URL."""
    from redis.sentinel import MasterNotFoundError

    from mcp_redis.resilience import redis_misconfiguration

    error = MasterNotFoundError("No master found for 'm' : <sentinel> - NoPermissionError: NOPERM User x has no "
                                "permissions to run the 'sentinel|masters' command")
    assert redis_misconfiguration(error) is None


def test_tls_verification_is_off_only_by_the_word_none_and_tls_files_must_exist(tmp_path: Any) -> None:
    """ssl_cert_reqs=None or 0 used to turn verification off silently; a bad value or a
    missing file failed on the first call (a raw error, or an outage)."""
    before = mcp_redis.settings()
    for bad in (None, 0, False, "bogus", ""):
        with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
            mcp_redis.configure(ssl_cert_reqs=bad)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        for bad in (123, "", str(tmp_path / "missing.pem")):
            with pytest.raises(ConfigurationError, match=name):
                mcp_redis.configure(**{name: bad})
    assert mcp_redis.settings() == before
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    mcp_redis.configure(ssl_cert_reqs="NONE", ssl_ca_certs=str(ca))
    assert mcp_redis.settings().ssl_cert_reqs == "none"
    import ssl

    mcp_redis.configure(ssl_cert_reqs=ssl.CERT_REQUIRED)
    assert mcp_redis.settings().ssl_cert_reqs == "required"


@pytest.mark.parametrize("path", ["/abc", "/1x", "/0/1"])
def test_a_database_that_is_not_a_number_is_refused_and_changes_nothing(path: str) -> None:
    # redis-py reads "/abc" as database 0: the library would have written there.
    before = mcp_redis.settings()
    with pytest.raises(ConfigurationError, match=r"REDIS_URL \(redis_url\): the database") as info:
        mcp_redis.configure(redis_url=f"redis://:pw-secret@127.0.0.1:6379{path}")
    assert "pw-secret" not in str(info.value)
    with pytest.raises(ConfigurationError, match=r"MCP_REDIS_EVENTS_URL \(events_url\)"):
        mcp_redis.configure(events_url=f"redis://127.0.0.1:6379{path}")
    assert mcp_redis.settings() == before
    mcp_redis.configure(redis_url="redis://127.0.0.1:6379/3?socket_timeout=1")  # a number, and a query: fine


def test_errors_of_a_features_own_url_name_its_variable(redis_factory: Any) -> None:
    from mcp_redis.connections import get_redis

    server = redis_factory(password="the-right-one")
    mcp_redis.configure(redis_url=f"redis://:the-right-one@127.0.0.1:{server.port}/0",
                        events_url=f"redis://:wrong@127.0.0.1:{server.port}/0", retry_attempts=1)
    with pytest.raises(ConfigurationError, match="MCP_REDIS_EVENTS_URL: the Redis server refused") as info:
        mcp_redis.EventBus().publish("c", {"a": 1})
    assert info.value.variable == "MCP_REDIS_EVENTS_URL"
    conn = get_redis()
    assert conn.call(conn.client.ping) is True  # REDIS_URL itself is fine
    with pytest.raises(ConfigurationError, match=r"MCP_REDIS_CACHE_URL \(cache_url\): a bad host or port"):
        mcp_redis.configure(cache_url="redis://127.0.0.1:99999/0")


def test_a_lock_dir_that_is_no_path_is_refused_and_one_that_cannot_be_used_names_it(tmp_path: Any) -> None:
    before = mcp_redis.settings()
    for bad in ("", "x\x00y"):
        with pytest.raises(ConfigurationError, match="MCP_REDIS_LOCK_DIR"):
            mcp_redis.configure(lock_dir=bad)
    assert mcp_redis.settings() == before
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    mcp_redis.configure(locks="local", lock_dir=str(blocker / "locks"))
    with pytest.raises(ConfigurationError, match="MCP_REDIS_LOCK_DIR") as info:
        with mcp_redis.agent_lock("a1"):
            pass
    assert info.value.variable == "MCP_REDIS_LOCK_DIR"
