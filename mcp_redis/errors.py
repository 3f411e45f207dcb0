"""Every error mcp_redis raises on purpose, in one place.

`McpRedisError` is the base. Bad arguments are `InvalidArgument` (a
`ValueError`) or `InvalidArgumentType` (a `TypeError`), always naming the
argument. Lock errors also subclass redis-py's, so code written for
`redis.lock.Lock` keeps catching them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from redis.exceptions import LockError as _RedisLockError
from redis.exceptions import LockNotOwnedError as _RedisLockNotOwnedError

__all__ = [
    "McpRedisError",
    "ConfigurationError",
    "AuthenticationFailed",
    "PermissionDenied",
    "BadDatabaseIndex",
    "UnsupportedServer",
    "WrongKeyType",
    "ReadOnlyServer",
    "InvalidArgument",
    "InvalidArgumentType",
    "BackendUnavailable",
    "PoolExhausted",
    "FeatureDisabled",
    "LockError",
    "LockTimeout",
    "LockNotOwned",
    "LockNotReplicated",
    "BlockingCallInEventLoop",
    "RateLimitExceeded",
    "AmbiguousPrefix",
]


class McpRedisError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigurationError(McpRedisError, ValueError):
    """A setting (environment variable or `configure()` argument) is invalid.

    Also raised when a backend refuses the library for a reason only its
    operator can fix (the subclasses below): never retried, never a breaker
    trip, never a fallback. ``variable`` names the environment variable to fix
    (None when the message names it otherwise).
    """

    variable: Optional[str] = None

    def __init__(self, message: str, *, variable: Optional[str] = None) -> None:
        if variable is not None:
            self.variable = variable
        super().__init__(message)


class AuthenticationFailed(ConfigurationError):
    """The server refused the credentials in `REDIS_URL` / `DATABASE_URL`."""


class PermissionDenied(ConfigurationError):
    """The user of `REDIS_URL` / `DATABASE_URL` lacks a permission (Redis ``NOPERM``)."""


class BadDatabaseIndex(ConfigurationError):
    """The database index in `REDIS_URL` does not exist on the server."""


class UnsupportedServer(ConfigurationError):
    """The server does not know a command the library uses (too old, or renamed)."""


class WrongKeyType(ConfigurationError):
    """A key under `MCP_REDIS_KEY_PREFIX` holds another type (``WRONGTYPE``):
    something else writes under the library's prefix."""


class ReadOnlyServer(ConfigurationError):
    """`REDIS_URL` names a read-only replica (``READONLY``), not the master."""


class InvalidArgument(McpRedisError, ValueError):
    """An argument has the right type but a bad value; the message names it."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {problem}")


class InvalidArgumentType(McpRedisError, TypeError):
    """An argument has the wrong type; the message names it."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {problem}")


class BackendUnavailable(McpRedisError, ConnectionError):
    """The backend (Redis or PostgreSQL) did not answer, or its breaker is open."""


class PoolExhausted(BackendUnavailable):
    """Every pooled connection stayed busy for `pool_timeout`: this process is
    saturated, the backend is not down (the circuit breaker ignores it)."""


class FeatureDisabled(McpRedisError):
    """The feature's switch is `off`, so the call cannot be served."""


class LockError(McpRedisError, _RedisLockError):
    """Base of the lock errors; also a redis-py `LockError`."""


class LockTimeout(LockError, TimeoutError):
    """The lock was not acquired within `blocking_timeout`."""


class LockNotOwned(LockError, _RedisLockNotOwnedError):
    """The lock is not (or no longer) held by this owner."""


class LockNotReplicated(LockError):
    """Acquired on the master, but fewer replicas than `min_replicas` confirmed
    it within `replica_timeout` (``WAIT``); the lock was released again."""

    def __init__(self, name: str, acknowledged: int, required: int) -> None:
        self.acknowledged = acknowledged
        self.required = required
        super().__init__(
            f"lock {name}: {acknowledged} of {required} replicas acknowledged; released"
        )


class BlockingCallInEventLoop(McpRedisError, RuntimeError):
    """A blocking call was made from a thread that is running an asyncio event loop.

    Coroutines on one loop share a thread, so per-thread ownership cannot
    tell them apart, and a blocking wait would freeze the loop. Not a
    `LockError`: code catching ``LockError`` as "not acquired" must not
    swallow it.
    """


class RateLimitExceeded(McpRedisError):
    """A rate limit refused the call; the decorated function was not called."""

    def __init__(
        self,
        name: str,
        limit: int,
        remaining: int,
        retry_after: float,
        reset_after: float,
        refused_by: Optional[str] = None,
    ) -> None:
        self.name = name
        self.limit = limit
        self.remaining = remaining
        self.retry_after = retry_after
        self.reset_after = reset_after
        self.refused_by = refused_by if refused_by is not None else name
        super().__init__(
            f"rate limit {self.refused_by!r} exceeded: limit {limit}, "
            f"retry after {retry_after:.3f}s"
        )


class AmbiguousPrefix(InvalidArgument):
    """A prefix matches more than one agent id; `candidates` lists some of them."""

    def __init__(self, prefix: str, candidates: Sequence[str]) -> None:
        self.candidates = list(candidates)
        shown = ", ".join(repr(c) for c in self.candidates)
        super().__init__("prefix", f"{prefix!r} is ambiguous; candidates: {shown}")
