"""Lua scripts: one file per script under ``mcp_redis/lua/``, read once.

Scripts are only ever read from the package's own files (never built from
input); features get them from their client's `ScriptSet`, registered once
per redis client, so redis-py sends EVALSHA and reloads a script the server
lost (NOSCRIPT) by itself.
"""

from __future__ import annotations

import functools
import importlib.resources
import threading
from typing import Any, Dict, Tuple

__all__ = ["lua", "ScriptSet"]


@functools.cache
def lua(name: str) -> str:
    """The source of ``mcp_redis/lua/<name>.lua`` (e.g. ``lua("lock_acquire")``)."""
    return (importlib.resources.files("mcp_redis") / "lua" / f"{name}.lua").read_text("utf-8")


class ScriptSet:
    """The library's one script registry: each script registered once per redis client.

    ``scripts.get(redis_client, "lock_acquire")`` returns redis-py's
    ``Script`` for that client (EVALSHA, reloaded on NOSCRIPT), built on first
    use. Reads take no lock; a racing first use registers twice, harmlessly.
    A `mcp_redis.Client` owns one and clears it on close and in a forked child.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (id(redis_client), name) -> (redis_client, Script); the client is kept
        # so an id reused after garbage collection can never match.
        self._scripts: Dict[Tuple[int, str], Tuple[Any, Any]] = {}

    def get(self, redis_client: Any, name: str) -> Any:
        """The registered script `name` (``mcp_redis/lua/<name>.lua``) for `redis_client`."""
        entry = self._scripts.get((id(redis_client), name))
        if entry is not None and entry[0] is redis_client:
            return entry[1]
        script = redis_client.register_script(lua(name))
        with self._lock:
            self._scripts[(id(redis_client), name)] = (redis_client, script)
        return script

    def clear(self) -> None:
        """Forget every registration (the clients are closed or belong to a parent)."""
        with self._lock:
            self._scripts.clear()
