"""One resilience policy for every feature: retry with backoff, then a breaker.

`Resilience.call(fn)` runs `fn` in one plain retry loop (exponential backoff
with jitter from tenacity's wait policy, bounded attempts) on *transient* errors only, and feeds every
attempt's outcome to a `CircuitBreaker`. While the breaker is open, calls fail
at once with `BackendUnavailable` instead of waiting a connect timeout each;
after `reset_timeout` one caller's call is let through as the half-open
probe, and its success closes the breaker again.

Features never catch Redis errors themselves: they call through the policy
and decide their fallback on `BackendUnavailable`.

Misconfiguration is not an outage: an error only the operator can fix (a
wrong password, a missing ACL permission, a bad DB index, a command the
server lacks, a foreign key under the prefix, a read-only replica) is turned
by `redis_misconfiguration` into a `ConfigurationError` naming the variable
to fix. The policy raises it at once: no retry, no breaker failure, and no
feature fallback (fallbacks catch `BackendUnavailable` only).
"""

from __future__ import annotations

import enum
import inspect
import logging
import random
import threading
import time
from typing import Any, Callable, Optional, Tuple, Type, TypeVar

import redis.exceptions as rex
from redis.sentinel import MasterNotFoundError
from tenacity import RetryCallState, wait_exponential_jitter

from .batching import shared_failure
from .errors import (
    AuthenticationFailed,
    BackendUnavailable,
    BadDatabaseIndex,
    ConfigurationError,
    PermissionDenied,
    PoolExhausted,
    ReadOnlyServer,
    UnsupportedServer,
    WrongKeyType,
)
from .metrics import METRICS, Metrics

# The name of wait_exponential_jitter's scale: ``multiplier`` from tenacity 9.2 on
# (``initial``, deprecated there, is the only one before).
_JITTER_SCALE = "multiplier" if "multiplier" in inspect.signature(wait_exponential_jitter).parameters else "initial"

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Resilience",
    "BreakerOpen",
    "REDIS_TRANSIENT",
    "is_redis_transient",
    "is_pool_exhausted",
    "redis_misconfiguration",
    "SUPPORTED_SERVERS",
]

log = logging.getLogger("mcp_redis.resilience")
T = TypeVar("T")

# Errors worth another attempt: the server may answer next time. ConnectionError
# covers BusyLoadingError, MasterNotFoundError and pool exhaustion;
# ReadOnlyError is a write that reached a demoted master during failover.
REDIS_TRANSIENT: Tuple[Type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    ConnectionResetError,
    BrokenPipeError,
    TimeoutError,
)


def is_pool_exhausted(exc: BaseException) -> bool:
    """redis-py's pools ran out of connections (the server may be perfectly fine)."""
    return isinstance(exc, rex.MaxConnectionsError) or (
        type(exc) is rex.ConnectionError and str(exc) == "No connection available."
    )


def is_unblocked(exc: BaseException) -> bool:
    """Redis ended a blocking command (BLPOP, XREADGROUP BLOCK) because its master became a
    replica under it (``-UNBLOCKED``, a graceful failover): the new master serves it."""
    return isinstance(exc, rex.ResponseError) and str(exc).lstrip().upper().startswith("UNBLOCKED")


def is_redis_transient(exc: BaseException) -> bool:
    """True for errors that mean "Redis did not answer", not "Redis said no"."""
    if isinstance(exc, BackendUnavailable):
        return False
    if type(exc) is rex.ClusterError and "TTL exhausted" in str(exc):
        # redis-py's cluster client ran out of redirections: TRYAGAIN (a
        # script's keys split between the two nodes of a slot being
        # migrated) or MOVED/ASK again and again while slots move.
        return True
    if isinstance(exc, rex.OutOfMemoryError):
        # OOM (maxmemory with noeviction): the server refuses writes for now.
        return True
    if isinstance(exc, rex.ResponseError):
        said = str(exc).lstrip().upper()
        # min-replicas-to-write: the master refuses a write it could not
        # replicate (its replicas are cut off or failing over): not durable now.
        # BUSY: another client's script (or function) runs past its time limit,
        # and the server serves nothing else until it ends or is killed.
        # MISCONF: a failing snapshot with stop-writes-on-bgsave-error.
        # None of these says anything about the call: the server cannot serve
        # it now. ("BUSY " with its space: BUSYGROUP and BUSYKEY are answers.)
        if "NOREPLICAS" in said or said.startswith(("BUSY ", "MISCONF ")) or is_unblocked(exc):
            return True
    return isinstance(exc, REDIS_TRANSIENT)


SUPPORTED_SERVERS = "Redis 7.0 or later, or Valkey 8"


class WrongServerKind(rex.RedisError):
    """The URL's scheme names a kind of server that the servers it lists are not (raised by the
    client builders of `mcp_redis.connections`): a ``redis+sentinel://`` URL listing data nodes,
    or naming a service that none of its Sentinels monitors; a ``redis+cluster://`` URL at a
    server without cluster mode. `redis_misconfiguration` makes it a `ConfigurationError`."""


class SentinelRefusal(rex.RedisError):
    """Every Sentinel of a ``redis+sentinel://`` URL that answered refused the Sentinel credentials
    (``MCP_REDIS_SENTINEL_USERNAME`` / ``MCP_REDIS_SENTINEL_PASSWORD``, or their absence), and the
    rest are not Sentinels. `redis_misconfiguration` makes it an `AuthenticationFailed` (or
    `PermissionDenied` for an ACL user without the command) naming those variables."""

    def __init__(self, message: str, *, permission: bool = False) -> None:
        super().__init__(message)
        self.permission = permission


def redis_misconfiguration(exc: BaseException, *, follows_failover: bool = False,
                           variable: str = "REDIS_URL") -> Optional[ConfigurationError]:
    """The `ConfigurationError` that a redis-py error stands for, or None.

    None means "not the operator's to fix": a transient fault (the resilience
    path) or an ordinary error reply. `follows_failover` is True for Sentinel
    and Cluster clients, where ``READONLY`` is a failover in progress
    (transient); with a plain ``redis://`` URL it means the URL names a replica.
    Messages quote the server's words, which never contain a password, and
    name `variable`: the setting the connection's URL came from.
    """
    if not isinstance(exc, rex.RedisError):
        return None
    if isinstance(exc, WrongServerKind):
        return ConfigurationError(f"{variable}: {exc}", variable=variable)
    if isinstance(exc, SentinelRefusal):
        kind = PermissionDenied if exc.permission else AuthenticationFailed
        return kind(f"MCP_REDIS_SENTINEL_PASSWORD: {exc}", variable="MCP_REDIS_SENTINEL_PASSWORD")
    said = str(exc).strip()
    upper = said.upper()
    if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError)) or (
        isinstance(exc, rex.ResponseError) and upper.startswith(("WRONGPASS", "NOAUTH"))
    ):
        return AuthenticationFailed(
            f"{variable}: the Redis server refused the credentials ({said}); put the user and "
            f"password of an enabled ACL user (or the requirepass password) in {variable}: "
            "redis://USER:PASSWORD@host:port/db", variable=variable)
    # A MasterNotFoundError lists what each Sentinel said: a NOPERM among them is the Sentinel
    # user's (SentinelRefusal says so when every Sentinel refused), not this URL's data-node user.
    if isinstance(exc, (rex.NoPermissionError, rex.AuthorizationError)) or (
            "NOPERM" in upper and not isinstance(exc, MasterNotFoundError)):
        return PermissionDenied(
            f"{variable}: the Redis user lacks a permission ({said}); grant the ACL rule in "
            "docs/security.md (keys and channels under MCP_REDIS_KEY_PREFIX, and its commands) "
            f"or use another user in {variable}", variable=variable)
    if isinstance(exc, rex.ResponseError) and "DB INDEX IS OUT OF RANGE" in upper:
        return BadDatabaseIndex(
            f"{variable}: the server has no such database ({said}); the number after the last "
            f"'/' of {variable} must be below the server's 'databases' setting (16 by default), "
            "e.g. redis://host:6379/0", variable=variable)
    if isinstance(exc, rex.ResponseError) and ("UNKNOWN COMMAND" in upper or "UNKNOWN REDIS COMMAND" in upper):
        return UnsupportedServer(
            f"{variable}: the server does not know a command mcp_redis uses ({said}); it is too "
            f"old or renames/disables that command: point {variable} at {SUPPORTED_SERVERS} "
            "with the commands of docs/security.md enabled", variable=variable)
    if isinstance(exc, rex.ResponseError) and "WRONGTYPE" in upper:
        return WrongKeyType(
            f"MCP_REDIS_KEY_PREFIX: a key under the prefix holds a value of another type ({said}); "
            "something else writes under this prefix: give mcp_redis its own MCP_REDIS_KEY_PREFIX "
            "(or delete the foreign keys)", variable="MCP_REDIS_KEY_PREFIX")
    if isinstance(exc, rex.ReadOnlyError) and not follows_failover:
        return ReadOnlyServer(
            f"{variable}: the server is a read-only replica ({said}); point {variable} at the "
            "master, or use redis+sentinel://sentinel:26379/<service> so the library follows "
            "failovers", variable=variable)
    return None


def _no_misconfiguration(exc: BaseException) -> Optional[ConfigurationError]:
    return None


class BreakerOpen(BackendUnavailable):
    """The circuit breaker is open: the backend is considered down."""


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    `failure_threshold` consecutive failures open it; after `reset_timeout`
    seconds one call is allowed through (half-open). Its success closes the
    breaker, its failure re-opens it for another `reset_timeout`.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_timeout: float = 1.0,
        *,
        metrics: Metrics = METRICS,
        on_open: Optional[Callable[[], None]] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._metrics = metrics
        self._on_open = on_open
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started = 0.0
        self._probing = False

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.state.value})"

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.CLOSED:  # the hot path takes no lock
            return BreakerState.CLOSED
        with self._lock:
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout:
                return BreakerState.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May a call go to the backend now? (Claims the probe when half-open.)"""
        if self._state is BreakerState.CLOSED:  # the hot path takes no lock
            return True
        with self._lock:
            state: BreakerState = self._state  # re-read: another thread may have closed it
            if state is BreakerState.CLOSED:
                return True
            now = self._clock()
            if state is BreakerState.OPEN:
                if now - self._opened_at < self.reset_timeout:
                    return False
                self._transition(BreakerState.HALF_OPEN)
            # Half-open: one probe at a time; a probe that never reported
            # back (its thread died) is replaced after another reset_timeout.
            if self._probing and now - self._probe_started < self.reset_timeout:
                return False
            self._probing = True
            self._probe_started = now
            return True

    def record_success(self) -> None:
        if self._state is BreakerState.CLOSED and not self._failures and not self._probing:
            return  # nothing to reset: the hot path takes no lock
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state is not BreakerState.CLOSED:
                self._transition(BreakerState.CLOSED)

    def release_probe(self) -> None:
        """Give back a half-open probe whose outcome says nothing about the backend."""
        with self._lock:
            self._probing = False

    def record_failure(self) -> None:
        opened = False
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
            ):
                self._opened_at = self._clock()
                self._transition(BreakerState.OPEN)
                opened = True
        if opened and self._on_open is not None:
            try:
                self._on_open()
            except Exception:  # pragma: no cover - defensive
                log.exception("breaker %s: on_open hook failed", self.name)

    def _transition(self, to: BreakerState) -> None:
        frm = self._state
        self._state = to
        self._metrics.inc("breaker_transitions_total", backend=self.name, to=to.value)
        level = logging.WARNING if to is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, frm.value, to.value)


class Resilience:
    """Retry (tenacity) + circuit breaker, applied to one backend's calls."""

    def __init__(
        self,
        name: str,
        *,
        attempts: int = 3,
        initial_backoff: float = 0.02,
        max_backoff: float = 0.25,
        breaker: Optional[CircuitBreaker] = None,
        transient: Callable[[BaseException], bool] = is_redis_transient,
        misconfiguration: Callable[[BaseException], Optional[ConfigurationError]] = _no_misconfiguration,
        recover: Optional[Callable[[ConfigurationError], bool]] = None,
        metrics: Metrics = METRICS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = name
        self.attempts = attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        # Injectable for tests: the pause before each retry.
        self.sleep = sleep
        self.breaker = breaker if breaker is not None else CircuitBreaker(name, metrics=metrics)
        self.transient = transient
        self.misconfiguration = misconfiguration
        # Called with a misconfiguration before it is raised: True when it did
        # something that may cure it (dropped stale sockets), and the call is
        # then tried once more (a refusal changed nothing: safe to repeat).
        self.recover = recover
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"Resilience({self.name!r}, attempts={self.attempts}, breaker={self.breaker.state.value})"

    @property
    def available(self) -> bool:
        """False while the breaker is open (a cheap check; claims no probe)."""
        return self.breaker.state is not BreakerState.OPEN

    def call(self, fn: Callable[..., T], *args: Any, attempts: Optional[int] = None, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` with retries and the breaker.

        Transient failures that outlast the retries, and calls made while the
        breaker is open, raise `BackendUnavailable` (chained to the cause).
        Misconfiguration raises `ConfigurationError` at once (chained to the
        cause; the breaker counts it as an answer), unless `recover` cures
        it: then the call is tried once more. Any other exception
        propagates unchanged.
        """
        breaker = self.breaker
        metrics = self._metrics
        name = self.name
        misconfiguration = self.misconfiguration

        def attempt() -> T:
            if not breaker.allow():
                metrics.inc("breaker_rejections_total", backend=name)
                raise BreakerOpen(f"{name} unavailable: circuit breaker open")
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                misconfigured = misconfiguration(exc)
                if misconfigured is not None:
                    # The backend answered; only its operator can fix this.
                    breaker.record_success()
                    metrics.inc("configuration_errors_total", backend=name)
                    raise misconfigured from exc
                if is_pool_exhausted(exc):
                    # A saturated pool is not a down backend: no breaker
                    # failure, and no retry (it already waited pool_timeout).
                    breaker.release_probe()
                    metrics.inc("pool_exhausted_total", backend=name)
                    raise PoolExhausted(f"{name} pool exhausted: {exc}") from exc
                if self.transient(exc):
                    metrics.inc("backend_failures_total", backend=name)
                    if shared_failure(exc):  # another call's trip: its sender's call counts it, once
                        breaker.release_probe()
                    else:
                        breaker.record_failure()
                elif isinstance(exc, Exception) and _server_answered(exc):
                    breaker.record_success()
                else:
                    breaker.release_probe()
                raise
            breaker.record_success()
            return result

        n = self.attempts if attempts is None else attempts
        # One plain loop (as redis-py's Retry.call_with_retry): the first
        # attempt costs a function call, no retry machinery is built per call.
        failures = 0
        recovered = False
        while True:
            try:
                if failures:
                    metrics.inc("backend_retries_total", backend=name)
                return attempt()
            except BaseException as exc:
                if not self.transient(exc):
                    if (isinstance(exc, ConfigurationError) and not recovered and self.recover is not None
                            and self.recover(exc)):
                        recovered = True
                        continue
                    raise
                failures += 1
                if failures >= n or breaker.state is not BreakerState.CLOSED:
                    raise BackendUnavailable(f"{name} unavailable: {type(exc).__name__}: {exc}") from exc
            self.sleep(self.backoff(failures))

    def backoff(self, failures: int) -> float:
        """The pause after `failures` consecutive transient failures.

        Exponential with jitter, capped at `max_backoff`: tenacity's
        ``wait_exponential_jitter`` used as a plain function (the first pause
        is ``initial_backoff`` plus up to ``initial_backoff`` of jitter).
        """
        if failures <= 1:
            return min(self.max_backoff, self.initial_backoff * (1.0 + random.random()))  # noqa: S311
        wait = wait_exponential_jitter(max=self.max_backoff, jitter=self.initial_backoff,
                                       **{_JITTER_SCALE: 2 * self.initial_backoff})
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # wait reads attempt_number only
        state.attempt_number = failures - 1
        return float(wait(state))


def _server_answered(exc: Exception) -> bool:
    """An error reply (WRONGTYPE, NOSCRIPT, …) proves the server is up."""
    return isinstance(exc, rex.ResponseError)
