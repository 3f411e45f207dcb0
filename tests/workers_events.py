"""Child-process bodies for the events tests (run with the spawn context)."""

from __future__ import annotations

import threading
from typing import Any, Dict, List

import mcp_redis
from mcp_redis.events import EventBus, EventStream

# Slots of a subscriber's shared stats array.
BEFORE, AFTER, ORDER_ERRORS, LAST_AFTER, RECONNECTS = range(5)


def pubsub_subscriber(url: str, prefix: str, channel: str, ready: Any, stop: Any, stats: Any) -> None:
    """Subscribe to `channel` and count events, checking publish order.

    Events are ``{"phase": 0 | 1, "seq": n}``: phase 0 (before the Redis
    restart) must arrive complete and in order (seq == count); phase 1
    (after) must arrive in increasing seq order and never before phase 0.
    """
    mcp_redis.configure(redis_url=url, key_prefix=prefix)

    def handler(event: Dict[str, Any]) -> None:
        phase, seq = event["phase"], event["seq"]
        if phase == 0:
            if seq != stats[BEFORE] or stats[AFTER]:
                stats[ORDER_ERRORS] += 1
            stats[BEFORE] += 1
        else:
            if stats[AFTER] and seq <= stats[LAST_AFTER]:
                stats[ORDER_ERRORS] += 1
            stats[LAST_AFTER] = seq
            stats[AFTER] += 1

    sub = EventBus().subscribe(channel, handler, timeout=30)
    ready.set()
    stop.wait(120)
    stats[RECONNECTS] = sub.reconnects
    sub.close()


def stream_victim(url: str, prefix: str, name: str, group: str, hold_after: int, batch: int,
                  holding: Any, acked_path: str) -> None:
    """Consume as consumer "victim"; block forever inside the handler after
    `hold_after` events (mid-batch, its batch unacked) until SIGKILLed.

    Every batch the library acked is appended to `acked_path` (one id a line).
    """
    mcp_redis.configure(redis_url=url, key_prefix=prefix)
    stream = EventStream(name, group, "victim", min_idle_ms=1000)
    seen = 0
    handled: List[str] = []
    forever = threading.Event()

    def handler(entry_id: str, event: Dict[str, Any]) -> None:
        nonlocal seen
        seen += 1
        if seen > hold_after:
            holding.set()
            forever.wait()  # killed here: this batch is read but not acked
        handled.append(entry_id)

    with open(acked_path, "a", encoding="utf-8") as out:
        while True:
            handled.clear()
            stream.process(handler, count=batch, block_ms=500, with_id=True)
            out.write("".join(i + "\n" for i in handled))  # process() has acked these
            out.flush()
