"""Runs the legacy server's own tests against `mcp_redis.compat` (a pytest plugin).

The legacy server (CIRWEL/unitares, Apache-2.0) imports its modules as
``src.<name>``. Loaded with ``-p tests.legacy.plugin``, this plugin makes
``src.rate_limiter`` and ``src.state_locking`` resolve to `mcp_redis.compat`
before any legacy test module is imported, and gives every test the library
on a private, emptied redis-server (``MCP_REDIS_LEGACY_BACKEND=local``: local
mode instead). Nothing of the legacy server is kept in this repository:
`scripts/legacy_acceptance.sh` runs the test files of a checkout of it.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Iterator

import pytest

import mcp_redis
import mcp_redis.compat

_src = sys.modules.setdefault("src", types.ModuleType("src"))
if not hasattr(_src, "__path__"):
    _src.__path__ = []  # type: ignore[attr-defined]
for _name in ("rate_limiter", "state_locking"):
    sys.modules[f"src.{_name}"] = mcp_redis.compat
    setattr(_src, _name, mcp_redis.compat)


@pytest.fixture(autouse=True)
def legacy_library(request: pytest.FixtureRequest) -> Iterator[None]:
    """The library as the legacy tests expect it: on Redis (default) or in local mode."""
    if os.environ.get("MCP_REDIS_LEGACY_BACKEND", "redis") == "redis":
        url = request.getfixturevalue("redis_url")  # tests/conftest.py: a private, emptied server
        mcp_redis.configure(redis_url=url)
    yield
