"""FIFO turns among the threads of one process that want the same lock.

The file backend polls ``flock``, which has no order: only the thread whose
turn it is polls. The Redis backend lets only the thread whose turn it is
wait in Redis (one pooled connection per lock and process, however many
threads wait), the others wait here, holding no connection.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Dict, Optional

__all__ = ["FairTurns"]


class _FairTurn:
    """FIFO turns among this client's threads for one lock (direct handoff).

    flock has no timed wait and no order, so without this a thread that
    releases and asks again would beat the threads sleeping between polls.
    Only the thread holding the turn polls the file (or waits in Redis).
    """

    __slots__ = ("held", "waiters", "users")

    def __init__(self) -> None:
        self.held = False
        self.waiters: Deque[threading.Event] = collections.deque()
        self.users = 0  # threads holding or waiting (the entry is dropped at 0)


class FairTurns:
    """The turns of every lock one backend uses (per client, so per process), by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: Dict[str, _FairTurn] = {}

    def take(self, name: str, deadline: Optional[float]) -> bool:
        """Wait for `name`'s turn until `deadline` (monotonic; None: forever); False if it passed."""
        with self._lock:
            turn = self._turns.get(name)
            if turn is None:
                turn = self._turns[name] = _FairTurn()
            turn.users += 1
            if not turn.held and not turn.waiters:
                turn.held = True
                return True
            event = threading.Event()
            turn.waiters.append(event)
        try:
            if event.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return True
        except BaseException:  # interrupted (a signal handler raised): neither keep nor lose a turn
            with self._lock:
                if event.is_set():
                    self._hand_on(name, turn)
                else:
                    turn.waiters.remove(event)
                    self._leave(name, turn)
            raise
        with self._lock:
            if event.is_set():  # handed over just as we gave up
                return True
            turn.waiters.remove(event)
            self._leave(name, turn)
        return False

    def pass_on(self, name: str) -> None:
        """Give `name`'s turn to the longest waiting thread (or free it)."""
        with self._lock:
            turn = self._turns.get(name)
            if turn is not None:
                self._hand_on(name, turn)

    def _hand_on(self, name: str, turn: _FairTurn) -> None:
        if turn.waiters:
            turn.waiters.popleft().set()  # stays held: the next thread owns it now
        else:
            turn.held = False
        self._leave(name, turn)

    def _leave(self, name: str, turn: _FairTurn) -> None:
        turn.users -= 1
        if turn.users <= 0 and self._turns.get(name) is turn:
            del self._turns[name]
