"""The rate-limit backend protocol and the named types between the front and a backend.

The front (`mcp_redis.ratelimit`) turns a limiter and the settings in force
into a `Policy` (once per settings), then asks the backend of the client's
mode one question per call, `acquire`: "may `cost` units of `key` pass every
limit of `policy` now, and if so consume them all". Every backend answers
with the same `Reply`, all or nothing; times are integer microseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Type

from ..keys import KeySpace

if TYPE_CHECKING:
    from .algorithms import Algorithm

__all__ = ["Backend", "Granted", "Outcome", "Policy", "Reply", "Spec", "NAMESPACE", "granted"]

#: The key namespace of rate limits: ``<prefix>ratelimit:{<name>:<key>}#<alg>_<window us>``.
NAMESPACE = "ratelimit"


class Spec(NamedTuple):
    """One limit as a backend sees it: `limit` units per `window_us` microseconds."""

    limit: int
    window_us: int


class Outcome(NamedTuple):
    """One limit's figures after a call, in microseconds."""

    remaining: int
    retry_after_us: int
    reset_after_us: int


class Reply(NamedTuple):
    """A backend's answer: the verdict, the index of the refusing limit (-1: none) and every limit's figures."""

    allowed: bool
    refused: int
    outcomes: List[Outcome]


class Granted(Reply):
    """An admitted hit's `Reply` that also names what the call took, for `Backend.refund`.

    `ticket` is an attribute, not a tuple field, so a `Granted` equals the
    plain `Reply` with the same figures: the sliding-window log entries'
    nonce (Redis), or the backend's clock reading of the hit (in-process,
    PostgreSQL). Backends whose refund needs no ticket return a plain `Reply`.
    """

    ticket: Any


def granted(reply: Reply, ticket: Any) -> Granted:
    """`reply` as a `Granted` carrying `ticket`."""
    out: Granted = tuple.__new__(Granted, reply)
    out.ticket = ticket
    return out


class Policy(NamedTuple):
    """What one limiter asks, fixed for the settings in force (built once per settings by the front).

    `flat` and `keys_for` are the Redis backend's wire form, precomputed so a
    call formats nothing: the limits as strings, and the Redis keys of a
    rate-limit key (one hash slot: the ids form the tag; a bounded memo).
    """

    algorithm: Algorithm
    name: str
    specs: Tuple[Spec, ...]
    flat: Tuple[str, ...]
    keyspace: KeySpace
    suffixes: Tuple[str, ...]
    redis_keys: Dict[str, List[str]]

    @classmethod
    def of(cls, algorithm: Algorithm, name: str, specs: Sequence[Spec], keyspace: KeySpace) -> Policy:
        """The policy of limiter `name` running `algorithm` over `specs`, its keys in `keyspace`."""
        specs = tuple(Spec(*spec) for spec in specs)
        return cls(
            algorithm=algorithm,
            name=name,
            specs=specs,
            flat=tuple(str(x) for spec in specs for x in spec),
            keyspace=keyspace,
            suffixes=tuple(f"{algorithm.short}_{spec.window_us}" for spec in specs),
            redis_keys={},
        )

    def keys_for(self, key: str) -> List[str]:
        """The Redis keys of `key`'s limits (memoised, at most 4,096 keys)."""
        keys = self.redis_keys.get(key)
        if keys is None:
            if len(self.redis_keys) >= 4096:
                self.redis_keys.clear()
            keys = [self.keyspace.key(NAMESPACE, self.name, key, tag=True, suffix=x) for x in self.suffixes]
            self.redis_keys[key] = keys
        return keys


class Backend(Protocol):
    """The verbs every rate-limit backend offers (Redis, PostgreSQL, in-process memory).

    `name` labels results and metrics (``"redis"``, ``"postgres"``,
    ``"local"``); `errors` are the exceptions meaning "this backend did not
    answer", on which the front applies the fallback setting (empty for the
    in-process backend, which always answers).
    """

    name: str
    errors: Tuple[Type[BaseException], ...]

    def acquire(self, policy: Policy, key: str, cost: int, consume: bool, now_us: Optional[int] = None) -> Reply:
        """Check every limit of `policy` for `key` and, when `consume` and all allow `cost`, consume it in all.

        `now_us` replaces the backend's clock (tests and the Python models only).
        """
        ...

    def refund(self, policy: Policy, key: str, cost: int, reply: Reply, elapsed_us: int) -> bool:
        """Give back, atomically, what the admitted call answered by `reply` took; True if anything was.

        Never more than the call took, never to a window that did not count
        it (so refunds never let more than `limit` successful calls through
        in a window). `elapsed_us`: the caller's monotonic time since the hit.
        """
        ...

    def clear(self, policy: Policy, key: str) -> None:
        """Forget every limit's state of `policy` for `key`."""
        ...

    def clear_all(self, policy: Policy) -> None:
        """Forget every key's state of `policy`'s limiter (the legacy ``reset()`` with no agent)."""
        ...
