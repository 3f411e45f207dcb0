"""Worker processes (spawned) of the compat-lock, crash-recovery and fenced-write tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List


def hold(settings: Dict[str, Any], agent_id: str, commands: Any, replies: Any, renewing: bool = True) -> None:
    """Hold `agent_id`'s lock (default lease and renewal; not `renewing`: ``lock(agent_id,
    timeout=30)``, never renewed) until told what to do.

    Replies ("held", fence) once held, then per command: "release" ->
    ("released", owned, lost, error); ("fenced_write", dsn) -> waits to learn
    the lock was lost, then tries a fenced write with its old token ->
    ("fenced_write", lost, written, release_error).
    """
    import mcp_redis
    from mcp_redis.fencing import fenced_update

    mcp_redis.configure(**settings)
    lock = mcp_redis.agent_lock(agent_id) if renewing else mcp_redis.lock(agent_id, timeout=30)
    lock.acquire()
    replies.put(("held", lock.fencing_token))
    command = commands.get()
    if command == "release":
        owned, lost = lock.owned(), lock.lost
        error = ""
        try:
            lock.release()
        except Exception as exc:
            error = type(exc).__name__
        replies.put(("released", owned, lost, error))
        return
    _, dsn = command
    lost = lock.lost_event.wait(30)
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            written = fenced_update(cur, "fenced_rows", {"value": "stale holder"}, {"id": 1}, "fence",
                                    lock.fencing_token or 0)
    finally:
        conn.close()
    error = ""
    try:
        lock.release()
    except Exception as exc:
        error = type(exc).__name__
    replies.put(("fenced_write", lost, written, error))


def rmw(settings: Dict[str, Any], dsn: str, lock_dir: str, agents: List[str], sections: int,
        sync_threads: int, async_threads: int, tasks: int, results: Any) -> None:
    """Read-modify-write rows of `rmw_counts` under the compat manager, legacy call pattern.

    `sync_threads` threads use ``with acquire_agent_lock(...)``; each of
    `async_threads` threads runs an event loop with `tasks` tasks using
    ``async with acquire_agent_lock_async(agent_id, timeout=5.0, max_retries=3)``.
    Every worker (thread or task) runs `sections` sections, agent by turn.
    Puts {"sections": done, "errors": n, "first_error": text}.
    """
    import psycopg2

    import mcp_redis
    from mcp_redis.compat import StateLockManager

    mcp_redis.configure(**settings)
    manager = StateLockManager(lock_dir=lock_dir)
    tally: Dict[str, Any] = {"sections": 0, "errors": 0, "first_error": ""}
    guard = threading.Lock()

    def count(done: int, errors: int, first: str) -> None:
        with guard:
            tally["sections"] += done
            tally["errors"] += errors
            tally["first_error"] = tally["first_error"] or first

    def section(cur: Any, agent: str) -> None:
        cur.execute("SELECT n FROM rmw_counts WHERE agent = %s", (agent,))
        n = cur.fetchone()[0]
        cur.execute("UPDATE rmw_counts SET n = %s WHERE agent = %s", (n + 1, agent))

    def sync_worker(offset: int) -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        done = errors = 0
        first = ""
        with conn.cursor() as cur:
            for i in range(sections):
                agent = agents[(i + offset) % len(agents)]
                try:
                    with manager.acquire_agent_lock(agent, timeout=5.0, max_retries=3):
                        section(cur, agent)
                    done += 1
                except Exception as exc:
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
        conn.close()
        count(done, errors, first)

    async def task(offset: int) -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        done = errors = 0
        first = ""
        with conn.cursor() as cur:
            for i in range(sections):
                agent = agents[(i + offset) % len(agents)]
                try:
                    async with manager.acquire_agent_lock_async(agent, timeout=5.0, max_retries=3):
                        await asyncio.to_thread(section, cur, agent)
                    done += 1
                except Exception as exc:
                    errors += 1
                    first = first or f"{type(exc).__name__}: {exc}"
        conn.close()
        count(done, errors, first)

    def async_worker(offset: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(task(offset + k) for k in range(tasks)))

        asyncio.run(main())

    workers = [threading.Thread(target=sync_worker, args=(k,)) for k in range(sync_threads)]
    workers += [threading.Thread(target=async_worker, args=(100 + 10 * k,)) for k in range(async_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put(tally)
