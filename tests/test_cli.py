"""The `mcp-redis` command end to end, in subprocesses (`python -m mcp_redis ...`).

Exit codes are what monitors and scripts rely on: 0 healthy, 1 a configured
backend is down (or a demo invariant broke), 2 usage/configuration errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

import psycopg2
import pytest

from mcp_redis.config import ENVIRONMENT_VARIABLES
from mcp_redis.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "cli-test-secret-pw"


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {var for var, _ in ENVIRONMENT_VARIABLES}}
    clean.update(env or {})
    clean["PYTHONPATH"] = ROOT + (os.pathsep + clean["PYTHONPATH"] if clean.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "mcp_redis", *args], capture_output=True, text=True,
                          env=clean, cwd=ROOT, timeout=timeout, check=False)


def test_health_exits_0_while_redis_answers_and_1_once_it_is_down(redis_factory) -> None:  # type: ignore[no-untyped-def]
    server = redis_factory(password=SECRET)
    env = {"REDIS_URL": server.url}

    up = run_cli("health", "--json", env=env)
    assert up.returncode == 0, up.stderr
    report = json.loads(up.stdout)
    assert report["ok"] is True and report["mode"] == "redis"
    assert report["redis"]["ok"] is True and report["redis"]["ping_ms"] >= 0
    assert set(report["redis"]["pool"]) >= {"in_use", "idle", "max"}
    assert report["postgres"] == {"configured": False}
    assert set(report["features"]) == {"sessions", "locks", "rate_limits", "metadata_cache", "events"}

    server.kill()
    down = run_cli("health", "--json", env=env)
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert report["ok"] is False and report["redis"]["ok"] is False and report["redis"]["error"]
    for out in (up, down):
        assert SECRET not in out.stdout + out.stderr


def test_health_text_output_and_local_mode_are_healthy() -> None:
    out = run_cli("health")
    assert out.returncode == 0, out.stderr
    assert "mode: local" in out.stdout


def test_stats_json_reports_redis_memory_and_keys_per_namespace_then_exits_1_when_down(redis_factory) -> None:  # type: ignore[no-untyped-def]
    server = redis_factory()
    raw = server.client()
    raw.mset({**{f"app1:sess:s{i}": "a" for i in range(7)}, "app1:lock:x": "t", "elsewhere:sess:y": "z"})
    env = {"REDIS_URL": server.url, "MCP_REDIS_KEY_PREFIX": "app1:"}

    up = run_cli("stats", "--json", env=env)
    assert up.returncode == 0, up.stderr
    report = json.loads(up.stdout)
    assert report["key_prefix"] == "app1:"
    assert report["redis"]["keys"] == {"lock": 1, "sess": 7}
    assert report["redis"]["keys_truncated"] is False
    assert report["redis"]["used_memory"] > 0
    assert report["redis"]["breaker"] == "closed"
    assert isinstance(report["process"]["pid"], int)
    assert "this CLI process" in report["note"]

    server.kill()
    down = run_cli("stats", "--json", env=env)
    assert down.returncode == 1
    assert json.loads(down.stdout)["redis"]["ok"] is False


def test_sessions_cleanup_and_migrate_report_json(database_url: str, pg_database: Any) -> None:
    env = {"DATABASE_URL": database_url, "MCP_REDIS_SESSIONS_BACKEND": "postgres"}
    migrated = run_cli("migrate", "--json", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert json.loads(migrated.stdout)["ok"] is True
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO mcp_redis.sessions (session_key, agent_id, expires_at, redis_pending) "
                    "VALUES ('old', 'agent'::bytea, now() - interval '1 second', false)")
    # Sessions in local mode (DATABASE_URL alone): it would clean nothing, so it says so (it used
    # to report ok, removed 0, over the expired row).
    for extra in ({}, {"MCP_REDIS_SESSIONS_BACKEND": "off"}):
        local = run_cli("sessions", "cleanup", "--json", env={"DATABASE_URL": database_url, **extra})
        assert local.returncode == 2 and "local mode" in local.stderr, (local.stdout, local.stderr)
    cleaned = run_cli("sessions", "cleanup", "--json", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    report = json.loads(cleaned.stdout)
    assert report == {"ok": True, "removed": 1}


def test_sessions_cleanup_exits_1_when_the_configured_redis_does_not_answer(database_url: str,
                                                                           pg_database: Any) -> None:
    """Write-through: cleanup asks Redis which expired rows it still serves; Redis down, it deletes nothing."""
    env = {"DATABASE_URL": database_url, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert run_cli("migrate", env=env).returncode == 0
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO mcp_redis.sessions (session_key, agent_id, expires_at, redis_pending) "
                    "VALUES ('old', 'agent'::bytea, now() - interval '1 second', false)")
    out = run_cli("sessions", "cleanup", env=env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "sessions cleanup" in out.stderr and out.stderr.count("\n") == 1
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM mcp_redis.sessions")
        assert cur.fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("stream,command,code", [
    ("stdout", "health", 1),  # Redis down
    ("stderr", "migrate", 2),  # no DATABASE_URL: said on stderr
    ("closed-stdout", "health", 1),
], ids=["stdout-reader-left", "stderr-reader-left", "stdout-closed"])
def test_a_command_exits_with_its_own_code_when_its_reader_has_left(stream: str, command: str, code: int) -> None:
    # `mcp-redis health | head -1` (and `demo 2>&1 | head -1`): the BrokenPipeError ended the
    # command with 0, a down Redis reported healthy; with fd 1 closed (`>&-`) every command
    # exited 2 with an AttributeError (reviewers).
    env = {k: v for k, v in os.environ.items() if k not in {var for var, _ in ENVIRONMENT_VARIABLES}}
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
               PYTHONPATH=ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left before anything is written
    outputs: Dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if stream == "closed-stdout":
        os.close(write_end)
        outputs["stdout"] = None
        command_line = ["bash", "-c", f'exec "$0" -m mcp_redis {command} >&-', sys.executable]
    else:
        outputs[stream] = write_end
        command_line = [sys.executable, "-m", "mcp_redis", command]
    try:
        done = subprocess.run(command_line, env=env, cwd=ROOT, timeout=60, check=False, **outputs)
    finally:
        if stream != "closed-stdout":
            os.close(write_end)
    assert done.returncode == code, done.stderr


def test_migrate_exits_1_not_2_when_postgres_is_down() -> None:
    """A backend down is 1 (retry later), as for `health` and `sessions cleanup`; 2 is for a fix."""
    env = {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"}
    out = run_cli("migrate", env=env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.startswith("mcp-redis migrate: ") and out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [("migrate",), ("demo", "--workers", "0"), ("no-such-command",), ("bench", "--only", "no_such_feature")],
)
def test_usage_and_configuration_errors_exit_2(args: tuple) -> None:  # type: ignore[type-arg]
    out = run_cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip()


def test_bench_is_a_repository_command_not_a_cli_subcommand() -> None:
    # The benchmarks import peer libraries and tests/ helpers, so they cannot run
    # from an installed package; the CLI does not offer them (python -m bench.run_all).
    out = run_cli("bench", "--only", "no_such_feature")
    assert out.returncode == 2
    assert "invalid choice: 'bench'" in out.stderr
    listed = run_cli("--help")
    assert listed.returncode == 0 and "bench" not in listed.stdout
    repo = subprocess.run([sys.executable, "-m", "bench.run_all", "--only", "no_such_feature"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert repo.returncode == 2 and "no bench module for: no_such_feature" in repo.stderr


def test_a_bad_redis_url_is_a_configuration_error_without_the_password() -> None:
    out = run_cli("health", env={"REDIS_URL": f"http://user:{SECRET}@host/0"})
    assert out.returncode == 2
    assert "REDIS_URL" in out.stderr or "redis_url" in out.stderr
    assert SECRET not in out.stdout + out.stderr


def test_demo_against_a_redis_that_does_not_answer_exits_2_and_says_why() -> None:
    from mcp_redis.testing import free_port

    out = run_cli("demo", "--seconds", "1", env={"REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"})
    assert out.returncode == 2
    assert "does not answer" in out.stderr
    assert SECRET not in out.stdout + out.stderr


def test_demo_with_a_refused_password_says_so(redis_factory: Any) -> None:
    """It used to say the server "does not answer"; the refusal names what to fix."""
    server = redis_factory(password=SECRET)
    out = run_cli("demo", "--seconds", "1", env={"REDIS_URL": f"redis://:wrong-{SECRET}@127.0.0.1:{server.port}/0"})
    assert out.returncode == 2 and "refused the credentials" in out.stderr, out.stderr
    assert SECRET not in out.stdout + out.stderr


@pytest.mark.parametrize("flag, value", [("--agents", "1000000000"), ("--workers", "65"), ("--threads", "100000")])
def test_demo_sizes_that_could_never_finish_are_refused_up_front(flag: str, value: str) -> None:
    """--agents 10^9 used to spend hours seeding rows; workers and threads were unbounded too."""
    out = run_cli("demo", "--seconds", "1", flag, value)
    assert out.returncode == 2 and "at most" in out.stderr and flag in out.stderr


def test_health_reports_a_backends_own_configuration_error_and_exits_1(redis_factory: Any) -> None:
    # An error only the backend's client finds (the server refuses the password): reported in
    # the backend's error field, the other backends still shown. (A URL that could never work,
    # such as a Cluster URL naming database 1, is refused by the settings: exit 2.)
    server = redis_factory(password=SECRET)
    out = run_cli("health", "--json", env={"REDIS_URL": f"redis://:wrong-pw@127.0.0.1:{server.port}/0"})
    assert out.returncode == 1, out.stderr
    assert "AuthenticationFailed" in out.stdout and "refused the credentials" in out.stdout
    assert "wrong-pw" not in out.stdout + out.stderr
    refused = run_cli("health", "--json", env={"REDIS_URL": "redis+cluster://127.0.0.1:7000/1"})
    assert refused.returncode == 2 and "Redis Cluster has only database 0" in refused.stderr


def test_cli_logging_writes_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI's handler, installed by one in-process run, must not keep the
    # stream that run had: a test's captured stderr is closed after it, and
    # later records then failed ("--- Logging error ---") instead of printing.
    import io
    import logging

    from mcp_redis import cli

    logger = logging.getLogger("mcp_redis")
    saved_handlers, saved_level = logger.handlers[:], logger.level
    logger.handlers.clear()
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        cli._setup_logging("warning")
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("mcp_redis.anything").warning("after the first stream closed")
        out = second.getvalue()
        assert "WARNING mcp_redis.anything: after the first stream closed" in out
        assert "Logging error" not in out
    finally:
        logger.handlers[:] = saved_handlers
        logger.setLevel(saved_level)
