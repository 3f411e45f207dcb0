"""An MCP server built with the official `mcp` SDK whose tools share state through mcp_redis.

Run two instances side by side (a load balancer would sit in front)::

    export REDIS_URL=redis://127.0.0.1:6379/0 DATABASE_URL=postgresql://postgres@127.0.0.1/app
    python examples/mcp_server.py --port 8001 --name instance-1 &
    python examples/mcp_server.py --port 8002 --name instance-2 &

and point any MCP client at ``http://127.0.0.1:8001/mcp`` or ``:8002/mcp``:
whichever instance serves a call, the client sees the same session binding,
the same agent state, the same rate limit and the same cached metadata.

The tools are synchronous, like the legacy server's (the SDK runs them in a
worker thread), and use the library the way that server does after the
migration:

* ``open_session(agent_id)`` binds a session key to the agent (`SessionStore`);
  every other tool takes that key, and any instance resolves it;
* ``update_agent_state`` does its read-modify-write under `agent_lock` and
  publishes an ``agent:updates`` event;
* ``store_knowledge`` is `@rate_limited` per agent (``--kg-limit`` per hour);
* ``get_agent_metadata`` goes through a `@cached_metadata` loader over
  PostgreSQL (L1 in-process, L2 Redis).

Agent state and knowledge live in PostgreSQL when ``DATABASE_URL`` is set,
else in JSON files under ``--state-dir`` (one host only, like the legacy
server).  Needs ``pip install 'mcp_redis[mcp]'``; works with mcp 1.9+ and 2.x.
"""

import argparse
import json
import logging
import os
import tempfile
import uuid
from typing import Any, Dict, List, Optional

import mcp_redis

try:  # mcp >= 2: FastMCP was renamed MCPServer
    from mcp.server.mcpserver import MCPServer as _Server
    from mcp.server.mcpserver.exceptions import ToolError

    MCP_V2 = True
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[no-redef]
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef]

    MCP_V2 = False

log = logging.getLogger("mcp_redis.examples.mcp_server")

INSTANCE = os.environ.get("MCP_EXAMPLE_INSTANCE", "instance")
KG_LIMIT = int(os.environ.get("MCP_EXAMPLE_KG_LIMIT", "20"))
STATE_DIR = os.environ.get("MCP_EXAMPLE_STATE_DIR", os.path.join(tempfile.gettempdir(), "mcp_example_state"))

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS example_agents (agent_id TEXT PRIMARY KEY, display_name TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS example_agent_state (agent_id TEXT PRIMARY KEY, state JSONB NOT NULL)",
]

sessions = mcp_redis.SessionStore()
_schema_ready = False


def _pg() -> Any:
    """The library's PostgreSQL pool, or None without DATABASE_URL."""
    global _schema_ready
    if not mcp_redis.settings().database_url:
        return None
    from mcp_redis.postgres import get_postgres

    pg = get_postgres()
    if not _schema_ready:
        for stmt in SCHEMA:
            pg.execute(stmt)
        _schema_ready = True
    return pg


# -- agent state: read, modify in Python, write back (the legacy pattern) -------
def _read_state(agent_id: str) -> Dict[str, Any]:
    pg = _pg()
    if pg is not None:
        row = pg.execute("SELECT state FROM example_agent_state WHERE agent_id = %s", (agent_id,), fetch="one")
        return dict(row[0]) if row else {"updates": 0, "knowledge": []}
    path = os.path.join(STATE_DIR, f"{uuid.uuid5(uuid.NAMESPACE_URL, agent_id).hex}.json")
    try:
        with open(path, encoding="utf-8") as f:
            data: Dict[str, Any] = json.load(f)
            return data
    except FileNotFoundError:
        return {"updates": 0, "knowledge": []}


def _write_state(agent_id: str, state: Dict[str, Any]) -> None:
    pg = _pg()
    if pg is not None:
        pg.execute(
            "INSERT INTO example_agent_state (agent_id, state) VALUES (%s, %s::jsonb) "
            "ON CONFLICT (agent_id) DO UPDATE SET state = EXCLUDED.state",
            (agent_id, json.dumps(state)),
        )
        return
    os.makedirs(STATE_DIR, exist_ok=True)
    path = os.path.join(STATE_DIR, f"{uuid.uuid5(uuid.NAMESPACE_URL, agent_id).hex}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, path)


# -- the library's decorators, applied at import time as in the legacy code ------
@mcp_redis.cached_metadata(ttl=300)
def load_agent_metadata(agent_id: str) -> Dict[str, Any]:
    """Agent metadata from PostgreSQL (the source of truth); cached in L1 and L2."""
    pg = _pg()
    row = None
    if pg is not None:
        row = pg.execute("SELECT display_name FROM example_agents WHERE agent_id = %s", (agent_id,), fetch="one")
    return {
        "agent_id": agent_id,
        "display_name": row[0] if row else agent_id,
        "loaded_by": INSTANCE,  # shows which instance ran the loader
    }


@mcp_redis.rate_limited("store_knowledge", limit=KG_LIMIT, window=3600, key="agent_id")
def _store_knowledge(agent_id: str, text: str) -> int:
    with mcp_redis.agent_lock(agent_id):
        state = _read_state(agent_id)
        knowledge: List[str] = list(state.get("knowledge", []))
        knowledge.append(text)
        state["knowledge"] = knowledge[-100:]
        _write_state(agent_id, state)
        return len(knowledge)


def _agent_of(session_key: str) -> str:
    agent_id = sessions.get(session_key)
    if agent_id is None:
        # ToolError: the SDK sends this message to the client as the tool's error.
        raise ToolError(f"unknown or expired session {session_key!r}: call open_session first")
    return agent_id


# -- the MCP server ---------------------------------------------------------------
def build_server(name: str = INSTANCE) -> Any:
    """The MCP server with its tools (one per process; state is all shared)."""
    server = _Server(name)

    @server.tool()
    def open_session(agent_id: str, session_key: Optional[str] = None) -> Dict[str, Any]:
        """Bind a session to an agent; returns the session key every other tool takes."""
        key = session_key or uuid.uuid4().hex
        sessions.bind(key, agent_id)
        return {"session_key": key, "agent_id": agent_id, "served_by": INSTANCE}

    @server.tool()
    def whoami(session_key: str) -> Dict[str, Any]:
        """The agent bound to `session_key` (null when unknown or expired)."""
        return {"session_key": session_key, "agent_id": sessions.get(session_key), "served_by": INSTANCE}

    @server.tool()
    def update_agent_state(session_key: str, delta: int = 1) -> Dict[str, Any]:
        """Add `delta` to the agent's update counter: a read-modify-write under agent_lock."""
        agent_id = _agent_of(session_key)
        with mcp_redis.agent_lock(agent_id, blocking_timeout=10):
            state = _read_state(agent_id)
            state["updates"] = int(state.get("updates", 0)) + delta
            _write_state(agent_id, state)
        try:
            mcp_redis.publish_agent_update(agent_id, "state_changed", {"updates": state["updates"]})
        except mcp_redis.BackendUnavailable:
            log.warning("agent update not published: Redis unavailable")
        return {"agent_id": agent_id, "updates": state["updates"], "served_by": INSTANCE}

    @server.tool()
    def store_knowledge(session_key: str, text: str) -> Dict[str, Any]:
        """Store a piece of knowledge for the session's agent (rate-limited per agent)."""
        agent_id = _agent_of(session_key)
        try:
            stored = _store_knowledge(agent_id, text)
        except mcp_redis.RateLimitExceeded as exc:
            return {"stored": False, "agent_id": agent_id, "limit": exc.limit,
                    "retry_after": round(exc.retry_after, 3), "served_by": INSTANCE}
        return {"stored": True, "agent_id": agent_id, "knowledge_items": stored, "served_by": INSTANCE}

    @server.tool()
    def get_agent_metadata(session_key: str) -> Dict[str, Any]:
        """The session agent's metadata through the two-tier cache."""
        agent_id = _agent_of(session_key)
        return {"metadata": load_agent_metadata(agent_id), "served_by": INSTANCE}

    @server.tool()
    def cache_stats() -> Dict[str, Any]:
        """This instance's cache counters (L1 hits, L2 hits, loader calls)."""
        return dict(load_agent_metadata.cache_info()._asdict())

    return server


def main(argv: Optional[List[str]] = None) -> None:
    global INSTANCE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default=None, help="instance name shown in tool results")
    args = parser.parse_args(argv)
    if args.name:
        INSTANCE = args.name
    logging.basicConfig(level=logging.WARNING)
    server = build_server(INSTANCE)
    if MCP_V2:
        server.run("streamable-http", host=args.host, port=args.port)
    else:
        server.settings.host = args.host
        server.settings.port = args.port
        server.run("streamable-http")


if __name__ == "__main__":
    main()
