"""A child forked while another thread of its parent held one of the library's
locks: its first call must not wait forever on a lock no thread of its own
holds (threads do not survive a fork; the lock's state does).

Each case holds one lock in a parent thread, forks, and runs in the child one
public call that takes that lock, under a 5 s alarm.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, Callable, Dict, Tuple

import pytest

import mcp_redis
from mcp_redis import compat, config
from mcp_redis.metrics import METRICS

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@mcp_redis.cached_metadata(ttl=60)
def _load(agent_id: str) -> Dict[str, str]:
    return {"agent_id": agent_id}


_BUS = mcp_redis.EventBus()


async def _take_async(agent_id: str) -> None:
    async with compat.StateLockManager().acquire_agent_lock_async(agent_id, timeout=2, max_retries=1):
        pass


def _give_back_granted(agent_id: str) -> None:
    """What a worker does for a grant no task will take: give it back (once)."""
    import concurrent.futures

    core = compat._Acquisition(compat.StateLockManager(), agent_id, 2.0, 1)
    granted: concurrent.futures.Future[bool] = concurrent.futures.Future()
    granted.set_result(core.attempt())
    compat._give_back(core, granted)

# name -> (the lock, read in the parent; the child's call that takes it)
CASES: Dict[str, Tuple[Callable[[], Any], Callable[[], Any]]] = {
    "metrics": (lambda: METRICS._lock, lambda: METRICS.inc("fork_safety_total")),
    "settings": (lambda: config._lock, lambda: mcp_redis.reset()),
    "cached function": (lambda: _load._lock, lambda: _load("agent-1")),
    "event bus": (lambda: _BUS._lock, lambda: _BUS.subscribe("fork-safety", lambda *a: None).close()),
    "compat limiter": (lambda: compat._rate_limiter_lock, lambda: compat.get_rate_limiter()),
    "compat pools": (lambda: compat._POOLS_LOCK, lambda: compat._pool("release")),
    "compat loop gates": (lambda: compat._GATES_LOCK, lambda: asyncio.run(_take_async("fork-gates"))),
    "compat given back": (lambda: compat._GIVEN_BACK_LOCK, lambda: _give_back_granted("fork-given-back")),
    "compat grants": (lambda: compat._GRANTS_LOCK, lambda: asyncio.run(_take_async("fork-grants"))),
}


def _fork_while_held(lock: Any, action: Callable[[], Any]) -> int:
    """The child's exit status: 0 when `action` returned, else the signal or code that ended it."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler: end a child that hangs
            signal.alarm(5)
            action()
            code = 0
        finally:
            os._exit(code)
    done.set()
    holder.join(10)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_child_forked_while_a_parent_thread_held_a_library_lock_does_not_hang(
        name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mcp_redis.settings().local_mode
    monkeypatch.chdir(tmp_path)  # the legacy lock files of local mode: ./data/locks
    lock_of, action = CASES[name]
    status = _fork_while_held(lock_of(), action)
    assert not os.WIFSIGNALED(status), f"{name}: the child hung (ended by signal {os.WTERMSIG(status)})"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{name}: the child failed ({status})"
