"""The legacy server's tables in the run's database, and the example adapter over them.

`install` creates ``core.agents``/``core.identities``/``core.sessions``/
``audit.rate_limits`` from ``tests/fixtures/legacy_unitares.sql`` (once) and
empties them; `register` stands for the legacy server's own agent
registration, which the adapter never does by itself.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "legacy_unitares.sql")


def load_example() -> ModuleType:
    """``examples/legacy_sessions.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("legacy_sessions", os.path.join(ROOT, "examples", "legacy_sessions.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(dsn: str) -> None:
    """The legacy tables in the database of `dsn`, created once, emptied every time."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(16)")
            cur.execute("SELECT to_regclass('core.identities')")
            row = cur.fetchone()
            if row is None or row[0] is None:
                with open(FIXTURE, encoding="utf-8") as f:
                    cur.execute(f.read())
            cur.execute("TRUNCATE core.sessions, core.identities, core.agents, audit.rate_limits")
    finally:
        conn.close()


def register(cur: Any, agent_id: str) -> int:
    """Register `agent_id` as the legacy server would (placeholder key material: a test)."""
    cur.execute("INSERT INTO core.agents (id, api_key) VALUES (%s, 'test-placeholder') ON CONFLICT (id) DO NOTHING",
                (agent_id,))
    cur.execute("INSERT INTO core.identities (agent_id, api_key_hash) VALUES (%s, 'test-placeholder') "
                "ON CONFLICT (agent_id) DO UPDATE SET updated_at = now() RETURNING identity_id", (agent_id,))
    row = cur.fetchone()
    return int(row[0])
