"""`Resilience.call`: one plain retry loop, with injectable sleep (pure logic)."""

from __future__ import annotations

from typing import List

import pytest
import redis.exceptions as rex

from mcp_redis.errors import BackendUnavailable, ConfigurationError
from mcp_redis.resilience import CircuitBreaker, Resilience


def _flaky(failures: int) -> tuple[List[int], object]:
    calls: List[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise rex.ConnectionError("down")
        return "ok"

    return calls, fn


def test_call_retries_transient_failures_sleeping_between_attempts() -> None:
    pauses: List[float] = []
    policy = Resilience("test", attempts=3, initial_backoff=0.02, max_backoff=0.25, sleep=pauses.append,
                        breaker=CircuitBreaker("test", failure_threshold=10))
    calls, fn = _flaky(2)
    assert policy.call(fn) == "ok"  # type: ignore[arg-type]
    assert len(calls) == 3
    assert len(pauses) == 2
    assert all(0 < p <= 0.25 for p in pauses)


def test_call_gives_up_after_attempts_with_backend_unavailable() -> None:
    pauses: List[float] = []
    policy = Resilience("test", attempts=4, sleep=pauses.append, breaker=CircuitBreaker("test", failure_threshold=10))
    calls, fn = _flaky(10)
    with pytest.raises(BackendUnavailable):
        policy.call(fn)  # type: ignore[arg-type]
    assert len(calls) == 4
    assert len(pauses) == 3  # no pause after the last attempt


def test_a_first_attempt_that_succeeds_never_sleeps() -> None:
    pauses: List[float] = []
    policy = Resilience("test", sleep=pauses.append)
    assert policy.call(lambda: 42) == 42
    assert pauses == []


def test_misconfiguration_is_raised_at_once_without_retry() -> None:
    pauses: List[float] = []
    policy = Resilience("test", attempts=5, sleep=pauses.append,
                        misconfiguration=lambda exc: ConfigurationError("REDIS_URL: wrong password"))
    calls, fn = _flaky(10)
    with pytest.raises(ConfigurationError):
        policy.call(fn)  # type: ignore[arg-type]
    assert len(calls) == 1 and pauses == []


def test_open_breaker_stops_the_retries() -> None:
    pauses: List[float] = []
    policy = Resilience("test", attempts=10, sleep=pauses.append, breaker=CircuitBreaker("test", failure_threshold=2))
    calls, fn = _flaky(100)
    with pytest.raises(BackendUnavailable):
        policy.call(fn)  # type: ignore[arg-type]
    assert len(calls) == 2


def test_backoff_grows_and_is_capped() -> None:
    policy = Resilience("test", initial_backoff=0.01, max_backoff=0.05)
    assert 0.01 <= policy.backoff(1) <= 0.02
    assert all(policy.backoff(n) <= 0.05 for n in range(1, 20))
    assert policy.backoff(10) >= 0.04


@pytest.mark.parametrize("reply, transient", [
    ("UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)", True),
    ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", True),
    ("BUSYGROUP Consumer Group name already exists", False),
    ("ERR unknown command 'FOO'", False),
])
def test_error_replies_that_mean_the_server_cannot_serve_now_are_transient(reply: str, transient: bool) -> None:
    """UNBLOCKED: a blocking read (a stream consumer's XREADGROUP BLOCK) released by a graceful
    failover is retried, on the new master, not raised as a raw redis-py error."""
    from mcp_redis.resilience import is_redis_transient

    assert is_redis_transient(rex.ResponseError(reply)) is transient
