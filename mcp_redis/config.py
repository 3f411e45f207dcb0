"""Settings: read from the environment on first use, overridden by `configure()`.

One immutable `Settings` object is in force at a time. Features read it when
they are *called* (never at import), so decorators applied at import time
follow a later `configure()`.

Over the 500-line guideline on purpose: every setting, its environment
variable, parser, unit and bound, and the checks that name the variable the
user set, are kept in one file so that one read shows them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import math
import os
import re
import ssl
import tempfile
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from .batching import LANES
from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from .keys import validate_prefix
from .validation import MAX_NETWORK_SECONDS, MAX_SECONDS, MAX_STATEMENT_SECONDS, seconds

log = logging.getLogger("mcp_redis.config")

__all__ = [
    "Mode",
    "LockFallback",
    "RateLimitFallback",
    "Settings",
    "settings",
    "configure",
    "reset",
    "redact_url",
    "on_reset",
]


class Mode(str, enum.Enum):
    """Where a feature keeps its state (the per-feature roll-out switch)."""

    REDIS = "redis"
    POSTGRES = "postgres"
    LOCAL = "local"
    OFF = "off"


class LockFallback(str, enum.Enum):
    """What `agent_lock` does when Redis is unreachable in Redis mode."""

    NONE = "none"  # fail closed: raise BackendUnavailable (default)
    POSTGRES = "postgres"  # pg advisory lock: still exclusive across hosts
    LOCAL = "local"  # host-local file lock: NOT exclusive across hosts


class RateLimitFallback(str, enum.Enum):
    """What rate limiting does when Redis is unreachable in Redis mode."""

    LOCAL = "local"  # per-process in-memory limiter (default)
    POSTGRES = "postgres"  # the PostgreSQL table (exact across processes)
    OPEN = "open"  # admit every call
    CLOSED = "closed"  # refuse every call


# name -> (environment variable, parser); names are `configure()` keywords.
_FEATURES = ("sessions", "locks", "rate_limits", "metadata_cache", "events")
_FEATURE_ENV = {
    "sessions": "MCP_REDIS_SESSIONS_BACKEND",
    "locks": "MCP_REDIS_LOCKS_BACKEND",
    "rate_limits": "MCP_REDIS_RATE_LIMITS_BACKEND",
    "metadata_cache": "MCP_REDIS_CACHE_BACKEND",
    "events": "MCP_REDIS_EVENTS_BACKEND",
}
# feature -> the setting naming its own Redis deployment (None: REDIS_URL).
FEATURE_URLS = {
    "sessions": "sessions_url",
    "locks": "locks_url",
    "rate_limits": "rate_limits_url",
    "metadata_cache": "cache_url",
    "events": "events_url",
}
_URL_FIELDS = ("redis_url", "database_url", *FEATURE_URLS.values())
_ALLOWED_MODES = {
    "sessions": {Mode.REDIS, Mode.POSTGRES, Mode.LOCAL, Mode.OFF},
    "locks": {Mode.REDIS, Mode.POSTGRES, Mode.LOCAL, Mode.OFF},
    "rate_limits": {Mode.REDIS, Mode.POSTGRES, Mode.LOCAL, Mode.OFF},
    "metadata_cache": {Mode.REDIS, Mode.LOCAL, Mode.OFF},
    "events": {Mode.REDIS, Mode.LOCAL, Mode.OFF},
}


_PG_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
# A legacy server's schemas (its core.sessions and audit.rate_limits have other
# columns) and PostgreSQL's own.
_PG_SCHEMA_RESERVED = {"core", "audit", "public", "information_schema"}


def validate_pg_schema(name: object) -> str:
    """`pg_schema`: a plain lower-case PostgreSQL identifier the library owns alone.

    Raises `ConfigurationError` naming the setting for anything else: quoting
    rules, ``pg_*`` (reserved by PostgreSQL), and the schemas of the legacy
    server (``core``, ``audit``) or of everyone (``public``).
    """
    if not isinstance(name, str) or not _PG_SCHEMA_NAME.match(name):
        raise ConfigurationError(
            f"pg_schema: must be a lower-case PostgreSQL identifier ([a-z_][a-z0-9_]*, at most 63), got {name!r}")
    if name in _PG_SCHEMA_RESERVED or name.startswith("pg_"):
        raise ConfigurationError(
            f"pg_schema: {name!r} is not the library's own schema (reserved: core, audit, public, pg_*); "
            "use e.g. the default 'mcp_redis'")
    return name


def _default_lock_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "mcp_redis_locks")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the library. Build with `Settings.from_env()`."""

    redis_url: Optional[str] = None
    database_url: Optional[str] = None
    key_prefix: str = "mcp:"
    # PostgreSQL schema of every table the library owns; never a legacy server's
    # ``core``/``audit`` (whose tables of the same names have other columns).
    pg_schema: str = "mcp_redis"
    session_ttl: int = 3600
    metadata_ttl: int = 300
    lock_timeout: float = 30.0
    # How long a lock-holding process's liveness key outlives its last beat (Redis locks): a
    # crashed holder is taken over this long after its last beat, and so is a live one whose
    # watchdog thread cannot run that long (a C call holding the GIL, swap, SIGSTOP).
    lock_liveness_ttl: float = 1.5
    rate_limit_window: float = 3600.0
    # Per-feature switches; None means "redis when redis_url is set, else local".
    sessions: Optional[Mode] = None
    locks: Optional[Mode] = None
    rate_limits: Optional[Mode] = None
    metadata_cache: Optional[Mode] = None
    events: Optional[Mode] = None
    # Per-feature Redis deployments; None means REDIS_URL (e.g. caches on an
    # evicting instance, locks/sessions/rate limits on a `noeviction` one).
    locks_url: Optional[str] = None
    sessions_url: Optional[str] = None
    rate_limits_url: Optional[str] = None
    cache_url: Optional[str] = None
    events_url: Optional[str] = None
    lock_fallback: LockFallback = LockFallback.NONE
    rate_limit_fallback: RateLimitFallback = RateLimitFallback.LOCAL
    rate_limit_local_maxsize: int = 100_000  # entries of the in-process limiter (local mode, fallback)
    lock_dir: str = dataclasses.field(default_factory=_default_lock_dir)
    # Connections.
    socket_timeout: float = 2.0
    socket_connect_timeout: float = 1.0
    health_check_interval: int = 15
    max_connections: int = 50
    pool_timeout: float = 5.0
    trips_in_flight: int = LANES  # shared round trips a process keeps in flight at once (mcp_redis.batching)
    postgres_max_connections: int = 10
    postgres_connect_timeout: int = 2
    postgres_timeout: float = 5.0
    ssl_ca_certs: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    ssl_cert_reqs: str = "required"
    sentinel_password: Optional[str] = dataclasses.field(default=None, repr=False)
    sentinel_username: Optional[str] = None
    # TLS to the Sentinels themselves; None: as to the data nodes (the URL's
    # scheme, rediss+sentinel:// or redis+sentinel://).
    sentinel_tls: Optional[bool] = None
    # Resilience.
    retry_attempts: int = 3
    retry_initial_backoff: float = 0.02
    retry_max_backoff: float = 0.25
    breaker_failure_threshold: int = 5
    breaker_reset_timeout: float = 1.0

    def __post_init__(self) -> None:
        validate_prefix(self.key_prefix)
        validate_pg_schema(self.pg_schema)
        for name, bounds in _DURATIONS.items():
            _check_duration(name, getattr(self, name), bounds)
        for name in ("max_connections", "postgres_max_connections", "trips_in_flight",
                     "retry_attempts", "breaker_failure_threshold"):
            _check_number(name, getattr(self, name), integer=True, minimum=1)
        for name in ("max_connections", "postgres_max_connections"):
            if getattr(self, name) > MAX_POOL_CONNECTIONS:
                raise ConfigurationError(f"{name}: at most {MAX_POOL_CONNECTIONS:,} (a pool allocates its "
                                         f"slots up front), got {getattr(self, name)!r}")
        if self.trips_in_flight > MAX_POOL_CONNECTIONS:  # each trip in flight holds a pooled connection
            raise ConfigurationError(f"trips_in_flight: at most {MAX_POOL_CONNECTIONS:,} (each holds a pooled "
                                     f"connection), got {self.trips_in_flight!r}")
        _check_number("rate_limit_local_maxsize", self.rate_limit_local_maxsize, integer=True, minimum=64)
        for name in _FEATURES:
            value = getattr(self, name)
            if value is None:
                continue
            mode = _coerce_enum(Mode, value, name)
            if mode not in _ALLOWED_MODES[name]:
                raise ConfigurationError(
                    f"{name}: {mode.value!r} is not a backend for this feature; "
                    f"choose from {sorted(m.value for m in _ALLOWED_MODES[name])}"
                )
            object.__setattr__(self, name, mode)
        if self.sentinel_tls is not None and not isinstance(self.sentinel_tls, bool):
            raise ConfigurationError(f"sentinel_tls: must be True, False or None (as the data nodes), "
                                     f"not {self.sentinel_tls!r}")
        if self.sentinel_username and not self.sentinel_password:
            raise ConfigurationError("sentinel_username: needs sentinel_password (MCP_REDIS_SENTINEL_PASSWORD)")
        object.__setattr__(self, "lock_fallback", _coerce_enum(LockFallback, self.lock_fallback, "lock_fallback"))
        object.__setattr__(self, "rate_limit_fallback", _coerce_enum(RateLimitFallback, self.rate_limit_fallback, "rate_limit_fallback"))
        if not isinstance(self.lock_dir, str) or not self.lock_dir or "\x00" in self.lock_dir:
            raise ConfigurationError(f"MCP_REDIS_LOCK_DIR (lock_dir): must be a directory path, got {self.lock_dir!r}")
        for name in _URL_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{name}: must be a str or None, not {type(value).__name__}")
        for name in ("lock_fallback", "rate_limit_fallback"):
            if getattr(self, name).value == "postgres" and not self.database_url:
                raise ConfigurationError(f"{name}: 'postgres' needs DATABASE_URL")
        for name in ("redis_url", *FEATURE_URLS.values()):
            url = getattr(self, name)
            if url:
                check_redis_url(name, url)
        _check_tls_settings(self)

    def url(self, feature: str) -> Optional[str]:
        """The Redis URL `feature` uses: its own ``*_url`` setting, else `redis_url`."""
        if feature not in _FEATURES:
            raise ValueError(f"feature: unknown {feature!r}")
        return getattr(self, FEATURE_URLS[feature]) or self.redis_url

    def redis_urls(self) -> List[str]:
        """Every distinct Redis URL a feature could use (REDIS_URL first)."""
        out: List[str] = []
        for url in (self.redis_url, *(getattr(self, name) for name in FEATURE_URLS.values())):
            if url and url not in out:
                out.append(url)
        return out

    # -- the effective backend of each feature ---------------------------------
    def mode(self, feature: str) -> Mode:
        """The backend in force for `feature` (explicit switch, else the default)."""
        if feature not in _FEATURES:
            raise ValueError(f"feature: unknown {feature!r}")
        explicit: Optional[Mode] = getattr(self, feature)
        url = getattr(self, FEATURE_URLS[feature]) or self.redis_url
        if explicit is not None:
            mode = explicit
        else:
            mode = Mode.REDIS if url else Mode.LOCAL
        if mode is Mode.REDIS and not url:
            raise ConfigurationError(f"{feature}: backend 'redis' needs REDIS_URL")
        if mode is Mode.POSTGRES and not self.database_url:
            raise ConfigurationError(f"{feature}: backend 'postgres' needs DATABASE_URL")
        return mode

    @property
    def local_mode(self) -> bool:
        """True when no Redis is configured (the single-host behaviour)."""
        return not self.redis_urls()

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            if not field.repr:
                continue
            value = getattr(self, field.name)
            if field.name in _URL_FIELDS and value:
                value = redact_url(value)
            if isinstance(value, enum.Enum):
                value = value.value
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> Settings:
        """Settings from `environ` (default `os.environ`), then `overrides`."""
        env = os.environ if environ is None else environ
        values: Dict[str, Any] = {}
        for name, (var, parse) in _ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[name] = parse(raw)
            except (ValueError, TypeError):
                shown = "***" if "PASSWORD" in var else repr(raw)
                raise ConfigurationError(f"{var} must be {_expected(name, parse)}, got {shown}",
                                         variable=var) from None
        warn_unknown_variables(env)
        unknown = set(overrides) - _FIELD_NAMES
        if unknown:
            raise ConfigurationError(
                f"configure(): unknown setting(s) {sorted(unknown)}; known: {sorted(_FIELD_NAMES)}"
            )
        from_environment = set(values) - set(overrides)
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigurationError as exc:
            raise _naming_the_variable(exc, from_environment) from None


class _Duration(NamedTuple):
    """How a duration setting is checked (by `mcp_redis.validation.seconds`)."""

    maximum: float
    integer: bool = False
    allow_zero: bool = False
    minimum: float = 0.0


# Every duration setting, with a bound each of its uses can honour (see validation).
_DURATIONS: Dict[str, _Duration] = {
    "session_ttl": _Duration(MAX_SECONDS, integer=True),
    "metadata_ttl": _Duration(MAX_SECONDS, integer=True),
    "lock_timeout": _Duration(MAX_SECONDS),
    "lock_liveness_ttl": _Duration(MAX_NETWORK_SECONDS, minimum=0.3),
    "rate_limit_window": _Duration(MAX_SECONDS, minimum=0.001),  # RateLimiter's own bounds
    "health_check_interval": _Duration(MAX_SECONDS, integer=True, allow_zero=True),
    "socket_timeout": _Duration(MAX_NETWORK_SECONDS),
    "socket_connect_timeout": _Duration(MAX_NETWORK_SECONDS),
    "pool_timeout": _Duration(MAX_NETWORK_SECONDS),
    "postgres_connect_timeout": _Duration(MAX_NETWORK_SECONDS, integer=True),  # libpq: whole seconds
    "postgres_timeout": _Duration(MAX_STATEMENT_SECONDS),  # statement_timeout, tcp_user_timeout: int32 ms
    "retry_initial_backoff": _Duration(MAX_NETWORK_SECONDS, allow_zero=True),
    "retry_max_backoff": _Duration(MAX_NETWORK_SECONDS, allow_zero=True),
    "breaker_reset_timeout": _Duration(MAX_NETWORK_SECONDS),
}


def _check_duration(name: str, value: Any, bounds: _Duration) -> None:
    """The one validator, its argument errors turned into `ConfigurationError`."""
    if bounds.integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigurationError(f"{name}: must be an int, not {type(value).__name__}")
    try:
        seconds(value, name, allow_zero=bounds.allow_zero, maximum=bounds.maximum, minimum=bounds.minimum)
    except (InvalidArgument, InvalidArgumentType) as exc:
        raise ConfigurationError(str(exc)) from None

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


# Query options a Redis URL may carry. redis-py applies a single server's options over the
# library's settings, so each is checked as its setting would be; anything else (an unknown
# name, `protocol`, the ssl_* options that belong to configure()) is refused, never passed on.
_URL_OPTIONS = frozenset({"db", "password", "username", "client_name", "socket_timeout",
                          "socket_connect_timeout", "health_check_interval", "max_connections"})


def parse_host_list(netloc: str, default_port: int, argument: str = "REDIS_URL (redis_url)") -> List[Tuple[str, int]]:
    """``h1:1,h2:2`` (IPv6 in brackets) into ``[(host, port), ...]``."""
    hosts: List[Tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise ConfigurationError(f"{argument}: bad port in host {item!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigurationError(f"{argument}: bad host {item!r}")
        hosts.append((host, port))
    if not hosts:
        raise ConfigurationError(f"{argument}: no hosts given")
    return hosts


def check_redis_url(name: str, url: str) -> None:
    """Refuse a Redis URL that could never work, naming the setting, before anything uses it.

    Read as redis-py and the library's builders read it (``urlsplit``: the host part ends at the
    first ``/``, ``?`` or ``#``): the scheme; the host(s) and port(s) (a single server: exactly
    one host, never the ``localhost`` redis-py would put in for an empty one); the database (a
    number below 2^31, given once); the query options (`_URL_OPTIONS`, each given once, with a
    value redis-py can use; an empty one is ignored, as redis-py does). Errors quote the URL
    redacted, never a piece of it (a piece may be password text).
    """
    setting = url_setting(name)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    shown = redact_url(url)
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{setting}: unsupported scheme in {shown!r}; "
            f"use one of {', '.join(s + '://' for s in REDIS_SCHEMES)}"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None:  # raised out here: no __context__ (see _check_hosts)
        raise ConfigurationError(f"{setting}: {shown!r} is not a URL that can be read (an unclosed '['?)")
    hosts = parts.netloc.rpartition("@")[2]
    path = parts.path.lstrip("/") if scheme != "unix" else parts.path
    options: Dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_OPTIONS or (key != "db" and scheme not in ("redis", "rediss", "unix")):
            raise ConfigurationError(f"{setting}: query option {key!r} in {shown!r} is not supported; "
                                     "use the MCP_REDIS_* settings (docs/topologies.md)")
        if key in options:
            raise ConfigurationError(f"{setting}: query option {key!r} is given twice in {shown!r}")
        if value:  # redis-py ignores an empty value
            options[key] = value
    if scheme == "unix":
        if not path:
            raise ConfigurationError(f"{setting}: {shown!r} names no socket path (unix:///path/to/redis.sock)")
        databases = [options.get("db")]
    else:
        if scheme in ("redis", "rediss") and ("," in hosts or not hosts.strip()):
            raise ConfigurationError(f"{setting}: {shown!r} must name one host (several: redis+sentinel:// "
                                     "or redis+cluster://)")
        _check_hosts(hosts, 26379 if scheme.endswith("sentinel") else 6379, setting, shown)
        segments = [p for p in path.split("/") if p]
        if scheme.endswith("sentinel"):
            if not segments or len(segments) > 2:
                raise ConfigurationError(f"{setting}: {shown!r}: the path is /<service>[/<db>] (the name "
                                         "given to `sentinel monitor`)")
            databases = [segments[1] if len(segments) > 1 else None, options.get("db")]
        elif scheme.endswith("cluster"):
            databases = [segments[0] if segments else None, options.get("db")]
            if len(segments) > 1 or any(db is not None and not (_DIGITS.fullmatch(db) and int(db) == 0)
                                        for db in databases):
                raise ConfigurationError(
                    f"{setting}: {shown!r} names a database; Redis Cluster has only database 0 (managed "
                    "clusters too): drop the '/<db>' (or db=) and give this deployment its own "
                    "MCP_REDIS_KEY_PREFIX instead")
        elif len(segments) > 1:
            raise ConfigurationError(f"{setting}: the database in {shown!r} must be a number")
        else:
            databases = [segments[0] if segments else None, options.get("db")]
    given = [db for db in databases if db is not None]
    if len(given) > 1:
        raise ConfigurationError(f"{setting}: {shown!r} names its database twice (path and db=)")
    if given and not (_DIGITS.fullmatch(given[0]) and int(given[0]) < 2**31):
        raise ConfigurationError(f"{setting}: the database in {shown!r} must be a number (redis://host:6379/0)")
    for key, value in options.items():
        if key == "client_name" and not _CLIENT_NAME.fullmatch(value):
            raise ConfigurationError(f"{setting}: query option client_name in {shown!r} may hold no spaces, "
                                     "newlines or other special characters (Redis refuses them)")
        if key in ("socket_timeout", "socket_connect_timeout"):
            problem = ""
            try:
                seconds(float(value), key, maximum=MAX_NETWORK_SECONDS)
            except (ValueError, OverflowError) as exc:
                problem = str(exc)
            if problem:
                raise ConfigurationError(f"{setting}: query option {key}={value!r} in {shown!r} is not valid "
                                         f"({problem})")
        elif key in ("health_check_interval", "max_connections"):  # redis-py reads them with int()
            low = 0 if key == "health_check_interval" else 1
            high = int(MAX_NETWORK_SECONDS) if key == "health_check_interval" else MAX_POOL_CONNECTIONS
            if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
                raise ConfigurationError(f"{setting}: query option {key}={value!r} in {shown!r} must be a whole "
                                         f"number from {low} to {high}")


_CLIENT_NAME = re.compile(r"[!-~]+")  # what CLIENT SETNAME takes: printable ASCII, no space
_DIGITS = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes '²', which int() refuses
MAX_POOL_CONNECTIONS = 10_000  # a blocking pool allocates its slots up front


def _check_hosts(hosts: str, default_port: int, setting: str, shown: str) -> None:
    """`parse_host_list`'s checks, plus ports in ASCII digits and host names IDNA can encode;
    the error quotes the redacted URL only."""
    bad = not _hosts_well_formed(hosts)  # one ':' before an ASCII port (redis-py cuts at the first)
    try:
        for host, _port in parse_host_list(hosts, default_port, setting):
            host.encode("idna")
    except (ConfigurationError, UnicodeError, ValueError):
        bad = True
    if bad:  # raised out here: the error caught above quotes a piece of the URL (its __context__)
        raise ConfigurationError(f"{setting}: a bad host or port in {shown!r} (host:port, 1-65535; IPv6 "
                                 "in brackets)")


def _check_tls_settings(s: Settings) -> None:
    """TLS settings: verification is turned off only by the word "none"; files exist."""
    reqs = s.ssl_cert_reqs
    if isinstance(reqs, ssl.VerifyMode):
        reqs = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional"}.get(reqs, "required")
    if not isinstance(reqs, str) or reqs.lower() not in ("required", "optional", "none"):
        raise ConfigurationError(f"ssl_cert_reqs: must be 'required' (the default), 'optional' or 'none', "
                                 f"not {reqs!r}")
    object.__setattr__(s, "ssl_cert_reqs", reqs.lower())
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        path = getattr(s, name)
        if path is None:
            continue
        variable = f"MCP_REDIS_{name.upper()} ({name})"
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ConfigurationError(f"{variable}: must be a file path, not {path!r}")
        if not os.path.isfile(path):
            raise ConfigurationError(f"{variable}: no such file: {path!r}")


def _check_number(name: str, value: Any, *, integer: bool = False,
                  minimum: float = 0, strict: bool = False) -> None:
    kinds: Tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise ConfigurationError(f"{name}: must be {kind}, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"{name}: must be finite, got {value!r}")
    number = float(cast(float, value))
    if number < minimum or (strict and number == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigurationError(f"{name}: must be {bound}, got {value!r}")


def _coerce_enum(kind: Any, value: Any, name: str) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in kind)
    raise ConfigurationError(f"{name}: must be one of {choices}, got {value!r}")


def _str(raw: str) -> str:
    return raw


def _int(raw: str) -> int:
    return int(raw.strip())


def _float(raw: str) -> float:
    return float(raw.strip())


_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False, "false": False, "off": False}


def _bool(raw: str) -> bool:
    try:
        return _BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


_ENV: Dict[str, Tuple[str, Callable[[str], Any]]] = {
    "redis_url": ("REDIS_URL", _str),
    "database_url": ("DATABASE_URL", _str),
    "key_prefix": ("MCP_REDIS_KEY_PREFIX", _str),
    "pg_schema": ("MCP_REDIS_PG_SCHEMA", _str),
    "session_ttl": ("REDIS_SESSION_TTL", _int),
    "metadata_ttl": ("REDIS_METADATA_TTL", _int),
    "lock_timeout": ("REDIS_LOCK_TIMEOUT", _float),
    "lock_liveness_ttl": ("MCP_REDIS_LOCK_LIVENESS_TTL", _float),
    "rate_limit_window": ("REDIS_RATE_LIMIT_WINDOW", _float),
    "sessions": (_FEATURE_ENV["sessions"], _str),
    "locks": (_FEATURE_ENV["locks"], _str),
    "rate_limits": (_FEATURE_ENV["rate_limits"], _str),
    "metadata_cache": (_FEATURE_ENV["metadata_cache"], _str),
    "events": (_FEATURE_ENV["events"], _str),
    "locks_url": ("MCP_REDIS_LOCKS_URL", _str),
    "sessions_url": ("MCP_REDIS_SESSIONS_URL", _str),
    "rate_limits_url": ("MCP_REDIS_RATE_LIMITS_URL", _str),
    "cache_url": ("MCP_REDIS_CACHE_URL", _str),
    "events_url": ("MCP_REDIS_EVENTS_URL", _str),
    "lock_fallback": ("MCP_REDIS_LOCK_FALLBACK", _str),
    "rate_limit_fallback": ("MCP_REDIS_RATE_LIMIT_FALLBACK", _str),
    "rate_limit_local_maxsize": ("MCP_REDIS_RATE_LIMIT_LOCAL_MAXSIZE", _int),
    "lock_dir": ("MCP_REDIS_LOCK_DIR", _str),
    "socket_timeout": ("MCP_REDIS_SOCKET_TIMEOUT", _float),
    "socket_connect_timeout": ("MCP_REDIS_CONNECT_TIMEOUT", _float),
    "max_connections": ("MCP_REDIS_MAX_CONNECTIONS", _int),
    "pool_timeout": ("MCP_REDIS_POOL_TIMEOUT", _float),
    "trips_in_flight": ("MCP_REDIS_TRIPS_IN_FLIGHT", _int),
    "postgres_timeout": ("MCP_REDIS_POSTGRES_TIMEOUT", _float),
    "ssl_ca_certs": ("MCP_REDIS_SSL_CA_CERTS", _str),
    "ssl_certfile": ("MCP_REDIS_SSL_CERTFILE", _str),
    "ssl_keyfile": ("MCP_REDIS_SSL_KEYFILE", _str),
    "sentinel_password": ("MCP_REDIS_SENTINEL_PASSWORD", _str),
    "sentinel_username": ("MCP_REDIS_SENTINEL_USERNAME", _str),
    "sentinel_tls": ("MCP_REDIS_SENTINEL_TLS", _bool),
    "retry_attempts": ("MCP_REDIS_RETRY_ATTEMPTS", _int),
    "breaker_failure_threshold": ("MCP_REDIS_BREAKER_THRESHOLD", _int),
    "breaker_reset_timeout": ("MCP_REDIS_BREAKER_RESET_TIMEOUT", _float),
}
_FIELD_NAMES = {f.name for f in dataclasses.fields(Settings)}
assert set(_ENV) <= _FIELD_NAMES

# The unit of each number read from the environment, for error messages.
_UNITS: Dict[str, str] = {
    "session_ttl": "seconds", "metadata_ttl": "seconds", "lock_timeout": "seconds", "lock_liveness_ttl": "seconds",
    "rate_limit_window": "seconds", "socket_timeout": "seconds", "socket_connect_timeout": "seconds",
    "pool_timeout": "seconds", "postgres_timeout": "seconds", "breaker_reset_timeout": "seconds",
    "max_connections": "connections", "trips_in_flight": "trips", "retry_attempts": "attempts",
    "breaker_failure_threshold": "consecutive failures",
}


def _expected(name: str, parse: Callable[[str], Any]) -> str:
    """What the variable of setting `name` must hold: "a whole number of seconds"."""
    if parse is _bool:
        return "yes or no (also true/false, on/off, 1/0)"
    unit = _UNITS.get(name)
    kind = "a whole number" if parse is _int else "a number"
    return f"{kind} of {unit}" if unit else kind


def _naming_the_variable(exc: ConfigurationError, from_environment: Iterable[str]) -> ConfigurationError:
    """`exc` ("lock_timeout: ...") restated with the variable the user set, when
    the setting came from the environment: "REDIS_LOCK_TIMEOUT (lock_timeout, seconds): ..."."""
    message = str(exc)
    if type(exc) is not ConfigurationError:
        return exc
    for name in from_environment:
        if message.startswith(f"{name}:"):
            var = _ENV[name][0]
            unit = f", {_UNITS[name]}" if name in _UNITS else ""
            return ConfigurationError(f"{var} ({name}{unit}):{message[len(name) + 1:]}", variable=var)
    return exc


# Variables read by the test suite, benchmarks and tools rather than by Settings.
TOOL_VARIABLES = (
    "MCP_REDIS_REQUIRE_SERVERS", "MCP_REDIS_SKIP_SLOW", "MCP_REDIS_TOPOLOGIES", "MCP_REDIS_SERVER_BINARIES",
    "MCP_REDIS_TEST_PG_ADMIN_DSN", "MCP_REDIS_REDIS_PORT", "MCP_REDIS_POSTGRES_PORT", "MCP_REDIS_SOAK_SECONDS", "MCP_REDIS_SOAK_FULL",
    "MCP_REDIS_FAULT_REPORT", "MCP_REDIS_LOG_LEVEL",
)
_warned_unknown: Set[str] = set()


def warn_unknown_variables(environ: Mapping[str, str]) -> List[str]:
    """Warn once per process about each ``MCP_REDIS_*`` variable nothing reads.

    A misspelled variable (``MCP_REDIS_LOCK_BACKEND``) would otherwise be
    ignored in silence; the warning names the closest known one. Returns the
    unknown names.
    """
    known = {var for var, _ in _ENV.values()} | set(TOOL_VARIABLES)
    unknown = sorted(v for v in environ if v.startswith("MCP_REDIS_") and v not in known)
    for var in unknown:
        if var in _warned_unknown:
            continue
        _warned_unknown.add(var)
        close = difflib.get_close_matches(var, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the README's list of variables"
        log.warning("unknown environment variable %s is ignored; %s", var, hint)
    return unknown

ENVIRONMENT_VARIABLES: List[Tuple[str, str]] = [(var, name) for name, (var, _) in _ENV.items()]


def setting_variable(field: str) -> str:
    """The environment variable of the setting `field` (e.g. ``REDIS_URL`` for ``redis_url``)."""
    return _ENV[field][0] if field in _ENV else field


def url_setting(field: str) -> str:
    """How errors name a URL setting: its variable and its `configure()` name, e.g. ``REDIS_URL (redis_url)``."""
    return f"{setting_variable(field)} ({field})"


def redact_url(url: str) -> str:
    """`url` with any password (userinfo or query) replaced by ``***``, never a piece of it shown.

    Where the URL reads one way only (`_positional`: a valid host, and every "@" in the userinfo
    or in a ``password=`` value), it is masked where redis-py and libpq read the password and the
    host stays as written. Otherwise everything up to its last "@" is masked: that covers a
    password with an unescaped ``/ ? # @``, which cuts the host short (the host shown is then
    what follows the last "@"). A fragment, which redis-py ignores, is masked whole. Also libpq
    key/value DSNs (``host=... password=...``, quoted, with backslash escapes, or with unquoted
    words after it that are no ``key=``). No text is searched for secrets (a short password
    would garble the host and give itself away).
    """
    if _DSN.match(url) or "://" not in url:
        if not _DSN.match(url) and "@" in url:
            # Not a key/value DSN: a URL with a mistyped "://" (redis:/:pw@h, redis//:pw@h):
            # everything up to its last "@" may be a password.
            return "***@" + url.rpartition("@")[2]
        # A key/value DSN; "password" with a mistyped "=" ("password s3cret") is masked too.
        return _DSN_PASSWORD.sub(r"\1***", url)
    scheme, _, rest = url.partition("://")
    positional = _positional(scheme, rest)
    if positional is not None:
        return f"{scheme}://{positional}"
    if scheme.lower().startswith("unix") and rest.startswith("/"):
        return f"{scheme}://{_mask_tail(scheme, rest)}"  # a socket path: no userinfo before it
    userinfo, at, tail = rest.rpartition("@")
    if not at:
        return f"{scheme}://{_mask_tail(scheme, rest)}"
    user, colon, _password = userinfo.partition(":")
    keep = user and colon and not _RESERVED.search(user) and not _hosts_well_formed(userinfo)
    return f"{scheme}://{user + ':***' if keep else '***'}@{_mask_tail(scheme, tail)}"


def _positional(scheme: str, rest: str) -> Optional[str]:
    """`rest` (after ``scheme://``) masked where its parsers read the password, or None when it can
    be read another way: an invalid host (a password with ``/ ? #`` cut it short), or an "@"
    outside the userinfo and the ``password=`` values."""
    postgres = scheme.lower().startswith("postgres")
    body, hashmark, fragment = (rest, "", "") if postgres else rest.partition("#")
    location, qmark, query = body.partition("?")
    netloc, slash, path = location.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    socket = scheme.lower().startswith("unix")
    if not _hosts_well_formed(hosts, socket_ok=postgres or socket) or "@" in fragment:
        return None
    if "@" in path and not (socket and not netloc):
        return None
    pairs = query.split("&") if qmark else []
    for pair in pairs:
        key, eq, _value = pair.partition("=")
        if "@" in pair and not (eq and _secret_key(unquote(key)) and "@" not in key):
            return None
    if at:
        user, colon, _password = userinfo.partition(":")
        if colon and not _RESERVED.search(user):
            userinfo = f"{user}:***"
        elif user and not colon and postgres and not _RESERVED.search(user):
            userinfo = user  # a PostgreSQL user name alone (redis://secret@host reads it as a password)
        else:
            userinfo = "***"
    masked = "&".join(_mask_pair(pair) for pair in pairs)
    return f"{userinfo}{at}{hosts}{slash}{path}{qmark}{masked}{hashmark}{'***' if fragment else ''}"


def _mask_tail(scheme: str, tail: str) -> str:
    """What follows the userinfo: ``password=`` query values and any fragment masked."""
    postgres = scheme.lower().startswith("postgres")
    body, hashmark, fragment = (tail, "", "") if postgres else tail.partition("#")
    location, qmark, query = body.partition("?")
    masked = "&".join(_mask_pair(pair) for pair in query.split("&")) if qmark else ""
    return f"{location}{qmark}{masked}{hashmark}{'***' if fragment else ''}"


def _mask_pair(pair: str) -> str:
    key, eq, _value = pair.partition("=")
    return f"{key}=***" if eq and _secret_key(unquote(key)) else pair


def _hosts_well_formed(hosts: str, socket_ok: bool = False) -> bool:
    """``h[:port],...`` (IPv6 in brackets), each port ASCII digits; "" only where a socket path may
    stand for the host (`socket_ok`)."""
    if not hosts:
        return socket_ok
    return all(_HOST_ITEM.fullmatch(item.strip()) for item in hosts.split(","))


_HOST_ITEM = re.compile(r"\[[^\[\]@/?#\s]+\](?::[0-9]+)?|[^\[\]:@/?#\s]+(?::[0-9]+)?")
_RESERVED = re.compile(r"[/?#@]")
_DSN = re.compile(r"\s*[A-Za-z_]+\s*=")  # libpq's key/value form: host=... dbname=...
# A DSN's password: quoted ('...' with \' escapes) or bare (backslash escapes, e.g. "a\ b"), and
# any unquoted words after it that are no "key=" (a password with a space left unquoted).
_DSN_PASSWORD = re.compile(r"(?i)(password(?:\s*=\s*|\s+))('(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])+)"
                           r"((?:\s+(?![A-Za-z_]+\s*=)(?:\\.|[^\s\\])+)*)")
_PIECES = re.compile(r"[/?#@:%]")
_MIN_SCRUBBED = 4  # shorter secrets are masked in place only


def _secret_key(key: str) -> bool:
    return "password" in key.lower() or key.lower() in ("pass", "pwd", "secret")


def url_secrets(url: Optional[str]) -> List[str]:
    """The secrets in `url` (its password, query passwords), with the pieces a parser would cut them into.

    Longest first, each of at least 4 characters: what `scrub` replaces in free text (a server's
    error message). Both readings of a URL count (see `redact_url`): the userinfo before the
    first ``/ ? #`` and everything before the last "@"; a lone redis userinfo counts (a
    password there).
    """
    if not url:
        return []
    found: List[str] = []
    if _DSN.match(url) or "://" not in url:
        for match in _DSN_PASSWORD.finditer(url):
            value = match.group(2)
            found.append(value + match.group(3))
            found.extend(match.group(3).split())
            found.append(value)
            found.append(re.sub(r"\\(.)", r"\1", value.strip("'")))  # as libpq reads it
        if "://" not in url and not _DSN.match(url) and "@" in url:
            found.append(url.rpartition("@")[0])
    else:
        scheme, _, rest = url.partition("://")
        netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
        for userinfo, at, _ in (netloc.rpartition("@"), rest.rpartition("@")):
            if at:
                user, colon, password = userinfo.partition(":")
                if colon:
                    found.append(password)
                elif not scheme.lower().startswith("postgres") or _RESERVED.search(user):
                    found.append(user)  # redis://secret@host: a password; with / ? # @: a password cut short
        for pair in rest.replace("?", "&").replace("#", "&").split("&"):
            key, eq, value = pair.partition("=")
            if eq and _secret_key(unquote(key)):
                found.append(value)
    out = set()
    for secret in found:
        for candidate in (secret, unquote(secret), *_PIECES.split(secret)):
            if len(candidate) >= _MIN_SCRUBBED:
                out.add(candidate)
    return sorted(out, key=len, reverse=True)


def scrub(message: str, *urls: Optional[str]) -> str:
    """`message` with every secret of `urls` (see `url_secrets`) replaced by ``***``."""
    for url in urls:
        for secret in url_secrets(url):
            message = message.replace(secret, "***")
    return message


# -- the settings in force -----------------------------------------------------
_lock = threading.RLock()
_overrides: Dict[str, Any] = {}
_current: Optional[Settings] = None
_reset_hooks: List[Callable[[], None]] = []


def settings() -> Settings:
    """The settings in force (environment read on first use, then `configure()`)."""
    global _current
    current = _current
    if current is not None:
        return current
    with _lock:
        if _current is None:
            _current = Settings.from_env(**_overrides)
        return _current


def configure(**overrides: Any) -> Settings:
    """Override settings; unspecified ones keep their environment value.

    Validates everything before changing anything, then drops the
    process-wide clients so the next call uses the new settings.
    """
    global _current
    with _lock:
        merged = dict(_overrides)
        merged.update(overrides)
        new = Settings.from_env(**merged)  # raises before anything changes
        _overrides.clear()
        _overrides.update(merged)
        _current = new
    _run_reset_hooks()
    return new


def reset(*, configuration: bool = False) -> None:
    """Drop the process-wide clients, pools and background threads.

    The environment is read again on next use. With ``configuration=True``
    the overrides of earlier `configure()` calls are forgotten too.
    """
    global _current
    with _lock:
        if configuration:
            _overrides.clear()
        _current = None
    _run_reset_hooks()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # a parent thread may have held it while forking


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def on_reset(hook: Callable[[], None]) -> Callable[[], None]:
    """Register `hook` to run on `reset()`/`configure()` (modules holding clients)."""
    _reset_hooks.append(hook)
    return hook


def _run_reset_hooks() -> None:
    # Newest first: features (registered after the connection modules) stop
    # their threads before the pools they use are closed.
    for hook in reversed(list(_reset_hooks)):
        hook()
