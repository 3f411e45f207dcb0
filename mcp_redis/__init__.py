"""mcp_redis: Redis-backed locks, rate limits, caches, sessions and events for
synchronous, multi-threaded Python services that scale out to many processes.

The public contract is documented in the README; everything listed in
``__all__`` is importable from here.
"""

from __future__ import annotations

from .config import LockFallback, Mode, RateLimitFallback, Settings, configure, reset, settings
from .errors import (
    AmbiguousPrefix,
    BackendUnavailable,
    BlockingCallInEventLoop,
    ConfigurationError,
    FeatureDisabled,
    InvalidArgument,
    InvalidArgumentType,
    LockError,
    LockNotOwned,
    LockNotReplicated,
    LockTimeout,
    McpRedisError,
    PoolExhausted,
    RateLimitExceeded,
)
from .health import health
from .stats import stats

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "configure",
    "reset",
    "settings",
    "Settings",
    "Mode",
    "LockFallback",
    "RateLimitFallback",
    "health",
    "stats",
    "McpRedisError",
    "ConfigurationError",
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

# Feature exports. Each block is owned by its module; keep them in this order.
# --- locks ---
from .locks import AgentLock, DistributedLock, agent_lock, lock  # noqa: E402

__all__ += ["agent_lock", "lock", "AgentLock", "DistributedLock"]
# --- ratelimit ---
from .ratelimit import Algorithm, Limit, LimitStatus, RateLimiter, RateLimitResult, rate_limited, ratelimit_headers  # noqa: E402

__all__ += ["rate_limited", "RateLimiter", "RateLimitResult", "Limit", "LimitStatus", "Algorithm", "ratelimit_headers"]
# --- cache ---
from .cache import CachedFunction, CacheInfo, cached_metadata  # noqa: E402

__all__ += ["cached_metadata", "CachedFunction", "CacheInfo"]
# --- sessions ---
from .sessions import SessionMap, SessionStore  # noqa: E402

__all__ += ["SessionStore", "SessionMap"]
# --- events ---
from .events import (  # noqa: E402
    EventBus,
    EventStream,
    StreamConsumer,
    StreamEntry,
    Subscription,
    publish_agent_update,
)

__all__ += ["EventBus", "Subscription", "EventStream", "StreamEntry", "StreamConsumer", "publish_agent_update"]
# --- backend ---
from .backend import RedisBackend  # noqa: E402

__all__ += ["RedisBackend"]
# --- client: one configuration with its connections, scripts and threads ---
from .client import Client, default_client  # noqa: E402

__all__ += ["Client", "default_client"]
# --- misconfiguration: the ConfigurationError subclasses a backend's refusal raises ---
from .errors import (  # noqa: E402
    AuthenticationFailed,
    BadDatabaseIndex,
    PermissionDenied,
    ReadOnlyServer,
    UnsupportedServer,
    WrongKeyType,
)

__all__ += ["AuthenticationFailed", "PermissionDenied", "BadDatabaseIndex", "UnsupportedServer",
            "WrongKeyType", "ReadOnlyServer"]
