"""Worker functions for the lock tests' child processes (importable for "spawn")."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple


def _configure(settings: Dict[str, Any]) -> None:
    import mcp_redis

    mcp_redis.reset(configuration=True)
    mcp_redis.configure(**settings)


def _read(path_or_client: Any, counter_key: str) -> str:
    if isinstance(path_or_client, str):
        if not os.path.exists(path_or_client):
            return ""
        with open(path_or_client) as f:
            return f.read()
    return path_or_client.get(counter_key) or ""


def _write(path_or_client: Any, counter_key: str, value: str) -> None:
    if isinstance(path_or_client, str):
        with open(path_or_client, "w") as f:
            f.write(value)
    else:
        path_or_client.set(counter_key, value)


def mutex_worker(
    settings: Dict[str, Any],
    name: str,
    threads: int,
    sections: int,
    lease: Optional[float],
    counter: str,
    long_every: int,
    long_sleep: float,
    results: Any,
) -> None:
    """`threads` threads each run `sections` read-modify-write sections under agent_lock.

    The shared record is ``"<count>,<last fence>"`` in a Redis key (or a file
    path in local mode). Inside the lock each section reads it, checks the
    fencing token rose, and writes count+1. Puts a dict of tallies on `results`.
    """
    _configure(settings)
    import mcp_redis

    store: Any = counter  # a file path in local mode
    if not counter.startswith("/"):
        import redis

        store = redis.Redis.from_url(settings["redis_url"], decode_responses=True)
    tallies = {"sections": 0, "fence_not_increasing": 0, "lost": 0, "errors": 0}
    guard = threading.Lock()

    def run() -> None:
        done = fence_bad = lost = errors = 0
        for i in range(sections):
            try:
                with mcp_redis.agent_lock(name, timeout=lease, blocking_timeout=None) as held:
                    raw = _read(store, counter)
                    count, last = (int(x) for x in raw.split(",")) if raw else (0, 0)
                    fence = held.fencing_token or 0
                    if fence <= last:
                        fence_bad += 1
                    if long_every and i % long_every == long_every - 1:
                        time.sleep(long_sleep)
                    _write(store, counter, f"{count + 1},{fence}")
                    lost += held.lost
                done += 1
            except Exception as exc:
                errors += 1
                if errors == 1:
                    import sys

                    print(f"mutex_worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        with guard:
            tallies["sections"] += done
            tallies["fence_not_increasing"] += fence_bad
            tallies["lost"] += lost
            tallies["errors"] += errors

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put(tallies)


def hold_forever(settings: Dict[str, Any], name: str, lease: float, ready: Any) -> None:
    """Take agent_lock(name) with lease `lease`, report, and hold until killed."""
    _configure(settings)
    import mcp_redis

    held = mcp_redis.agent_lock(name, timeout=lease, blocking_timeout=10)
    held.acquire()
    ready.put((os.getpid(), held.fencing_token))
    while True:
        time.sleep(60)


def wait_forever(settings: Dict[str, Any], name: str) -> None:
    """Queue for agent_lock(name) and wait until killed."""
    _configure(settings)
    import mcp_redis

    mcp_redis.agent_lock(name, blocking_timeout=None).acquire()
    while True:
        time.sleep(60)


def hold_then_fork(settings: Dict[str, Any], name: str, ready: Any) -> None:
    """Take agent_lock(name), fork a child that lives on, report both pids, hold until killed."""
    _configure(settings)
    import mcp_redis

    mcp_redis.agent_lock(name, blocking_timeout=10).acquire()
    child = os.fork()
    if child == 0:
        while True:  # the child outlives its parent, as a worker or helper process would
            time.sleep(60)
    ready.put((os.getpid(), child))
    while True:
        time.sleep(60)


def outage_worker(settings: Dict[str, Any], name: str, threads: int, sections: int, lease: float,
                  counter: str, results: Any) -> None:
    """`threads` threads each run `sections` read-modify-write sections of the file `counter`.

    Each section records (count it read, its fencing token, backend). Errors
    raised when leaving a block (a release that cannot reach Redis) are
    counted, not retried: the section already ran. Acquire errors are retried.
    """
    _configure(settings)
    import mcp_redis

    seen: List[Tuple[int, int, str]] = []
    tallies = {"exit_errors": 0, "acquire_errors": 0}
    guard = threading.Lock()

    def run() -> None:
        done = 0
        while done < sections:
            held = mcp_redis.agent_lock(name, timeout=lease, blocking_timeout=None)
            try:
                held.acquire()
            except Exception as exc:
                with guard:
                    tallies["acquire_errors"] += 1
                    if tallies["acquire_errors"] == 1:
                        import sys

                        print(f"outage_worker: {type(exc).__name__}: {exc}", file=sys.stderr)
                time.sleep(0.01)
                continue
            try:
                raw = _read(counter, "")
                count = int(raw) if raw else 0
                _write(counter, "", str(count + 1))
                with guard:
                    seen.append((count, held.fencing_token or 0, held.backend or "?"))
                done += 1
            finally:
                try:
                    held.release()
                except Exception:
                    with guard:
                        tallies["exit_errors"] += 1

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put((seen, tallies))


def try_lock(settings: Dict[str, Any], name: str, blocking_timeout: float, out: Any) -> None:
    """Try lock(name) once for `blocking_timeout` s; put (acquired, backend) on `out`."""
    _configure(settings)
    import mcp_redis

    held = mcp_redis.lock(name, timeout=5, blocking_timeout=blocking_timeout)
    got = held.acquire()
    out.put((got, held.backend))
    if got:
        held.release()
