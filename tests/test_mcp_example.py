"""examples/mcp_server.py: two MCP server instances share sessions, locks, limits and cache.

Both instances run as real processes on loopback ports (streamable HTTP);
the test talks to them with the `mcp` SDK's own client, as a client behind
a load balancer would be sent to either.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, Iterator, List, Tuple

import pytest

from mcp_redis.config import ENVIRONMENT_VARIABLES
from mcp_redis.testing import free_port, servers_required

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "mcp_server.py")
KG_LIMIT = 3

try:
    import anyio
    import mcp  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    if servers_required():
        pytest.fail("the mcp SDK is required (pip install 'mcp_redis[mcp]')", pytrace=False)
    pytest.skip("the mcp SDK is not installed (pip install 'mcp_redis[mcp]')", allow_module_level=True)


class Tools:
    """`call(name, **args)` -> the tool's JSON result, over either SDK generation."""

    def __init__(self, session: Any) -> None:
        self.session = session

    async def call(self, name: str, **arguments: Any) -> Dict[str, Any]:
        result = await self.session.call_tool(name, arguments)
        if getattr(result, "is_error", getattr(result, "isError", False)):
            return {"error": " ".join(getattr(c, "text", "") for c in result.content)}
        data: Dict[str, Any] = json.loads(result.content[0].text)
        return data


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Tools]:
    client_cls = getattr(mcp, "Client", None)
    if client_cls is not None:  # mcp >= 2
        async with client_cls(url) as client:
            yield Tools(client)
        return
    from mcp import ClientSession  # mcp 1.x
    from mcp.client.streamable_http import streamablehttp_client

    async with streamablehttp_client(url) as (read, write, _session_id):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield Tools(session)


def start_instance(name: str, env: Dict[str, str], log_dir: str) -> Tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, EXAMPLE, "--port", str(port), "--name", name],
            env={**env, "MCP_EXAMPLE_INSTANCE": name}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}/mcp", log_path


def wait_listening(proc: subprocess.Popen[bytes], url: str, log_path: str, timeout: float = 60) -> None:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise AssertionError(f"example server exited with {proc.returncode}:\n{f.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"example server on {url} did not listen within {timeout}s")


@pytest.fixture
def instances(redis_url: str, database_url: str, tmp_path: Any) -> Iterator[List[str]]:
    env = {k: v for k, v in os.environ.items() if k not in {var for var, _ in ENVIRONMENT_VARIABLES}}
    env.update({
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "MCP_EXAMPLE_KG_LIMIT": str(KG_LIMIT),
        "MCP_EXAMPLE_STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": ROOT,
    })
    started = [start_instance(name, env, str(tmp_path)) for name in ("instance-1", "instance-2")]
    try:
        for proc, url, log in started:
            wait_listening(proc, url, log)
        yield [url for _, url, _ in started]
    finally:
        for proc, _, _ in started:
            proc.terminate()
        for proc, _, _ in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_two_instances_share_sessions_rate_limits_locks_and_cached_metadata(instances: List[str]) -> None:
    url1, url2 = instances

    async def scenario() -> None:
        async with connect(url1) as one, connect(url2) as two:
            # A session bound through instance 1 resolves through instance 2.
            opened = await one.call("open_session", agent_id="agent-7")
            key = opened["session_key"]
            assert opened["served_by"] == "instance-1"
            seen = await two.call("whoami", session_key=key)
            assert seen == {"session_key": key, "agent_id": "agent-7", "served_by": "instance-2"}

            # The rate limit is one limit across both instances: 3 per hour in all.
            results = [await client.call("store_knowledge", session_key=key, text=f"fact {i}")
                       for i, client in enumerate([one, two, one, two, one])]
            assert [r["stored"] for r in results] == [True, True, True, False, False]
            assert results[4]["served_by"] == "instance-1"  # it admitted only 2 itself, yet refuses
            assert results[3]["limit"] == KG_LIMIT and results[3]["retry_after"] > 0

            # Metadata loaded through instance 2 is an L2 hit for instance 1.
            via_two = await two.call("get_agent_metadata", session_key=key)
            via_one = await one.call("get_agent_metadata", session_key=key)
            assert via_two["metadata"]["loaded_by"] == "instance-2"
            assert via_one["metadata"] == via_two["metadata"]
            stats_one = await one.call("cache_stats")
            assert stats_one["loader_calls"] == 0 and stats_one["l2_hits"] == 1

            # Concurrent read-modify-writes through both instances lose no update.
            async def bump(client: Tools, n: int) -> None:
                for _ in range(n):
                    await client.call("update_agent_state", session_key=key)

            async with anyio.create_task_group() as tg:
                for client in (one, two, one, two):
                    tg.start_soon(bump, client, 5)
            final = await two.call("update_agent_state", session_key=key, delta=0)
            assert final["updates"] == 20

            # An unknown session is a tool error, on either instance.
            refused = await two.call("update_agent_state", session_key="no-such-session")
            assert "open_session" in refused["error"]

    anyio.run(scenario)
