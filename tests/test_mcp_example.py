"""examples/mcp_server.py: two MCP server instances behind a plain load balancer share everything.

Both instances run as real processes on loopback ports (stateless
streamable HTTP). The test talks to them with the `mcp` SDK's own client
through `RoundRobinProxy`, a loopback HTTP proxy that sends each request to
the next instance in turn (no sticky routing): any call, the first
included, may go to either.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, Iterator, List, Tuple

import pytest

from mcp_redis.config import ENVIRONMENT_VARIABLES
from mcp_redis.testing import free_port, servers_required

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "mcp_server.py")
KG_LIMIT = 3
REQUESTS_PER_MINUTE = 40

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


class RoundRobinProxy:
    """A loopback HTTP/1.1 proxy: each request goes to the next backend in turn, on a fresh connection.

    It reads one request (headers and a Content-Length body), forwards it
    with ``Connection: close`` to the next backend, relays the response
    until the backend closes, then closes the client's connection: no
    request is tied to an earlier one's backend. `served` lists the backend
    index of every request, in order.
    """

    def __init__(self, backends: List[Tuple[str, int]]) -> None:
        self.backends = backends
        self.served: List[int] = []
        self._next = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._relay(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _relay(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        headers = [h for h in lines[1:] if not h.lower().startswith((b"connection:", b"keep-alive:"))]
        length = next((int(h.split(b":", 1)[1]) for h in headers if h.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                return
            body += chunk
        with self._lock:
            index = next(self._next)
            self.served.append(index)
        request = b"\r\n".join([lines[0], *headers, b"Connection: close"]) + b"\r\n\r\n" + body
        with socket.create_connection(self.backends[index], timeout=60) as upstream:
            upstream.sendall(request)
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    break
                client.sendall(chunk)
        client.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_instance(name: str, env: Dict[str, str], log_dir: str) -> Tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, EXAMPLE, "--port", str(port), "--name", name, "--kg-limit", str(KG_LIMIT),
             "--state-dir", os.path.join(log_dir, "state"), "--requests-per-minute", str(REQUESTS_PER_MINUTE)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
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
    env.update({"REDIS_URL": redis_url, "DATABASE_URL": database_url, "PYTHONPATH": ROOT})
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


@pytest.fixture
def balancer(instances: List[str]) -> Iterator[RoundRobinProxy]:
    """Both instances behind one round-robin proxy."""
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in instances]
    proxy = RoundRobinProxy([("127.0.0.1", port) for port in ports])
    try:
        yield proxy
    finally:
        proxy.close()


def test_two_instances_behind_a_round_robin_balancer_share_sessions_limits_locks_and_metadata(
    balancer: RoundRobinProxy,
) -> None:
    both = {"instance-1", "instance-2"}

    async def scenario() -> None:
        async with connect(balancer.url) as lb:
            # A session bound through one instance resolves through either.
            opened = await lb.call("open_session", agent_id="agent-7")
            key = opened["session_key"]
            seen = [await lb.call("whoami", session_key=key) for _ in range(4)]
            assert {s["agent_id"] for s in seen} == {"agent-7"}
            assert {opened["served_by"]} | {s["served_by"] for s in seen} == both

            # The kg_store limit is one limit across both instances: 3 per hour in all.
            results = [await lb.call("store_knowledge", session_key=key, text=f"fact {i}") for i in range(5)]
            assert [r["stored"] for r in results] == [True, True, True, False, False]
            assert {r["served_by"] for r in results} == both
            assert results[3]["limit"] == KG_LIMIT and results[3]["retry_after"] > 0

            # Metadata loaded by one instance is an L2 hit for the other...
            first, second = [await lb.call("get_agent_metadata", session_key=key) for _ in range(2)]
            assert {first["served_by"], second["served_by"]} == both
            assert second["metadata"] == first["metadata"]
            assert first["metadata"]["display_name"] == "agent-7"
            # ... and an update through one is what both return on their next call.
            updated = await lb.call("update_agent_metadata", session_key=key, display_name="Agent Seven")
            after = [await lb.call("get_agent_metadata", session_key=key) for _ in range(2)]
            assert {a["served_by"] for a in after} == both
            assert [a["metadata"]["display_name"] for a in after] == ["Agent Seven", "Agent Seven"], updated

            # Concurrent read-modify-writes through the balancer lose no update.
            async def bump(n: int) -> None:
                async with connect(balancer.url) as client:
                    for _ in range(n):
                        await client.call("update_agent_state", session_key=key)

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(bump, 5)
            final = await lb.call("update_agent_state", session_key=key, delta=0)
            assert final["updates"] == 20

            # The request limiter counts an agent's calls on both instances together.
            other = (await lb.call("open_session", agent_id="agent-9"))["session_key"]
            calls = [await lb.call("update_agent_state", session_key=other)
                     for _ in range(REQUESTS_PER_MINUTE)]
            assert all("error" not in c for c in calls[:-1]) and {c["served_by"] for c in calls[:-1]} == both
            assert calls[-1]["error"].endswith(  # the SDK prefixes "Error executing tool ...: "
                f"Rate limit exceeded: {REQUESTS_PER_MINUTE}/{REQUESTS_PER_MINUTE} "
                "requests per minute. Wait a few seconds and retry.")

            # An unknown session is a tool error, on either instance.
            refused = [await lb.call("update_agent_state", session_key="no-such-session") for _ in range(2)]
            assert all("open_session" in r["error"] for r in refused)

    anyio.run(scenario)
    assert set(balancer.served) == {0, 1}
    assert all(a != b for a, b in zip(balancer.served, balancer.served[1:])), "strict round robin"


def test_documented_flags_exist() -> None:
    out = subprocess.run([sys.executable, EXAMPLE, "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--name", "--kg-limit", "--state-dir", "--requests-per-minute",
                 "--requests-per-hour"):
        assert flag in out.stdout
        assert flag in open(EXAMPLE, encoding="utf-8").read().split('"""')[1], f"{flag} documented"


def test_cache_namespace_does_not_depend_on_how_the_module_is_loaded() -> None:
    code = ("import runpy, sys; sys.argv = ['x']; "
            "import examples.mcp_server as m; "
            "g = runpy.run_path(m.__file__, run_name='__main__x'); "
            "print(m.load_agent_metadata.namespace == g['load_agent_metadata'].namespace)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
