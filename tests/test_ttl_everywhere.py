"""No key written by the library lacks a TTL (issue 18).

One module-scoped workload drives every feature against a real redis-server
(locks with their queue, fencing counter, liveness key, watchdog renewal,
extend, reacquire and the PostgreSQL fallback gate; every rate-limit algorithm
with refunds, multi-limit, peek, reset and a refused call; the metadata cache
with fills, negative entries, invalidation and the generation bump; sessions
bind, touch, rebind, unbind, prefix lookup and the agent directory; pub/sub,
streams with a consumer group and a dead-lettered event; the compat
StateLockManager and RateLimiter; the RedisBackend facade; health and stats),
then SCANs the whole keyspace and records every key's PTTL. Each test checks
one family of keys and lists the offenders (PTTL -1) by name.

The per-name lock fencing counter (``#fence``) is its own case: it was the
one key without a TTL until issue 18 (now one hour), and the case shows that
the workload did write it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest
import redis

import mcp_redis
from mcp_redis.compat import RateLimiter as CompatRateLimiter
from mcp_redis.compat import StateLockManager
from mcp_redis.events import EventBus
from mcp_redis.events.streams import EventStream
from mcp_redis.sessions.agents import AgentDirectory
from mcp_redis.testing import PostgresDatabase, RedisServer, wait_for

ALGORITHMS = ["sliding_window", "sliding_window_counter", "fixed_window", "gcra"]


MIDWAY: Dict[str, int] = {}  # keys that exist only while a call is under way (a waiter's queue), with their PTTL


def _locks(raw: Any) -> None:
    with mcp_redis.agent_lock("ttl-agent-1", timeout=1) as held:  # the watchdog renews a 1 s lease
        assert held.fencing_token
        time.sleep(0.6)  # past one renewal period (a third of the lease): the renewed key keeps a TTL
        with mcp_redis.agent_lock("ttl-agent-1"):  # reentrant
            pass
    lk = mcp_redis.lock("ttl-lock", timeout=30)
    assert lk.acquire()
    lk.extend(10)
    lk.extend(20, replace_ttl=True)
    lk.reacquire()
    # A waiter queued behind the holder: the queue key exists while it waits.
    got: List[bool] = []
    waiter = threading.Thread(target=lambda: got.append(
        mcp_redis.lock("ttl-lock", timeout=30, blocking_timeout=10).acquire()))
    waiter.start()
    wait_for(lambda: any(raw.scan_iter(match="*#queue")), what="the waiter's queue key")
    for key in raw.scan_iter(match="*#queue"):
        MIDWAY[key.decode("utf-8", "backslashreplace")] = raw.pttl(key)
    lk.release()
    waiter.join(15)
    assert got == [True]
    auto = mcp_redis.lock("ttl-auto", timeout=2, auto_renew=True)
    with auto:
        pass
    failed = mcp_redis.lock("ttl-lock", timeout=5, blocking_timeout=0)
    assert not failed.acquire()  # held by the waiter: a refused try


def _rate_limits() -> None:
    for algorithm in ALGORITHMS:
        small = mcp_redis.RateLimiter(f"ttl-{algorithm}", 2, 60, algorithm=algorithm)
        first = small.hit("k1")
        small.hit("k1")
        assert not small.hit("k1").allowed  # refused: over the limit
        small.refund(first)
        small.peek("k1")
        small.hit("k2")
        small.reset("k2")
        small.hit("k3", cost=2)
        big = mcp_redis.RateLimiter(f"ttl-big-{algorithm}", 1000, 60, algorithm=algorithm)
        big.refund(big.hit("k"))
    multi = mcp_redis.RateLimiter("ttl-multi", limits=[(20, 3600), (5, 60)])
    multi.refund(multi.hit("k"))
    multi.hit("k")

    @mcp_redis.rate_limited("ttl-decorated", limit=3, window=60, key="agent_id", refund_on=(KeyError,))
    def tool(agent_id: str, fail: bool = False) -> str:
        if fail:
            raise KeyError(agent_id)
        return agent_id

    tool("a")
    with pytest.raises(KeyError):
        tool("a", fail=True)
    tool("a")
    tool("a")
    with pytest.raises(mcp_redis.RateLimitExceeded):
        tool("a")


def _cache() -> None:
    @mcp_redis.cached_metadata(namespace="ttl.meta", ttl=300, negative_ttl=30)
    def load(agent_id: str) -> Any:
        return None if agent_id.startswith("gone") else {"agent_id": agent_id, "notes": "x" * 200}

    for i in range(5):
        load(f"agent-{i}")
    load("gone-1")
    load.invalidate("agent-0")
    load.set({"agent_id": "agent-9"}, "agent-9")
    load.refresh("agent-1")
    load.invalidate_all()  # the generation bump
    load("agent-2")
    backend = mcp_redis.RedisBackend()
    backend.cache_set("ttl-facade", {"a": 1}, ttl=60)
    assert backend.cache_get("ttl-facade") == {"a": 1}


def _sessions() -> None:
    store = mcp_redis.SessionStore()
    for i in range(3):
        store.bind(f"ttl-session-{i}", "agent-7f3a9c2e-0000-4000-8000-000000000001")
    for i in range(10):  # one agent, ten sessions: its index holds ten entries
        store.bind(f"ttl-many-{i}", "agent-5b1d0000-0000-4000-8000-000000000002")
    store.bind("ttl-session-0", "agent-9c2e0000-0000-4000-8000-000000000003")  # rebind to another agent
    store.touch("ttl-session-1")
    store.get("ttl-session-1")
    store.unbind("ttl-session-2")
    store.sessions_for("agent-5b1d0000-0000-4000-8000-000000000002")
    store.resolve_agent_prefix("agent-7f3a")
    AgentDirectory().register("agent-d1d1d1d1-0000-4000-8000-000000000004")
    backend = mcp_redis.RedisBackend()
    backend.set_session("ttl-facade-session", "agent-facade", ttl=3600)
    backend.get_session("ttl-facade-session")
    with backend.acquire_lock("ttl-facade-lock", timeout=30):
        pass
    backend.check_rate_limit("ttl-facade-rl", 10, 60)


def _events() -> None:
    bus = EventBus()
    seen = threading.Event()
    sub = bus.subscribe("ttl:updates", lambda event: seen.set())
    try:
        bus.publish("ttl:updates", {"agent_id": "a1", "event": "state_changed"})
        assert seen.wait(10)
    finally:
        sub.close()
    mcp_redis.publish_agent_update("a1", "state_changed", {})
    stream = EventStream("ttl-stream", "g", "c", min_idle_ms=0, claim_interval=0, max_deliveries=1, ttl=600)
    stream.add({"poison": True})
    stream.add_many([{"n": 1}, {"n": 2}])

    def handler(event: Dict[str, Any]) -> None:
        if event.get("poison"):
            raise ValueError("poison")

    for _ in range(3):
        stream.process(handler, block_ms=0)
    assert stream.dead_letters()
    EventStream("ttl-plain").add({"n": 1})


def _compat() -> None:
    manager = StateLockManager()
    with manager.acquire_agent_lock("ttl-compat-agent", timeout=2, max_retries=1):
        pass
    limiter = CompatRateLimiter(max_requests_per_minute=2, max_requests_per_hour=10)
    for _ in range(3):
        limiter.check_rate_limit("ttl-compat-agent")
    limiter.get_stats("ttl-compat-agent")


def _fallback_gate(database_url: str, redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, database_url=database_url, lock_fallback="postgres")
    try:
        with mcp_redis.agent_lock("ttl-gated-agent", timeout=5):
            pass
    finally:
        mcp_redis.configure(redis_url=redis_url)


PREFIX: List[str] = ["mcp:"]  # the key prefix in force during the workload
GATED: List[bool] = []  # the PostgreSQL fallback gate was exercised (needs PostgreSQL)


@pytest.fixture(scope="module")
def keyspace(request: pytest.FixtureRequest) -> Iterator[Dict[str, int]]:
    """Every key after the workload, with its PTTL (-1: no TTL)."""
    try:
        pg: Optional[PostgresDatabase] = request.getfixturevalue("pg_database")
    except pytest.skip.Exception:  # no PostgreSQL: everything but the fallback gate
        pg = None
    server = RedisServer().start()
    try:
        mcp_redis.reset(configuration=True)
        mcp_redis.configure(redis_url=server.url)
        PREFIX[:] = [mcp_redis.settings().key_prefix]
        raw = redis.Redis(host=server.host, port=server.port)  # bytes: any key name survives the scan
        _locks(raw)
        _rate_limits()
        _cache()
        _sessions()
        _events()
        _compat()
        if pg is not None:
            _fallback_gate(pg.url, server.url)
            GATED.append(True)
        mcp_redis.health()
        mcp_redis.stats()
        mcp_redis.reset(configuration=True)  # stops watchdogs and listeners: nothing writes after this
        pttl: Dict[str, int] = dict(MIDWAY)
        for key in raw.scan_iter(count=1000):
            name = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key
            ttl = raw.pttl(key)
            if ttl != -2:  # expired between SCAN and PTTL
                pttl[name] = ttl
        yield pttl
    finally:
        mcp_redis.reset(configuration=True)
        server.cleanup()


def family(key: str) -> str:
    if key.endswith("#fence"):
        return "lock fencing counter"
    if not key.startswith(PREFIX[0]):
        return "outside the prefix"
    return "library"


CASES = [
    pytest.param("library", id="every-other-key"),
    pytest.param("lock fencing counter", id="lock-fence-counter"),
]


@pytest.mark.parametrize("kind", CASES)
def test_every_key_has_a_ttl(keyspace: Dict[str, int], kind: str) -> None:
    keys = {k: v for k, v in keyspace.items() if family(k) == kind}
    assert keys, f"the workload wrote no {kind} key: the scan proves nothing"
    offenders = sorted(k for k, v in keys.items() if v < 0)
    assert not offenders, f"{len(offenders)} of {len(keys)} {kind} keys have no TTL: {offenders}"


def test_nothing_is_written_outside_the_prefix(keyspace: Dict[str, int]) -> None:
    outside = sorted(k for k in keyspace if family(k) == "outside the prefix")
    assert not outside, f"keys outside MCP_REDIS_KEY_PREFIX: {outside}"


def test_the_workload_reached_every_feature(keyspace: Dict[str, int]) -> None:
    """Each feature left keys to check (so a feature that stopped writing, or a
    workload step that silently did nothing, does not pass as 'no offender')."""
    text = "\n".join(keyspace)
    for needle in ("ttl-lock", "ttl-agent-1", "#queue", "ttl-sliding_window", "ttl-gcra", "ttl-fixed_window",
                   "ttl-sliding_window_counter", "ttl-multi", "ttl-decorated", "ttl.meta", "ttl-session-",
                   "ttl-many-", "ttl-stream", "ttl-plain", "ttl-compat-agent", "#queue", "#fence", "lock-live",
                   *(("ttl-gated-agent", "#gate") if GATED else ())):
        assert needle in text, f"no key containing {needle!r} after the workload; keys: {sorted(keyspace)}"
