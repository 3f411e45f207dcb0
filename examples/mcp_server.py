"""An MCP server built with the official `mcp` SDK whose tools share state through mcp_redis.

Run two instances side by side behind any plain load balancer::

    export REDIS_URL=redis://127.0.0.1:6379/0 DATABASE_URL=postgresql://postgres@127.0.0.1/app
    python examples/mcp_server.py --port 8001 --name instance-1 &
    python examples/mcp_server.py --port 8002 --name instance-2 &

and point any MCP client at the balancer's ``/mcp`` (or at either
instance): the transport is stateless streamable HTTP (JSON responses, no
MCP transport session), so no sticky routing is needed; any request may go
to either instance, the first one included. Whichever instance serves a
call, the client sees the same session binding, the same agent state, the
same rate limits and the same cached metadata.

Flags: ``--host``, ``--port``, ``--name`` (shown in tool results),
``--kg-limit`` (stores per agent per hour, default 20),
``--state-dir`` (where agent state lives without ``DATABASE_URL``),
``--requests-per-minute`` / ``--requests-per-hour`` (the request limiter,
default 60 / 1,000).

The tools are synchronous, like the legacy server's (the SDK runs them in a
worker thread), and use the library the way that server does after the
migration:

* ``open_session(agent_id)`` binds a session key to the agent (`SessionStore`);
  every other tool takes that key, and any instance resolves it;
* ``update_agent_state`` does its read-modify-write under `agent_lock` and
  publishes an ``agent:updates`` event;
* ``store_knowledge`` has the legacy ``kg_store`` limit
  (`mcp_redis.compat.kg_store_rate_limited`: ``--kg-limit`` per agent per
  sliding hour, a failed store gives its slot back);
* ``get_agent_metadata`` goes through a `@cached_metadata` loader over
  PostgreSQL (L1 in-process, L2 Redis; namespace ``example.agent_metadata``,
  the same however the module is loaded); ``update_agent_metadata`` writes
  PostgreSQL, then invalidates the entry in every instance;
* every tool but the read-only ones (``whoami``, ``get_agent_metadata``,
  ``cache_stats``) first passes the request limiter, as the legacy
  middleware (``rate_limit_step.py``) does: `mcp_redis.compat.RateLimiter`,
  per agent (the session's agent, else ``agent_id``, else "anonymous"),
  shared by every instance.

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
from mcp_redis import compat

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
#: Tools the request limiter skips (the legacy middleware's read-only set, for this server).
READ_ONLY_TOOLS = {"whoami", "get_agent_metadata", "cache_stats"}

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
# An explicit namespace: the default one derives from the module's name, which
# is "__main__" when run as a script and "examples.mcp_server" when imported.
@mcp_redis.cached_metadata(ttl=300, namespace="example.agent_metadata")
def load_agent_metadata(agent_id: str) -> Dict[str, Any]:
    """Agent metadata from PostgreSQL (the source of truth); cached in L1 and L2."""
    pg = _pg()
    name: Optional[str] = None
    if pg is not None:
        row = pg.execute("SELECT display_name FROM example_agents WHERE agent_id = %s", (agent_id,), fetch="one")
        name = row[0] if row else None
    else:
        name = _read_state(agent_id).get("display_name")
    return {
        "agent_id": agent_id,
        "display_name": name or agent_id,
        "loaded_by": INSTANCE,  # shows which instance ran the loader
    }


def _write_display_name(agent_id: str, display_name: str) -> None:
    """The source-of-truth write of `update_agent_metadata` (under the agent's lock)."""
    with mcp_redis.agent_lock(agent_id, blocking_timeout=10):
        pg = _pg()
        if pg is not None:
            pg.execute(
                "INSERT INTO example_agents (agent_id, display_name) VALUES (%s, %s) "
                "ON CONFLICT (agent_id) DO UPDATE SET display_name = EXCLUDED.display_name",
                (agent_id, display_name),
            )
        else:
            state = _read_state(agent_id)
            state["display_name"] = display_name
            _write_state(agent_id, state)


def _make_store_knowledge(kg_limit: int) -> Any:
    """`store_knowledge`'s body with the legacy kg_store limit (`kg_limit` per agent per hour)."""

    @compat.kg_store_rate_limited(limit=kg_limit)
    def store(agent_id: str, text: str) -> int:
        with mcp_redis.agent_lock(agent_id):
            state = _read_state(agent_id)
            knowledge: List[str] = list(state.get("knowledge", []))
            knowledge.append(text)
            state["knowledge"] = knowledge[-100:]
            _write_state(agent_id, state)
            return len(knowledge)

    return store


# -- the MCP server ---------------------------------------------------------------
def build_server(name: str = INSTANCE, kg_limit: int = KG_LIMIT, requests_per_minute: int = 60,
                 requests_per_hour: int = 1000) -> Any:
    """The MCP server with its tools (one per process; state is all shared)."""
    server = _Server(name)
    _store_knowledge = _make_store_knowledge(kg_limit)
    requests = compat.RateLimiter(requests_per_minute, requests_per_hour)

    def _admit(tool: str, agent_id: Optional[str]) -> None:
        """The legacy middleware's request limit, before a tool that is not read-only runs."""
        if tool in READ_ONLY_TOOLS:
            return
        allowed, message = requests.check_rate_limit(agent_id or "anonymous")
        if not allowed:
            raise ToolError(message or "rate limit exceeded")

    def _session_agent(tool: str, session_key: str) -> str:
        """The session's agent, after the request limiter (keyed by that agent, or "anonymous")."""
        agent_id = sessions.get(session_key)
        _admit(tool, agent_id)
        if agent_id is None:
            # ToolError: the SDK sends this message to the client as the tool's error.
            raise ToolError(f"unknown or expired session {session_key!r}: call open_session first")
        return agent_id

    @server.tool()
    def open_session(agent_id: str, session_key: Optional[str] = None) -> Dict[str, Any]:
        """Bind a session to an agent; returns the session key every other tool takes."""
        _admit("open_session", agent_id)
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
        agent_id = _session_agent("update_agent_state", session_key)
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
        """Store a piece of knowledge for the session's agent (the legacy kg_store limit per agent)."""
        agent_id = _session_agent("store_knowledge", session_key)
        try:
            stored = _store_knowledge(agent_id, text)
        except compat.KgStoreRateLimitExceeded as exc:  # a ValueError, as the legacy handler expects
            return {"stored": False, "agent_id": agent_id, "limit": exc.limit,
                    "retry_after": round(exc.retry_after, 3), "served_by": INSTANCE}
        return {"stored": True, "agent_id": agent_id, "knowledge_items": stored, "served_by": INSTANCE}

    @server.tool()
    def get_agent_metadata(session_key: str) -> Dict[str, Any]:
        """The session agent's metadata through the two-tier cache."""
        agent_id = _session_agent("get_agent_metadata", session_key)
        return {"metadata": load_agent_metadata(agent_id), "served_by": INSTANCE}

    @server.tool()
    def update_agent_metadata(session_key: str, display_name: str) -> Dict[str, Any]:
        """Change the agent's display name in PostgreSQL, then invalidate its cached metadata everywhere."""
        agent_id = _session_agent("update_agent_metadata", session_key)
        _write_display_name(agent_id, display_name)
        load_agent_metadata.invalidate(agent_id)  # after the write: every instance's L1 and L2
        return {"agent_id": agent_id, "display_name": display_name, "served_by": INSTANCE}

    @server.tool()
    def cache_stats() -> Dict[str, Any]:
        """This instance's cache counters (L1 hits, L2 hits, loader calls)."""
        return dict(load_agent_metadata.cache_info()._asdict())

    return server


def main(argv: Optional[List[str]] = None) -> None:
    global INSTANCE, STATE_DIR
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default=None, help="instance name shown in tool results")
    parser.add_argument("--kg-limit", type=int, default=KG_LIMIT, help="knowledge stores per agent per hour")
    parser.add_argument("--state-dir", default=STATE_DIR, help="agent state files without DATABASE_URL")
    parser.add_argument("--requests-per-minute", type=int, default=60, help="the request limiter, per agent")
    parser.add_argument("--requests-per-hour", type=int, default=1000, help="the request limiter, per agent")
    args = parser.parse_args(argv)
    if args.name:
        INSTANCE = args.name
    STATE_DIR = args.state_dir
    logging.basicConfig(level=logging.WARNING)
    server = build_server(INSTANCE, args.kg_limit, args.requests_per_minute, args.requests_per_hour)
    # Stateless streamable HTTP with JSON responses: no MCP transport session
    # lives in one instance, so a plain (non-sticky) load balancer works.
    if MCP_V2:
        server.run("streamable-http", host=args.host, port=args.port, stateless_http=True, json_response=True)
    else:
        server.settings.host = args.host
        server.settings.port = args.port
        server.settings.stateless_http = True
        server.settings.json_response = True
        server.run("streamable-http")


if __name__ == "__main__":
    main()
