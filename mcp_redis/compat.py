"""Drop-in replacements for the legacy server's helpers (CIRWEL/unitares).

`StateLockManager` is the legacy ``src/state_locking.py`` class: same
constructor, same ``acquire_agent_lock(agent_id, timeout=5.0,
max_retries=3)`` (sync) and ``acquire_agent_lock_async(...)`` (``async
with``), same waits (`timeout` per attempt, `max_retries` attempts, backoff
0.2 s, 0.4 s, ... between them, then `TimeoutError`), not reentrant, and the
``as`` target is None as in the legacy API. Call sites do not change.

Which lock it takes follows the library's ``locks`` mode:

* ``local``: the lock of ``mcp_redis.agent_lock(agent_id)`` (its host-local
  file) and then the legacy lock file ``<lock_dir>/<agent_id>.lock`` with the
  legacy contents (`locks.legacyfile`), so compat, `agent_lock` and legacy
  processes on one host all exclude each other;
* every other mode: the lock of ``mcp_redis.agent_lock(agent_id)`` (same key,
  so compat and `agent_lock` exclude each other), auto-renewed while held,
  but never reentrant.

The async variant runs the same synchronous core: each blocking call runs
in a worker thread (a pool of this module, per process), the event loop only
awaits. Ownership belongs to the acquisition, not the thread, so the task
that entered can leave from whichever worker runs its release; two tasks
exclude each other like two threads; a task cancelled while it waits leaves
nothing held (a grant that lands after the cancellation is given back at
once, by the worker).

`RateLimiter` and `get_rate_limiter` replace the legacy per-agent request
limiter (``src/rate_limiter.py``: 60 requests a minute and 1,000 an hour)
with its surface and messages, counted once for every process that shares
the Redis deployment. `kg_store_rate_limited` reproduces the legacy
``kg_store`` check of ``KnowledgeGraphAGE.add_discovery`` (20 stores per
agent per sliding hour, `ValueError` with the legacy message, a failed
store gives its slot back). See docs/migration.md, "Rate limits".
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from asyncio.events import _get_running_loop
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Type, TypeVar, Union

from .client import Client, resolve
from .config import Mode
from .errors import InvalidArgument, InvalidArgumentType, LockNotOwned, RateLimitExceeded
from .keys import validate_id
from .locks import DistributedLock, _check_seconds, _in_event_loop
from .locks.legacyfile import LegacyFileLock, clean_stale
from .ratelimit import KeyArg, Limit, _key_getter, rate_limited
from .ratelimit import RateLimiter as _Limiter
from .ratelimit.limits import MAX_LIMIT, _check_int

__all__ = ["KgStoreRateLimitExceeded", "RateLimiter", "StateLockManager", "get_rate_limiter",
           "is_process_alive", "kg_store_rate_limited"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("mcp_redis.locks")

#: Pause before attempt n+1 (s): ``BACKOFF * 2**n``, the legacy schedule.
BACKOFF = 0.2
#: Extra pause after the cleanup removed a stale lock file (s), as in the legacy manager.
CLEANED_PAUSE = 0.2


def is_process_alive(pid: int) -> bool:
    """True when a process `pid` exists (signal 0), as the legacy helper."""
    try:
        os.kill(pid, 0)
        return True
    except (OSError, ProcessLookupError, OverflowError):
        return False


def _check_file_name(agent_id: str, lock_dir: Path) -> None:
    """Local mode: ``<agent_id>.lock`` must be one file name in `lock_dir`, as the legacy server
    names it (no '/', NUL, '.' or '..'; encodable in the file system's encoding; within its
    name length limit), else InvalidArgument("agent_id") before anything is touched."""
    if "/" in agent_id or "\x00" in agent_id or agent_id in (".", ".."):
        raise InvalidArgument("agent_id", "must name a file in lock_dir (no '/', NUL, '.' or '..') in local mode")
    try:
        size = len(os.fsencode(f"{agent_id}.lock"))
    except UnicodeEncodeError:
        raise InvalidArgument("agent_id", "must be encodable as a file name in local mode "
                                          "(a lone surrogate is not)") from None
    try:
        limit = os.pathconf(lock_dir, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if size > limit:
        raise InvalidArgument("agent_id", f"makes a lock file name of {size} bytes in local mode; "
                                          f"lock_dir's file system allows {limit}")


class _AgentLock(DistributedLock):
    """`agent_lock`'s lock (same key), not reentrant, auto-renewed, owned by the acquisition."""

    _namespace = "agent-lock"


class _Acquisition:
    """One acquire call of the compat manager: the synchronous core of both variants."""

    __slots__ = ("manager", "agent_id", "timeout", "max_retries", "_file", "_lock")

    def __init__(self, manager: StateLockManager, agent_id: str, timeout: object, max_retries: object) -> None:
        self.manager = manager
        self.agent_id = validate_id(agent_id, "agent_id")
        wait = _check_seconds(timeout, "timeout", allow_none=False, allow_zero=True)
        assert wait is not None
        self.timeout = wait
        if isinstance(max_retries, bool) or not isinstance(max_retries, int):
            raise InvalidArgumentType("max_retries", f"must be an int, not {type(max_retries).__name__}")
        if not 1 <= max_retries <= 100:
            raise InvalidArgument("max_retries", f"must be between 1 and 100, got {max_retries!r}")
        self.max_retries = max_retries
        self._file: Optional[LegacyFileLock] = None
        if resolve(None).mode("locks") is Mode.LOCAL:
            _check_file_name(self.agent_id, manager.lock_dir)
            self._file = LegacyFileLock(manager.lock_dir, self.agent_id)
        # agent_lock's own lock in every mode (in local mode as well as the legacy
        # file): compat and agent_lock call sites exclude each other everywhere.
        self._lock: _AgentLock = _AgentLock(self.agent_id, blocking_timeout=wait, thread_local=False,
                                             auto_renew=True, reentrant=False, _argument="agent_id")

    @property
    def lock_file(self) -> Path:
        return Path(self.manager.lock_dir) / f"{self.agent_id}.lock"

    def clean(self) -> bool:
        """The legacy stale-lock cleanup, in local mode only; never raises (as legacy)."""
        if self._file is None or not self.manager.auto_cleanup_stale:
            return False
        try:
            return bool(self.manager._check_and_clean_stale_lock(self.lock_file))
        except Exception:
            return False

    def attempt(self, wait: Optional[float] = None) -> bool:
        """One attempt: wait up to `wait` (default `timeout`) seconds; True once held.

        In local mode: agent_lock's lock, then the legacy file in the time
        left (always in that order, so no two call sites wait on each other
        in a cycle; legacy processes take the file alone).
        """
        wait = self.timeout if wait is None else wait
        started = time.monotonic()
        if not self._lock.acquire(blocking_timeout=wait):
            return False
        if self._file is None:
            return True
        try:
            if self._file.try_for(max(0.0, wait - (time.monotonic() - started))):
                return True
        except BaseException:
            self._lock.release()
            raise
        self._lock.release()
        return False

    def between(self, attempt: int) -> float:
        """After failed attempt `attempt` (not the last): clean up, and the pause to take."""
        return (CLEANED_PAUSE if self.clean() else 0.0) + BACKOFF * float(2 ** attempt)

    def timed_out(self) -> TimeoutError:
        return TimeoutError(
            f"Lock timeout for agent {self.agent_id!r} after {self.max_retries} attempts of "
            f"{self.timeout}s. Another process may be updating this agent."
        )

    def release(self) -> None:
        """Give the lock back; `LockNotOwned` (redis mode) when its lease was lost meanwhile."""
        try:
            if self._file is not None:
                self._file.release()
        finally:
            self._lock.release()

    def leave(self, failed: bool) -> None:
        """Release at the end of the block: a lost lock raises `LockNotOwned`, unless
        the block itself failed (then it is logged, and the block's error goes on)."""
        try:
            self.release()
        except LockNotOwned:
            if not failed:
                raise
            log.warning("compat: lock of agent %r was no longer owned when its block failed", self.agent_id)


class _SyncAgentLock:
    """``with manager.acquire_agent_lock(...)``: blocks the calling thread."""

    __slots__ = ("_core",)

    def __init__(self, core: _Acquisition) -> None:
        self._core = core

    def __enter__(self) -> None:
        core = self._core
        if _get_running_loop() is not None:
            raise _in_event_loop(core.agent_id)
        core.clean()
        for attempt in range(core.max_retries):
            if core.attempt():
                return None
            if attempt < core.max_retries - 1:
                time.sleep(core.between(attempt))
        raise core.timed_out()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc_value: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._core.leave(exc_type is not None)


# Worker threads of the async variant, per process (a forked child makes its own):
# waits in one pool, releases in another, so waiting tasks never delay a release.
_POOLS: Dict[str, Tuple[int, concurrent.futures.ThreadPoolExecutor]] = {}
_POOLS_LOCK = threading.Lock()
_POOL_SIZES = {"wait": 256, "release": 8}


def _pool(kind: str) -> concurrent.futures.ThreadPoolExecutor:
    entry = _POOLS.get(kind)
    if entry is None or entry[0] != os.getpid():
        with _POOLS_LOCK:
            entry = _POOLS.get(kind)
            if entry is None or entry[0] != os.getpid():
                pool = concurrent.futures.ThreadPoolExecutor(_POOL_SIZES[kind], f"mcp_redis-compat-{kind}")
                entry = _POOLS[kind] = (os.getpid(), pool)
    return entry[1]


# The tasks of one event loop waiting for one agent queue here, in asyncio (FIFO), and only the
# first of them waits in a worker thread: hundreds of tasks on one busy agent hold one thread,
# not the pool that every other agent's tasks need. Per loop, by agent.
class _Gate:
    """One agent's queue on one loop: held by the task whose attempt runs in a worker thread,
    handed to the next waiter in order when that attempt ends (never free in between, so a
    newcomer cannot pass the queue); a waiter waits within its own time."""

    __slots__ = ("held", "waiters", "current")

    def __init__(self) -> None:
        self.held = False
        self.waiters: Deque[asyncio.Future[None]] = collections.deque()
        # The holder's attempt in its worker thread, until the loop hears it ended.
        self.current: Optional[Tuple[concurrent.futures.Future[bool], _Acquisition]] = None

    async def enter(self, loop: asyncio.AbstractEventLoop, wait: float) -> bool:
        """True once this task holds the gate; False when `wait` seconds ran out first."""
        if not self.held and not self.waiters:
            self.held = True
            return True
        turn: asyncio.Future[None] = loop.create_future()
        self.waiters.append(turn)
        try:
            # asyncio.wait, not wait_for: before Python 3.12 wait_for could return the result and
            # drop a cancellation that arrived with it, and the cancelled task would enter.
            await asyncio.wait((turn,), timeout=wait)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.leave()  # handed to this task as it was cancelled: on to the next
            else:
                self._drop(turn)
            raise
        if turn.done():
            return True
        self._drop(turn)
        return False

    def leave(self) -> None:
        """Hand the gate to the next waiter still waiting, else free it."""
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.held = False

    def _drop(self, turn: asyncio.Future[None]) -> None:
        turn.cancel()
        try:
            self.waiters.remove(turn)
        except ValueError:
            pass

    def idle(self) -> bool:
        return not self.held and not self.waiters


_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dict[str, _Gate]] = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()  # loops of several threads add themselves; each loop's gates are its own


def _loop_gates(loop: asyncio.AbstractEventLoop) -> Dict[str, _Gate]:
    """`loop`'s gates by agent. A loop seen for the first time first forgets the gates of loops
    closed with tasks still queued (their futures keep the loop alive, so the weak keys alone
    would not), giving back each grant no task will take: one made while its loop was stopped,
    whose loop was then closed without cancelling its tasks."""
    gates = _GATES.get(loop)
    if gates is not None:
        return gates
    with _GATES_LOCK:
        closed = [(lp, _GATES.pop(lp)) for lp in list(_GATES) if lp.is_closed()]
        gates = _GATES.setdefault(loop, {})
    for _, abandoned in closed:
        for gate in abandoned.values():
            if gate.current is not None:
                in_thread, core = gate.current
                in_thread.add_done_callback(_give_back_later(core))
    return gates


async def _through_gate(loop: asyncio.AbstractEventLoop, core: _Acquisition,
                        attempt: Callable[[float], concurrent.futures.Future[bool]]) -> Optional[asyncio.Future[bool]]:
    """Queue behind this loop's other tasks waiting for `core`'s agent (within its `timeout`),
    then start `attempt(deadline)` in a worker thread (`time.monotonic()` deadline: time queued
    for a thread counts too), whose future is returned (None: the time ran out in the queue).
    The gate passes on when the worker's attempt ends (not when the task stops waiting for it:
    a cancelled task's worker still waits, and holds the agent's turn); a grant made after the
    loop closed is given back by the worker."""
    agent_id, wait = core.agent_id, core.timeout
    gates = _loop_gates(loop)
    gate = gates.get(agent_id)
    if gate is None:
        gate = gates[agent_id] = _Gate()
    deadline = loop.time() + wait

    def forget_if_idle() -> None:
        if gate.idle() and gates.get(agent_id) is gate:
            del gates[agent_id]

    try:
        entered = await gate.enter(loop, wait)
    finally:
        forget_if_idle()
    if not entered:
        return None
    try:
        in_thread = attempt(time.monotonic() + max(0.0, deadline - loop.time()))
    except BaseException:
        gate.leave()
        forget_if_idle()
        raise
    gate.current = (in_thread, core)

    def pass_on() -> None:
        gate.current = None
        gate.leave()
        forget_if_idle()

    def ended(done: concurrent.futures.Future[bool]) -> None:  # in the worker thread
        if _granted(done):
            _await_claim(done, loop, core)
        try:
            loop.call_soon_threadsafe(pass_on)
        except RuntimeError:  # the loop is closed: no task will take or release this grant
            _give_back(core, done)

    in_thread.add_done_callback(ended)
    return asyncio.wrap_future(in_thread)


def _give_back_later(core: _Acquisition) -> Callable[[concurrent.futures.Future[bool]], None]:
    """A done-callback giving back, in a release worker, a grant no task will take."""
    def callback(future: concurrent.futures.Future[bool]) -> None:
        _pool("release").submit(_give_back, core, future)

    return callback


def _attempt_by(core: _Acquisition, deadline: float, attempt_no: int, pauses: List[float]) -> bool:
    """In a worker thread: attempt `attempt_no`, waiting until `deadline` (`time.monotonic()`).
    The first runs the legacy stale-lock cleanup first (in the agent's turn, not one thread
    each); a failed one but the last runs `between` (that cleanup again, in this same thread:
    not a task of its own behind a full pool) and leaves the pause to take in `pauses`."""
    if not attempt_no:
        core.clean()
    got = core.attempt(max(0.0, deadline - time.monotonic()))
    if not got and attempt_no < core.max_retries - 1:
        pauses.append(core.between(attempt_no))
    return got


# How long past its deadline an attempt may still wait for a worker thread to pick it up: a free
# worker takes it within microseconds (so a `timeout=0` attempt still runs), a saturated pool not.
_PICKUP_GRACE = 0.05


async def _result_by(pending: asyncio.Future[bool], in_thread: concurrent.futures.Future[bool],
                     deadline: float) -> bool:
    """The attempt's result. An attempt still queued for a worker thread (every worker busy with
    other agents) when its `deadline` (`time.monotonic()`) has passed is cancelled before it runs
    (False, nothing taken), so the task's `timeout` bounds its wait for a thread too."""
    remaining = deadline - time.monotonic() + _PICKUP_GRACE
    done, _ = await asyncio.wait((pending,), timeout=max(0.0, remaining))
    if not done and in_thread.cancel():
        return False
    return await pending


def _granted(future: concurrent.futures.Future[bool]) -> bool:
    """Whether a finished attempt took the lock."""
    return not future.cancelled() and future.exception() is None and future.result()


# Grants waiting for their task to take them (`_claim`) as it resumes. The claims thread gives
# back a grant whose loop is not running `_CLAIM_GRACE` seconds after it was made: a loop stopped
# and never run again (nor closed) would otherwise keep the agent locked, renewed, for the life of
# the process. Its task, if the loop ever runs again, finds the grant gone and tries again.
_CLAIM_GRACE = 1.0
_GRANTS: Dict[concurrent.futures.Future[bool], Tuple[float, asyncio.AbstractEventLoop, _Acquisition]] = {}
_GRANTS_LOCK = threading.Lock()
_CLAIMS_THREAD: List[Any] = [0, None]  # [pid, thread], under _GRANTS_LOCK; None: not running


def _await_claim(future: concurrent.futures.Future[bool], loop: asyncio.AbstractEventLoop,
                 core: _Acquisition) -> None:
    """In the worker that got the grant, before its loop hears of it."""
    with _GRANTS_LOCK:
        _GRANTS[future] = (time.monotonic() + _CLAIM_GRACE, loop, core)
        if _CLAIMS_THREAD[1] is None or _CLAIMS_THREAD[0] != os.getpid():
            thread = threading.Thread(target=_watch_claims, name="mcp_redis-compat-claims", daemon=True)
            _CLAIMS_THREAD[:] = [os.getpid(), thread]
            thread.start()


def _claim(future: concurrent.futures.Future[bool]) -> bool:
    """In the task, its grant in hand: True while the grant is still its own (not given back)."""
    with _GRANTS_LOCK:
        return _GRANTS.pop(future, None) is not None


def _watch_claims() -> None:
    """The claims thread: runs while grants wait for their tasks. (It keeps no reference to a
    grant between looks: a grant's future holds its loop, which a closed loop's owner may drop.)"""
    while _give_back_abandoned(time.monotonic()):
        time.sleep(_CLAIM_GRACE / 4)


def _give_back_abandoned(now: float) -> bool:
    """Give back the grants whose loop is not running past their grace; False once none waits."""
    with _GRANTS_LOCK:
        abandoned = [(future, core) for future, (at, loop, core) in _GRANTS.items()
                     if at <= now and not loop.is_running()]
        for future, _ in abandoned:
            del _GRANTS[future]
        waiting = bool(_GRANTS)
        if not waiting:
            _CLAIMS_THREAD[1] = None  # the next grant starts another
    for future, core in abandoned:
        log.warning("compat: the lock of agent %r was granted to a task whose event loop is not running "
                    "(stopped, or closed); given back", core.agent_id)
        _give_back(core, future)
    return waiting


_GIVEN_BACK: weakref.WeakSet[concurrent.futures.Future[bool]] = weakref.WeakSet()
_GIVEN_BACK_LOCK = threading.Lock()


def _give_back(core: _Acquisition, future: concurrent.futures.Future[bool]) -> None:
    """For an attempt no task will take (cancelled, or its loop closed or not running): release
    its grant, once."""
    if not _granted(future):
        return
    with _GRANTS_LOCK:
        _GRANTS.pop(future, None)
    with _GIVEN_BACK_LOCK:
        if future in _GIVEN_BACK:
            return
        _GIVEN_BACK.add(future)
    try:
        core.release()
    except Exception:  # lost meanwhile: nothing left to give back
        pass


class _AsyncAgentLock:
    """``async with manager.acquire_agent_lock_async(...)``: the loop only awaits."""

    __slots__ = ("_core",)

    def __init__(self, core: _Acquisition) -> None:
        self._core = core

    async def __aenter__(self) -> None:
        core = self._core
        loop = asyncio.get_running_loop()
        started: List[concurrent.futures.Future[bool]] = []
        deadlines: List[float] = []
        pauses: List[float] = []

        def attempt(deadline: float) -> concurrent.futures.Future[bool]:
            future = _pool("wait").submit(_attempt_by, core, deadline, attempt_no, pauses)
            started.append(future)
            deadlines.append(deadline)
            return future

        for attempt_no in range(core.max_retries):
            started.clear()
            deadlines.clear()
            pauses.clear()
            try:
                pending = await _through_gate(loop, core, attempt)
                # None: its time ran out in the queue.
                got = False if pending is None else await _result_by(pending, started[0], deadlines[0])
            except asyncio.CancelledError:
                for in_thread in started:  # a grant made after the cancel is given back, by a worker
                    in_thread.add_done_callback(_give_back_later(core))
                raise
            if got and _claim(started[0]):  # (not given back while the loop was not running)
                return None
            if attempt_no < core.max_retries - 1:
                # The worker's `between`; none when the attempt never ran (dropped unrun, or its
                # time ran out in the queue): the plain backoff, its cleanup left to the next.
                await asyncio.sleep(pauses[0] if pauses else BACKOFF * float(2 ** attempt_no))
        raise core.timed_out()

    async def __aexit__(self, exc_type: Optional[Type[BaseException]], exc_value: Optional[BaseException],
                        traceback: Optional[TracebackType]) -> None:
        future = _pool("release").submit(self._core.leave, exc_type is not None)
        await asyncio.shield(asyncio.wrap_future(future))


class StateLockManager:
    """The legacy agent-state lock manager (CIRWEL/unitares ``src/state_locking.py``).

    `lock_dir` (default ``./data/locks``, the legacy ``<project root>/data/locks``
    when the server runs from its root) is created as in the legacy class;
    the lock files live there in local mode. `auto_cleanup_stale` runs the
    legacy stale-lock-file cleanup before and between attempts (local mode;
    elsewhere there are no lock files and a dead holder's lock is freed by
    the backend). `stale_threshold` is kept as an attribute; the cleanup never
    needs it (a held lock file is never stale, an unheld one always is).
    """

    def __init__(self, lock_dir: Optional[Union[str, os.PathLike[str]]] = None,
                 auto_cleanup_stale: bool = True, stale_threshold: float = 60.0) -> None:
        self.lock_dir = Path.cwd() / "data" / "locks" if lock_dir is None else Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.auto_cleanup_stale = auto_cleanup_stale
        self.stale_threshold = stale_threshold

    def __repr__(self) -> str:
        return f"StateLockManager(auto_cleanup_stale={self.auto_cleanup_stale})"

    #: The legacy module's `is_process_alive(pid)`, also reachable from the class
    #: (``manager.is_process_alive(pid)``, ``StateLockManager.is_process_alive(pid)``).
    is_process_alive = staticmethod(is_process_alive)

    def _check_and_clean_stale_lock(self, lock_file: Path) -> bool:
        """Remove `lock_file` when no process holds it; True if removed (legacy helper).

        Works on the file whatever the backend (a held file is never removed).
        """
        return clean_stale(Path(lock_file))

    def acquire_agent_lock(self, agent_id: str, timeout: float = 5.0, max_retries: int = 3) -> _SyncAgentLock:
        """A context manager holding `agent_id`'s lock (``as`` target: None).

        `timeout`: the wait of one attempt (s); `max_retries` attempts with
        the legacy backoff between them, then `TimeoutError`. Not reentrant:
        a nested acquire of the same agent waits like any other caller.
        """
        return _SyncAgentLock(_Acquisition(self, agent_id, timeout, max_retries))

    def acquire_agent_lock_async(self, agent_id: str, timeout: float = 5.0,
                                 max_retries: int = 3) -> _AsyncAgentLock:
        """The same lock as an async context manager; the event loop never blocks."""
        return _AsyncAgentLock(_Acquisition(self, agent_id, timeout, max_retries))


# -- the request limiter ------------------------------------------------------------
class RateLimiter:
    """The legacy per-agent request limiter, shared: both limits in one atomic call, exact across processes.

    `check_rate_limit(agent_id)` returns ``(allowed, message)`` with the
    legacy messages; a refused request is not counted (as in the legacy
    code). Underneath is one `mcp_redis.RateLimiter` named `name`, sliding
    window, limits ``minute`` (60 s) and ``hour`` (3,600 s) checked and
    consumed together in one call of the backend in force (Redis: one Lua
    script; every key with a TTL). When that backend does not answer, the
    client's ``rate_limit_fallback`` applies (default: this process's own
    count). Every instance with the same `name` shares one count per agent,
    so give limiters with other limits their own name. The legacy class's
    private ``request_history`` does not exist: the history lives in the
    backend.
    """

    def __init__(self, max_requests_per_minute: int = 60, max_requests_per_hour: int = 1000, *,
                 name: str = "requests", client: Optional[Client] = None) -> None:
        self.max_per_minute = _check_int(max_requests_per_minute, "max_requests_per_minute", maximum=MAX_LIMIT)
        self.max_per_hour = _check_int(max_requests_per_hour, "max_requests_per_hour", maximum=MAX_LIMIT)
        self.limiter = _Limiter(name, limits=[Limit(self.max_per_minute, 60, "minute"),
                                              Limit(self.max_per_hour, 3600, "hour")], client=client)

    def __repr__(self) -> str:
        return (f"compat.RateLimiter({self.limiter.name!r}, {self.max_per_minute}/minute, "
                f"{self.max_per_hour}/hour)")

    def check_rate_limit(self, agent_id: str) -> Tuple[bool, Optional[str]]:
        """Count one request of `agent_id` if both limits allow it: ``(True, None)``, else ``(False, message)``."""
        result = self.limiter.hit(validate_id(agent_id, "agent_id"))
        if result.allowed:
            return True, None
        if result.backend == "closed":
            return False, (f"Rate limit check unavailable (failing closed). "
                           f"Retry in {max(1, round(result.retry_after))} seconds.")
        minute, hour = result.statuses
        if minute.remaining <= 0:
            return False, (f"Rate limit exceeded: {self.max_per_minute - minute.remaining}/{self.max_per_minute} "
                           f"requests per minute. Wait a few seconds and retry.")
        return False, (f"Rate limit exceeded: {self.max_per_hour - hour.remaining}/{self.max_per_hour} "
                       f"requests per hour. Please reduce request frequency.")

    def get_stats(self, agent_id: str) -> Dict[str, int]:
        """The legacy figures of `agent_id` (a peek: counts nothing)."""
        minute, hour = self.limiter.peek(validate_id(agent_id, "agent_id")).statuses
        last_minute = max(0, self.max_per_minute - minute.remaining)
        last_hour = max(0, self.max_per_hour - hour.remaining)
        return {
            "requests_last_minute": last_minute,
            "requests_last_hour": last_hour,
            "limit_per_minute": self.max_per_minute,
            "limit_per_hour": self.max_per_hour,
            "remaining_minute": max(0, self.max_per_minute - last_minute),
            "remaining_hour": max(0, self.max_per_hour - last_hour),
        }

    def reset(self, agent_id: Optional[str] = None) -> None:
        """Forget `agent_id`'s requests, or every agent's when it is None (for every process sharing
        the backend). An empty or non-`str` id raises naming `agent_id`, and resets nothing (the
        legacy class took any falsy id for "every agent")."""
        if agent_id is None:
            self.limiter._reset_all()
        else:
            self.limiter.reset(validate_id(agent_id, "agent_id"))


_rate_limiter: Optional[RateLimiter] = None
_rate_limiter_lock = threading.Lock()


def get_rate_limiter() -> RateLimiter:
    """The process's request limiter (60/minute, 1,000/hour), created on first use."""
    global _rate_limiter
    with _rate_limiter_lock:
        if _rate_limiter is None:
            _rate_limiter = RateLimiter(max_requests_per_minute=60, max_requests_per_hour=1000)
        return _rate_limiter


def _after_fork_in_child() -> None:
    global _POOLS_LOCK, _rate_limiter_lock, _GATES_LOCK, _GIVEN_BACK_LOCK, _GRANTS_LOCK
    # A parent thread may have held them while forking (the pools themselves
    # are rebuilt per process: `_pool` checks the pid).
    _POOLS_LOCK = threading.Lock()
    _rate_limiter_lock = threading.Lock()
    _GATES_LOCK = threading.Lock()
    _GIVEN_BACK_LOCK = threading.Lock()
    _GRANTS_LOCK = threading.Lock()
    _GRANTS.clear()  # the parent's workers' grants: its tasks' to take
    _CLAIMS_THREAD[:] = [0, None]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- kg_store ---------------------------------------------------------------------
class KgStoreRateLimitExceeded(RateLimitExceeded, ValueError):
    """The legacy ``kg_store`` refusal: a `ValueError` (what the legacy handler catches) with its message.

    Also a `mcp_redis.RateLimitExceeded`, with its fields (``limit``,
    ``remaining``, ``retry_after``, ...).
    """

    def __init__(self, agent_id: str, limit: int, remaining: int, retry_after: float, reset_after: float) -> None:
        super().__init__("kg_store", limit, remaining, retry_after, reset_after)
        self.agent_id = agent_id
        stored = limit - max(0, remaining)
        self.args = (
            f"Rate limit exceeded: Agent '{agent_id}' has stored {stored} "
            f"discoveries in the last hour (limit: {limit}/hour). "
            f"This prevents knowledge graph poisoning flood attacks. "
            f"Please wait before storing more discoveries.",
        )

    def __str__(self) -> str:
        return str(self.args[0])


def kg_store_rate_limited(
    key: KeyArg = "agent_id",
    *,
    limit: int = 20,
    window: float = 3600.0,
    refund_on: Union[Type[BaseException], Tuple[Type[BaseException], ...]] = (Exception,),
    client: Optional[Client] = None,
) -> Callable[[F], F]:
    """`rate_limited` configured as the legacy ``kg_store`` check (sync or ``async def``).

    Limiter ``"kg_store"``, `limit` stores per agent per sliding `window`
    (exact, shared by every process), keyed by `key` (a parameter name or a
    callable, e.g. ``lambda self, discovery: discovery.agent_id``). Over the
    limit it raises `KgStoreRateLimitExceeded` (a `ValueError`) with the
    legacy message, and the function is not called. A call that raises one
    of `refund_on` (default: any `Exception`) gives its slot back, as the
    legacy check did by running in the store's transaction.
    """

    def decorate(fn: F) -> F:
        key_of = _key_getter(fn, key)

        def on_limited(error: RateLimitExceeded, *args: Any, **kwargs: Any) -> Any:
            raise KgStoreRateLimitExceeded(key_of(args, kwargs), error.limit, error.remaining, error.retry_after,
                                           error.reset_after) from None

        return rate_limited("kg_store", limit, window, key=key, on_limited=on_limited, refund_on=refund_on,
                            client=client)(fn)

    return decorate
