"""Drop-in replacements for the legacy server's helpers.

`StateLockManager` keeps the legacy file-lock manager's signature, so code
that does ``with manager.acquire_agent_lock(agent_id, timeout=5.0):`` moves
to the shared lock without edits: it takes exactly the lock of
``mcp_redis.agent_lock(agent_id)`` (reentrant with it in one thread), and a
wait longer than `timeout` raises `TimeoutError` (`mcp_redis.LockTimeout`).

`RateLimiter` and `get_rate_limiter` replace the legacy per-agent request
limiter (``src/rate_limiter.py``: 60 requests a minute and 1,000 an hour)
with its surface and messages, counted once for every process that shares
the Redis deployment. `kg_store_rate_limited` reproduces the legacy
``kg_store`` check of ``KnowledgeGraphAGE.add_discovery`` (20 stores per
agent per sliding hour, `ValueError` with the legacy message, a failed
store gives its slot back). See docs/migration.md, "Rate limits".
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Tuple, Type, TypeVar, Union

from .client import Client
from .errors import RateLimitExceeded
from .locks import AgentLock, _check_seconds, agent_lock
from .ratelimit import KeyArg, Limit, _key_getter, rate_limited
from .ratelimit import RateLimiter as _Limiter
from .ratelimit.limits import _check_int

__all__ = ["KgStoreRateLimitExceeded", "RateLimiter", "StateLockManager", "get_rate_limiter",
           "kg_store_rate_limited"]

F = TypeVar("F", bound=Callable[..., Any])


class StateLockManager:
    """The legacy agent-state lock manager, backed by `agent_lock`.

    `lock_dir` is accepted for compatibility and ignored: the backend and the
    lock directory come from the library's settings (``MCP_REDIS_LOCK_DIR``).
    """

    def __init__(self, lock_dir: Optional[str] = None, **_legacy: Any) -> None:
        self.lock_dir = lock_dir

    def __repr__(self) -> str:
        return "StateLockManager()"

    def acquire_agent_lock(self, agent_id: str, timeout: float = 5.0) -> AgentLock:
        """A context manager holding `agent_id`'s lock; `timeout` is the longest wait (s)."""
        wait = _check_seconds(timeout, "timeout", allow_none=True, allow_zero=True)
        return agent_lock(agent_id, blocking_timeout=wait)


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
        self.max_per_minute = _check_int(max_requests_per_minute, "max_requests_per_minute")
        self.max_per_hour = _check_int(max_requests_per_hour, "max_requests_per_hour")
        self.limiter = _Limiter(name, limits=[Limit(self.max_per_minute, 60, "minute"),
                                              Limit(self.max_per_hour, 3600, "hour")], client=client)

    def __repr__(self) -> str:
        return (f"compat.RateLimiter({self.limiter.name!r}, {self.max_per_minute}/minute, "
                f"{self.max_per_hour}/hour)")

    def check_rate_limit(self, agent_id: str) -> Tuple[bool, Optional[str]]:
        """Count one request of `agent_id` if both limits allow it: ``(True, None)``, else ``(False, message)``."""
        result = self.limiter.hit(agent_id)
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
        minute, hour = self.limiter.peek(agent_id).statuses
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
        """Forget `agent_id`'s requests, or every agent's (for every process sharing the backend)."""
        if agent_id:
            self.limiter.reset(agent_id)
        else:
            self.limiter._reset_all()


_rate_limiter: Optional[RateLimiter] = None
_rate_limiter_lock = threading.Lock()


def get_rate_limiter() -> RateLimiter:
    """The process's request limiter (60/minute, 1,000/hour), created on first use."""
    global _rate_limiter
    with _rate_limiter_lock:
        if _rate_limiter is None:
            _rate_limiter = RateLimiter(max_requests_per_minute=60, max_requests_per_hour=1000)
        return _rate_limiter


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
