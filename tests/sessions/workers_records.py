"""Worker functions for the multi-process record tests (importable under "spawn")."""

from __future__ import annotations

import threading
from typing import Optional


def update_fields(redis_url: str, database_url: Optional[str], session_key: str, tag: str, threads: int,
                  per_thread: int) -> None:
    """`threads` threads, each merging `per_thread` fields of its own into one record."""
    import mcp_redis

    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    store = mcp_redis.SessionStore()

    def run(t: int) -> None:
        for i in range(per_thread):
            store.update(session_key, **{f"f_{tag}_{t}_{i}": i})

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    mcp_redis.reset()
