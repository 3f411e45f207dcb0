"""Key TTLs that follow a test's simulated clock.

The scripts take the time from ``now_us`` when a test passes it, and set
TTLs relative to it, but Redis counts those TTLs down on its real clock. A
test that moves its clock by minutes in a millisecond would see keys outlive
their windows by far (a sliding-window counter's first-window count tells
its window only modulo 4: it relies on its TTL), and a slow run would see
keys expire that the simulated clock still needs. `SimulatedTTLs` runs each
call at a simulated time, records the TTLs the call set, keeps the keys
alive in real time, and deletes a key once the simulated clock has passed its
TTL by `LATE_US`, as Redis may do late (expiry in whole ms, and only when a
key is next looked up or sampled).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, TypeVar

import redis

T = TypeVar("T")

#: How late (µs of simulated time) a key is deleted after its TTL has run out.
LATE_US = 3_000
#: The real TTL keys are kept alive with (ms); no script sets one within half of it.
KEPT_MS = 10**10


class SimulatedTTLs:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.ends: Dict[str, int] = {}  # key -> simulated µs its TTL runs out at

    def call(self, keys: Iterable[str], now: int, fn: Callable[[], T]) -> T:
        """fn() at simulated time `now` (µs), the state of `keys` expired as its TTLs say."""
        keys = list(keys)
        for key in keys:
            end = self.ends.get(key)
            if end is not None and now >= end + LATE_US:
                self.client.delete(key)
                del self.ends[key]
        started = time.monotonic()
        out = fn()
        # Read and stretched in one step: a short TTL cannot run out in between.
        pttls = self.client.eval(_GRAB, len(keys), *keys, KEPT_MS) if keys else []
        for key, pttl in zip(keys, pttls):
            if pttl == -2:  # gone (or never written)
                self.ends.pop(key, None)
                continue
            assert pttl != -1, f"{key} has no TTL"
            if pttl < KEPT_MS // 2:  # set by this call (else kept, KEEPTTL)
                # Counted down in real time since the call set it: never end early.
                self.ends[key] = now + pttl * 1000 + int((time.monotonic() - started) * 1e6)
        return out


# Each key's PTTL; a TTL a call set (under half of KEPT_MS) is stretched to KEPT_MS.
_GRAB = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key)
  if out[i] >= 0 and out[i] < tonumber(ARGV[1]) / 2 then redis.call('PEXPIRE', key, ARGV[1]) end
end
return out
"""
