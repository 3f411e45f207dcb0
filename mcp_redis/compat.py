"""Drop-in replacements for the legacy server's helpers.

`StateLockManager` keeps the legacy file-lock manager's signature, so code
that does ``with manager.acquire_agent_lock(agent_id, timeout=5.0):`` moves
to the shared lock without edits: it takes exactly the lock of
``mcp_redis.agent_lock(agent_id)`` (reentrant with it in one thread), and a
wait longer than `timeout` raises `TimeoutError` (`mcp_redis.LockTimeout`).
"""

from __future__ import annotations

from typing import Any, Optional

from .locks import AgentLock, _check_seconds, agent_lock

__all__ = ["StateLockManager"]


class StateLockManager:
    """The legacy agent-state lock manager, backed by `agent_lock`.

    `lock_dir` is accepted for compatibility and ignored: the backend and the
    lock directory come from the library's settings (``MCP_REDIS_LOCK_DIR``).
    """

    def __init__(self, lock_dir: Optional[str] = None, **_legacy: Any) -> None:
        self.lock_dir = lock_dir

    def __repr__(self) -> str:
        return "StateLockManager()"

    def acquire_agent_lock(self, agent_id: str, timeout: float = 5.0) -> AgentLock:
        """A context manager holding `agent_id`'s lock; `timeout` is the longest wait (s)."""
        wait = _check_seconds(timeout, "timeout", allow_none=True, allow_zero=True)
        return agent_lock(agent_id, blocking_timeout=wait)
