"""The Redis rate-limit backend: one Lua script per algorithm, one round trip per call.

The scripts (``mcp_redis/lua/ratelimit_*.lua``, from the client's
`ScriptSet`; redis-py reloads one the server lost) read the server clock
(``TIME``), check every limit, consume all or nothing and set each key's TTL
(at least 1 ms) in the same step. A limiter's keys share one hash tag, so a
call is one slot on a Cluster.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any, List, Optional, Tuple, Type, Union

import redis.exceptions

from ..connections import RedisConnection, scan_keys
from ..errors import BackendUnavailable
from ..keys import encode_id
from .algorithms import MODELS, Algorithm
from .base import NAMESPACE, Granted, Outcome, Policy, Reply

__all__ = ["RedisBackend"]

_new = tuple.__new__


class RedisBackend:
    """The rate-limit `Backend` over one Redis deployment (one per client: ``client.redis("rate_limits")``).

    Sliding-window log entries carry an 8-byte nonce unique per backend and
    call (4 random bytes, then a counter): a forked child builds its own
    backend (the client forgets its singletons), so it never reuses its
    parent's nonces.
    """

    name = "redis"
    errors: Tuple[Type[BaseException], ...] = (BackendUnavailable, redis.exceptions.RedisError)

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self._scripts = {a: conn.script(f"ratelimit_{a.value}") for a in MODELS}
        self._refunds = {a: conn.script(f"ratelimit_{a.value}_refund") for a in MODELS}
        self._caller = int.from_bytes(secrets.token_bytes(4), "big") << 32
        self._calls = itertools.count()

    def _nonce(self) -> bytes:
        """8 bytes, unique per backend and call: marks a call's sliding-window log entries."""
        return (self._caller | (next(self._calls) & 0xFFFFFFFF)).to_bytes(8, "big")

    def _run_once_marked(self, script: Any, keys: List[str], args: List[Any], at: int) -> Any:
        """`run_script`; after a failed attempt, ``args[at]`` (the nonce) gets a 9th byte.

        The policy may run this again with the same `args`: the marked nonce
        tells the sliding-window script that this call may have run already
        (its reply lost), so it looks for the call's entries before adding.
        """
        try:
            return self.conn.run_script(script, keys, args)
        except BaseException:
            args[at] = args[at][:8] + b"r"
            raise

    def acquire(self, policy: Policy, key: str, cost: int, consume: bool, now_us: Optional[int] = None) -> Reply:
        """One EVALSHA: the verdict and every limit's figures.

        `BackendUnavailable` when Redis stays unreachable after the
        connection's retry policy.
        """
        algorithm = policy.algorithm
        script = self._scripts[algorithm]
        # Few arguments on purpose: each costs the client ~1 us to pack.
        args: List[Union[int, str, bytes]] = [cost if consume else -cost, *policy.flat]
        nonce = None
        if algorithm is Algorithm.SLIDING_WINDOW:
            nonce = self._nonce()
            args.append(nonce)
            if now_us is not None:
                args.append(now_us)
            raw = self.conn.policy.call(self._run_once_marked, script, policy.keys_for(key), args, len(args) - 1
                                        - (now_us is not None))
        else:
            if now_us is not None:
                args.append(now_us)
            raw = self.conn.policy.call(self.conn.run_script, script, policy.keys_for(key), args)
        if type(raw) is int:
            # One limit, admitted: the script answered one integer (no text to format or parse).
            limit, window_us = policy.specs[0]
            if algorithm is Algorithm.SLIDING_WINDOW:
                remaining, reset = raw, window_us  # the newest entry is this hit's
            else:
                reset, remaining = divmod(raw, limit + 1)
                if algorithm is Algorithm.FIXED_WINDOW:
                    reset *= 1000  # the key's TTL, in ms
            reply = _new(Granted if nonce is not None else Reply, (True, -1, [_new(Outcome, (remaining, 0, reset))]))
            if nonce is not None:
                reply.ticket = nonce  # type: ignore[attr-defined]
            return reply
        f = raw.split()
        # Only an admitted sliding-window hit carries a ticket (`Granted`): the
        # nonce naming its log entries, for a refund.
        cls = Granted if nonce is not None and f[0] == "1" else Reply
        # _new(Reply, (...)) is Reply(...) without the generated __new__'s
        # Python frame (~0.2 us of a call's ~4 us client time).
        if len(f) == 5:  # one limit, the common case
            reply = _new(cls, (f[0] == "1", int(f[1]) - 1, [_new(Outcome, (int(f[2]), int(f[3]), int(f[4])))]))
        else:
            n = [int(x) for x in f]
            reply = _new(cls, (n[0] == 1, n[1] - 1,
                               [_new(Outcome, (n[j], n[j + 1], n[j + 2])) for j in range(2, len(n), 3)]))
        if cls is Granted:
            reply.ticket = nonce  # type: ignore[attr-defined]
        return reply

    def refund(self, policy: Policy, key: str, cost: int, reply: Reply, elapsed_us: int) -> bool:
        """One EVALSHA of ``ratelimit_<algorithm>_refund.lua`` (see each script for its rule)."""
        args: List[Union[int, str, bytes]] = [cost]
        for (limit, window), outcome in zip(policy.specs, reply.outcomes):
            args += [limit, window, outcome.reset_after_us]
        args.append(max(0, elapsed_us))
        if policy.algorithm is Algorithm.SLIDING_WINDOW:
            nonce = getattr(reply, "ticket", None)
            if nonce is None:
                return False
            args.append(nonce)
        # One attempt, never retried: a refund whose reply was lost may have
        # run, and a counter's refund run twice would give back units the
        # call never took (over-admission). Unanswered, the caller is told
        # False (the units stay consumed, or were given back once).
        done = self.conn.policy.call(self.conn.run_script, self._refunds[policy.algorithm], policy.keys_for(key),
                                     args, attempts=1)
        return int(done) > 0

    def clear(self, policy: Policy, key: str) -> None:
        """Delete the key's keys (one slot: they share a hash tag)."""
        self.conn.call(self.conn.client.delete, *policy.keys_for(key))

    def clear_all(self, policy: Policy) -> None:
        """Delete every key of the limiter (SCAN by its name, then DEL key by key: slots differ)."""
        pattern = f"{policy.keyspace.prefix}{NAMESPACE}:{{{encode_id(policy.name)}:*"
        client = self.conn.client
        for found in scan_keys(self.conn, pattern, f"RateLimiter({policy.name!r}).clear_all()", count=500):
            self.conn.call(client.delete, found)
