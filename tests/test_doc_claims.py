"""Sentences of the docs that no other test backed: each test names the doc it checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

import mcp_redis
from mcp_redis.compat import StateLockManager

LIVE = r"L[0-9a-f]{24}\|"
NONCE = r"[0-9a-f]{32}"


def _raw(redis_url: str, key: str) -> object:
    return redis.Redis.from_url(redis_url, decode_responses=True).get(key)


# docs/locks.md (acquire(token=...), Keys), README.md: the lock key's value format.
def test_lock_key_holds_liveness_id_then_token_and_nonce(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims", timeout=10)
    assert lk.acquire(token="job-42")
    try:
        value = _raw(redis_mode, "mcp:lock:{doc-claims}")
        assert isinstance(value, str) and re.fullmatch(LIVE + r"job-42:" + NONCE, value), value
        assert value.split("|", 1)[1].startswith("job-42:")
    finally:
        lk.release()


def test_lock_key_without_token_holds_liveness_id_then_nonce(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims", timeout=10)
    assert lk.acquire()
    try:
        value = _raw(redis_mode, "mcp:lock:{doc-claims}")
        assert isinstance(value, str) and re.fullmatch(LIVE + NONCE, value), value
    finally:
        lk.release()


# docs/locks.md: "`sleep` is accepted and ignored".
def test_lock_with_sleep_given_acquires_and_releases_like_without(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims-sleep", timeout=10, sleep=5.0)
    assert lk.acquire(blocking_timeout=1)
    assert lk.owned()
    other = mcp_redis.lock("doc-claims-sleep", timeout=10, sleep=5.0, thread_local=False)
    assert other.acquire(blocking=False) is False
    lk.release()
    assert _raw(redis_mode, "mcp:lock:{doc-claims-sleep}") is None
    assert other.acquire(blocking=False) is True
    other.release()


# docs/locks.md (Keys): the `…#e<id>` extend record expires after 10.75 s with the defaults.
def test_extend_record_expires_after_the_retry_window(redis_mode: str) -> None:
    lk = mcp_redis.lock("doc-claims-extend", timeout=10)
    assert lk.acquire()
    try:
        assert lk.extend(5)
        r = redis.Redis.from_url(redis_mode, decode_responses=True)
        records = [k for k in r.scan_iter("mcp:lock:{doc-claims-extend}#e*")]
        assert len(records) == 1, records
        assert re.fullmatch(r"mcp:lock:\{doc-claims-extend\}#e[0-9a-f]{24}", records[0])
        assert 10_000 < r.pttl(records[0]) <= 10_750
    finally:
        lk.release()


# docs/reliability.md (Failover): the default policy.
def test_default_policy_is_3_attempts_20_to_250_ms_breaker_5_reset_1_s() -> None:
    s = mcp_redis.settings()
    assert s.retry_attempts == 3
    assert s.retry_initial_backoff == 0.02
    assert s.retry_max_backoff == 0.25
    assert s.breaker_failure_threshold == 5
    assert s.breaker_reset_timeout == 1.0


# docs/migration.md (Agent ids in local mode): the compat lock refuses ids that name no file.
@pytest.mark.parametrize("agent_id", ["a/b", "a\x00b", ".", ".."])
def test_compat_lock_in_local_mode_refuses_ids_that_name_no_file(agent_id: str, tmp_path: Path) -> None:
    mcp_redis.configure(locks="local")
    manager = StateLockManager(lock_dir=str(tmp_path))
    with pytest.raises(ValueError, match="agent_id") as info:
        with manager.acquire_agent_lock(agent_id, timeout=0.5, max_retries=1):
            pass
    assert isinstance(info.value, mcp_redis.InvalidArgument)
    assert list(tmp_path.iterdir()) == []


def test_compat_lock_in_local_mode_accepts_a_plain_id(tmp_path: Path) -> None:
    mcp_redis.configure(locks="local")
    manager = StateLockManager(lock_dir=str(tmp_path))
    with manager.acquire_agent_lock("agent-1", timeout=0.5, max_retries=1):
        pass
