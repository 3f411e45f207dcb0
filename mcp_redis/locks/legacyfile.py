"""The legacy server's lock files, for `mcp_redis.compat.StateLockManager` in local mode.

CIRWEL/unitares' ``StateLockManager`` takes ``fcntl.flock`` on
``<lock_dir>/<agent_id>.lock`` and writes ``{"pid", "timestamp",
"agent_id"}`` (JSON) into it. In local mode the compat manager takes exactly
that lock, with the same file contents, so a half-migrated host (some
processes on the legacy class, some on compat) still excludes.

One difference, on purpose: the legacy stale-lock cleanup unlinks a lock
file nobody holds, so a process that opened the file just before the unlink
locks an orphaned inode while the next one creates and locks a new file — two
holders (the legacy manager's lost updates). A `LegacyFileLock` therefore
checks, once it holds the flock, that its fd is still the file at the path,
and starts over if not; the cleanup can then run without harm.

The fds are tracked in `file._open_fds`, so a forked child closes its copies
and never keeps its parent's lock (see file.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from . import file as _file

__all__ = ["LegacyFileLock", "POLL_MAX", "clean_stale"]

#: The longest pause between two tries (s): the legacy manager polls every 0.1 s.
POLL_MAX = 0.1
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class LegacyFileLock:
    """One acquisition of ``<lock_dir>/<agent_id>.lock`` (legacy layout); not reentrant.

    Each object opens its own fd, so two objects exclude each other even in
    one thread (flock belongs to the open file description), as the legacy
    manager's nested acquire did.
    """

    __slots__ = ("path", "agent_id", "_fd")

    def __init__(self, lock_dir: Path, agent_id: str) -> None:
        self.path = str(Path(lock_dir) / f"{agent_id}.lock")
        self.agent_id = agent_id
        self._fd = -1

    def try_for(self, wait: float) -> bool:
        """Try for up to `wait` seconds; True once held (the file then names this process)."""
        deadline = time.monotonic() + wait
        delay = 0.001
        while True:
            if self._try_once():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)

    def _try_once(self) -> bool:
        with _file._open_fds_lock:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o644)
            _file._open_fds.add(fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:  # the legacy manager treats every IOError as "held"
                if exc.errno not in _BUSY and exc.errno is not None:
                    raise
                _file.FileBackend._close(fd)
                return False
            # Held; but a stale-lock cleanup may have unlinked the file since we opened it.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                _file.FileBackend._close(fd)  # closing drops the flock on the orphan
                return False
            info = {"pid": os.getpid(), "timestamp": time.time(), "agent_id": self.agent_id}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            try:
                _file.FileBackend._close(fd)
            except OSError:
                pass
            raise
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Unlock and close (the file stays, as in the legacy manager)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            _file.FileBackend._close(fd)


def clean_stale(path: Path) -> bool:
    """Remove the lock file at `path` when nobody holds it; True if removed.

    The legacy cleanup's answer for every case a live lock can be in: a held
    file is never removed, an unheld one always is (whatever its contents),
    and a file that cannot be opened is left alone. Removing it is harmless
    to a concurrent acquirer (see `LegacyFileLock`).
    """
    if not os.path.exists(path):
        return False
    try:
        fd = os.open(str(path), os.O_RDWR)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held by a live open file description: never stale
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return False  # unlinked and re-created since we opened it: that one may be held
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True
    finally:
        os.close(fd)
