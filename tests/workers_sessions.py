"""Worker functions for the multi-process session tests (importable under "spawn")."""

from __future__ import annotations

from typing import Any, Optional


def bind_once(redis_url: str, database_url: Optional[str], session_key: str, agent_id: str) -> None:
    """Process A: bind one session and exit."""
    import mcp_redis

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    mcp_redis.SessionStore().bind(session_key, agent_id)
    mcp_redis.reset()


def reader_loop(redis_url: str, database_url: Optional[str], requests: Any, replies: Any) -> None:
    """Process B: answer ("get", key) requests with the binding it reads, until None."""
    import mcp_redis

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = mcp_redis.SessionStore()
    replies.put("ready")
    while True:
        request = requests.get()
        if request is None:
            break
        op, key = request
        try:
            replies.put(("ok", store.get(key)))
        except Exception as exc:  # report, don't die: the test asserts on it
            replies.put(("error", f"{type(exc).__name__}: {exc}"))
    mcp_redis.reset()
