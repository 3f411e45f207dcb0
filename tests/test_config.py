"""Configuration: environment, configure() overrides, switches, redaction."""

from __future__ import annotations

import logging

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
    ],
)
def test_passwords_are_redacted_everywhere(url: str, caplog: pytest.LogCaptureFixture) -> None:
    assert "s3cr3t-pw" not in redact_url(url)
    with caplog.at_level(logging.DEBUG, logger="mcp_redis"):
        if "://" in url and url.startswith("redis"):
            s = Settings(redis_url=url)
        else:
            s = Settings(database_url=url)
        assert "s3cr3t-pw" not in repr(s) and "s3cr3t-pw" not in str(s)
    assert "s3cr3t-pw" not in caplog.text


def test_unsupported_scheme_error_does_not_leak_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        mcp_redis.configure(redis_url="http://u:s3cr3t-pw@host/")
    assert "s3cr3t-pw" not in str(info.value)
