"""The file lock backend (``locks=local``): ``fcntl.flock`` on one file per lock.

The file also keeps the lock's fencing counter. flock has no timed wait and
no order, so the threads of one client take FIFO turns (`FairTurns`) and only
the thread holding the turn polls the file. The kernel frees a crashed
holder's lock, so a file left behind never blocks.

This module keeps the library's one process-level fork hook for locks: flock
belongs to the open file description, which a fork shares, so a child that
kept its copies of the lock-file fds would keep its parent's locks after the
parent died. Every lock-file fd is tracked in `_open_fds`; the hook closes the
child's copies (and holds the registry's lock across the fork, so no fd is
between being opened and being tracked). Everything else about locks that is
per process is per client, forgotten in a child by the client's own fork
handling.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from typing import TYPE_CHECKING, Optional, Set

from ..errors import ConfigurationError
from .base import Backend, Hold, LockKeys
from .turns import FairTurns

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["FileBackend"]


# Every lock-file fd this process has open. flock belongs to the open file
# description, which a fork shares: a child that kept its copies would keep
# its parent's locks after the parent died. The at-fork hook closes them.
_open_fds_lock = threading.Lock()
_open_fds: Set[int] = set()


class FileBackend(Backend):
    """``fcntl.flock`` on one file per lock; the file also keeps the fencing counter."""

    name = "local"

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._turns = FairTurns()

    @staticmethod
    def path(keys: LockKeys, lock_dir: Optional[str] = None) -> str:
        """The lock file of `keys` in `lock_dir` (default: the default client's)."""
        digest = hashlib.sha256(keys.lock.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        if lock_dir is None:
            from ..client import default_client

            lock_dir = default_client().settings.lock_dir
        directory = lock_dir
        return os.path.join(directory, f"mcp_redis-{digest}.lock")

    def _open(self, path: str) -> int:
        """Open the lock file; the fd is tracked so a forked child closes its copy.

        A directory that cannot be made or written is the operator's to fix:
        `ConfigurationError` naming MCP_REDIS_LOCK_DIR (not a bare OSError).
        """
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with _open_fds_lock:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
                _open_fds.add(fd)
        except OSError as exc:
            said = f"{type(exc).__name__}: {exc.strerror or exc}"
        else:
            return fd
        raise ConfigurationError(f"MCP_REDIS_LOCK_DIR (lock_dir): cannot use {os.path.dirname(path)!r} for lock "
                                 f"files ({said}); point it at a writable directory", variable="MCP_REDIS_LOCK_DIR")

    @staticmethod
    def _close(fd: int) -> None:
        with _open_fds_lock:
            _open_fds.discard(fd)
            os.close(fd)

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        path = self.path(keys, self.client.settings.lock_dir)
        if not self._turns.take(path, deadline):
            return None
        fd = -1
        try:
            fd = self._open(path)
            delay = 0.0005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                remaining = float("inf") if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    self._close(fd)
                    self._turns.pass_on(path)
                    return None
                # Another process holds it; flock has no timed wait: back off 0.5 ms -> 20 ms.
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.02)
            raw = os.pread(fd, 32, 0).strip()
            # Never below the clock in microseconds, as in Redis and PostgreSQL:
            # tokens of one name keep rising across backends and episodes.
            fence = max(int(raw) + 1 if raw.isdigit() else 0, time.time_ns() // 1000)
            os.pwrite(fd, b"%020d\n" % fence, 0)
        except BaseException:
            if fd >= 0:
                try:
                    self._close(fd)
                except OSError:
                    pass
            self._turns.pass_on(path)
            raise
        return Hold(self, keys, token, fence, lease, float("inf"), (fd, path))

    def release(self, hold: Hold) -> bool:
        fd, path = hold.handle
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._close(fd)
            self._turns.pass_on(path)
        return True

    def locked(self, keys: LockKeys) -> bool:
        fd = self._open(self.path(keys, self.client.settings.lock_dir))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            self._close(fd)  # closing drops the probe's lock too
        return False


def _close_inherited_fds() -> None:
    """In a forked child: close the parent's lock-file fds, leaving its flocks to it alone."""
    global _open_fds_lock
    # Another thread may have held the registry's lock at the fork: a new lock, no locking.
    for fd in list(_open_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _open_fds.clear()
    _open_fds_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _open_fds_lock.acquire(),
        after_in_parent=lambda: _open_fds_lock.release(),
        after_in_child=_close_inherited_fds,
    )
