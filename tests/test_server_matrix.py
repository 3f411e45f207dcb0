"""The suite runs on Redis and on Valkey: `MCP_REDIS_SERVER_BINARIES` picks the binaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mcp_redis.testing import RedisServer, free_port, redis_binary


def _executable(path: Path) -> str:
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_directory_of_valkey_binaries_serves_the_redis_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = _executable(tmp_path / "valkey-server")
    cli = _executable(tmp_path / "valkey-cli")
    monkeypatch.setenv("MCP_REDIS_SERVER_BINARIES", str(tmp_path))
    assert redis_binary() == server
    assert redis_binary("redis-cli") == cli
    assert redis_binary("redis-benchmark") is None


def test_unset_means_the_redis_binaries_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _executable(tmp_path / "redis-server")
    _executable(tmp_path / "valkey-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MCP_REDIS_SERVER_BINARIES", raising=False)
    assert redis_binary() == str(tmp_path / "redis-server")
    monkeypatch.setenv("MCP_REDIS_SERVER_BINARIES", "valkey")
    assert redis_binary() == str(tmp_path / "valkey-server")


def test_a_misspelled_choice_is_an_error_not_the_default_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_REDIS_SERVER_BINARIES", "valky")
    with pytest.raises(FileNotFoundError, match="MCP_REDIS_SERVER_BINARIES='valky'"):
        redis_binary()


def test_a_server_that_refuses_its_arguments_fails_at_once_with_its_log(redis_server: RedisServer) -> None:
    bad = RedisServer(args=["--no-such-directive", "1"])
    try:
        with pytest.raises(RuntimeError, match="exited at start"):
            bad.start(timeout=60)  # a crash is reported when seen, not after the timeout
    finally:
        bad.cleanup()
    assert os.path.isdir(bad.directory) is False


def test_free_port_never_hands_out_a_port_twice_in_a_row_of_calls() -> None:
    """A cluster picks its dozen ports before any node binds one: the kernel's bind(0) handed
    two nodes the same port once in CI (about 130 repeats in 2,000 bare calls here)."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
