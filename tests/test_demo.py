"""`mcp-redis demo`: the README's first command runs to its report, and its checks have teeth."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest

from mcp_redis.config import ENVIRONMENT_VARIABLES
from mcp_redis.demo import DemoOptions, format_report, run_demo
from mcp_redis.testing import PostgresDatabase, redis_binary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.long
def test_the_demo_command_reports_zero_violations_exact_admissions_and_surviving_sessions() -> None:
    """`python -m mcp_redis demo` from a clean environment: own redis-server, throwaway PG database."""
    if redis_binary() is None:
        pytest.skip("redis-server not found (the demo would run in local mode)")
    env = {k: v for k, v in os.environ.items() if k not in {var for var, _ in ENVIRONMENT_VARIABLES}}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_redis", "demo", "--workers", "3", "--seconds", "4", "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report: Dict[str, Any] = json.loads(proc.stdout)
    assert report["ok"] is True and report["failures"] == []
    assert "own redis-server" in report["setup"]["redis"]
    # Unexpected errors (a backend timing out on a starved box) are reported, never hidden.
    assert report["errors"]["count"] <= report["operations"] // 100, report["errors"]

    locks = report["locks"]
    assert locks["updates"] > 0
    assert locks["violations"] == 0 and locks["lost_updates"] == 0 and locks["overlapping_holders"] == 0

    rate = report["rate_limits"]
    assert rate["scope"] == "shared by every worker"
    # Exactly min(limit, attempts) per agent; a call cut short by the kill may
    # or may not have been counted by the limiter, and the check allows for it.
    assert rate["exact"] is True
    assert abs(rate["admitted"] - rate["expected_admitted"]) <= rate["unknown_outcome"]
    assert rate["admitted"] <= rate["limit_per_agent"] * rate["agents"]

    sessions = report["sessions"]
    assert sessions["cross_worker_reads"] > 0
    assert sessions["found"] == sessions["cross_worker_reads"]
    restart = sessions["restart"]
    assert restart["killed_worker"] == 2
    assert restart["survived"] == restart["checked"] == 50

    cache = report["metadata_cache"]
    assert cache["calls"] > 0 and cache["hit_ratio"] > 0.5
    if PostgresDatabase().available():
        assert cache["source"] == "postgresql"
        assert cache["postgres_queries_avoided"] == cache["calls"] - cache["postgres_queries"]

    events = report["events"]
    # Each update is published after its lock is released: the killed worker's threads may each
    # have died between the two, and a failed publish is an error counted above.
    unpublished = report["setup"]["threads_per_worker"] + report["errors"]["count"]
    assert locks["updates"] - unpublished <= events["published"] <= locks["updates"]
    assert events["delivered_to_observer"] >= events["published"]
    assert set(report["latency_ms"]) >= {"session.get", "agent.update", "ratelimit.call", "metadata.get"}
    for op in report["latency_ms"].values():
        assert 0 < op["p50_ms"] <= op["p99_ms"]
    # The progress bar and the setup notes went to stderr, not into the JSON.
    assert "[" in proc.stderr and "redis:" in proc.stderr


@pytest.mark.slow
def _demo_databases() -> set:  # type: ignore[type-arg]
    import psycopg2

    conn = psycopg2.connect(PostgresDatabase().admin_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'mcp_redis_demo%%'")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def _children(pid: int) -> set:  # type: ignore[type-arg]
    """Every live descendant of `pid` (from /proc)."""
    parents: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


@pytest.mark.long
def test_a_demo_stopped_with_sigterm_cleans_up_like_one_interrupted() -> None:
    """`timeout`, systemd and `docker stop` send SIGTERM: no redis-server, worker or database is left."""
    if redis_binary() is None:
        pytest.skip("redis-server not found (the demo would run in local mode)")
    import signal
    import time

    from mcp_redis.testing import wait_for

    env = {k: v for k, v in os.environ.items() if k not in {var for var, _ in ENVIRONMENT_VARIABLES}}
    env["PYTHONPATH"] = ROOT
    before = _demo_databases()
    proc = subprocess.Popen([sys.executable, "-m", "mcp_redis", "demo", "--workers", "2", "--seconds", "60",
                             "--quiet", "--no-restart"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _demo_databases() - before and len(_children(proc.pid)) >= 3, timeout=60,
                 what="the demo's database, redis-server and workers")
        family = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in family):
        time.sleep(0.1)
    left = [p for p in family if os.path.exists(f"/proc/{p}")]
    assert not left, f"left running: {left}"
    assert _demo_databases() - before == set(), "its database dropped"


@pytest.mark.long
def test_without_agent_lock_the_demo_sees_lost_updates_and_fails(redis_url: str) -> None:
    import mcp_redis

    mcp_redis.configure(redis_url=redis_url)
    report = run_demo(DemoOptions(workers=2, threads=3, agents=1, seconds=2, unsafe=True, restart=False,
                                  progress=False))
    assert report["locks"]["violations"] > 0
    assert report["ok"] is False
    assert any("lock violation" in f for f in report["failures"])
    assert "FAILED" in format_report(report)


@pytest.mark.slow
def test_the_demo_on_a_given_redis_removes_every_key_it_wrote(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    import mcp_redis

    mcp_redis.configure(redis_url=redis_url)
    redis_server.client().set("users:own:key", "untouched")
    stream = io.StringIO()
    report = run_demo(DemoOptions(workers=2, seconds=2, restart=True, stream=stream))
    assert report["ok"] is True, report["failures"]
    assert report["setup"]["redis"].startswith("REDIS_URL redis://")
    assert redis_server.client().keys("mcpdemo-*") == []
    assert redis_server.client().get("users:own:key") == "untouched"
    text = stream.getvalue()
    assert "worker 1 killed" in text or "restarted" in text
    assert "verdict: OK" in format_report(report)


@pytest.mark.slow
def test_without_redis_or_postgres_the_demo_runs_in_local_mode_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import mcp_redis.testing

    monkeypatch.setattr(mcp_redis.testing, "redis_binary", lambda name="redis-server": None)
    monkeypatch.setattr(mcp_redis.testing.PostgresDatabase, "available", lambda self: False)
    report = run_demo(DemoOptions(workers=2, seconds=2, restart=False, progress=False))
    setup = report["setup"]
    assert setup["redis"].startswith("local mode")
    assert setup["postgres"].startswith("no PostgreSQL tier")
    assert set(setup["modes"].values()) == {"local"}
    # File locks still exclude across processes on one host...
    assert report["locks"]["violations"] == 0 and report["locks"]["updates"] > 0
    # ...while rate limits are per process, and the report says so.
    assert report["rate_limits"]["scope"] == "per process (local mode)"
    assert report["rate_limits"]["exact"] is True
    assert report["metadata_cache"]["source"].startswith("simulated")
    assert report["ok"] is True


@pytest.mark.parametrize(
    ("admitted", "completed", "unknown", "exact"),
    [
        (5, 5, 0, True),     # under the limit: every call admitted
        (4, 5, 0, False),    # one refused while under the limit
        (20, 30, 0, True),   # the limit, then refusals
        (21, 30, 0, False),  # one too many
        (19, 30, 1, True),   # the killed call took the last slot
        (19, 30, 0, False),
        (7, 7, 2, True),     # killed calls never reached the limiter
    ],
)
def test_admissions_are_exact_only_when_some_outcome_of_the_cut_short_calls_fits(
        admitted: int, completed: int, unknown: int, exact: bool) -> None:
    from mcp_redis.demo import _admissions_exact

    assert _admissions_exact(admitted, completed, unknown, limit=20) is exact
