"""Lua scripts: one file per script under ``mcp_redis/lua/``, read once.

Scripts are only ever read from the package's own files (never built from
input); features register them with ``client.register_script`` so redis-py
sends EVALSHA and reloads a script the server lost (NOSCRIPT) by itself.
"""

from __future__ import annotations

import functools
import importlib.resources

__all__ = ["lua"]


@functools.cache
def lua(name: str) -> str:
    """The source of ``mcp_redis/lua/<name>.lua`` (e.g. ``lua("lock_acquire")``)."""
    return (importlib.resources.files("mcp_redis") / "lua" / f"{name}.lua").read_text("utf-8")
