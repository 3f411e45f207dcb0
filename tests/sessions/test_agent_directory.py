"""The agent directory: the legacy ``_uuid_prefix_index`` forms resolve for every registered agent.

Parametrised over the sessions modes that keep it: ``redis`` (Redis only),
``write_through`` (PostgreSQL record, Redis cache), ``postgres`` and ``local``.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

import mcp_redis
from mcp_redis import SessionStore
from mcp_redis.sessions import AgentDirectory

AGENT = "0f8e2a4c-6b1d-4e3f-9a7c-5d2b8e1f4a60"
TWIN = "0f8e2a4c-6b1d-ffff-0000-000000000000"  # the same 12-character prefix
PREFIX12 = AGENT[:12]


@pytest.fixture(params=["redis", "write_through", "postgres", "local"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        mcp_redis.configure(redis_url=request.getfixturevalue("redis_url"))
        mcp_redis.default_client().redis("sessions").client.flushdb()
    elif request.param == "write_through":
        mcp_redis.configure(redis_url=request.getfixturevalue("redis_url"),
                            database_url=request.getfixturevalue("database_url"))
        mcp_redis.default_client().redis("sessions").client.flushdb()
    elif request.param == "postgres":
        mcp_redis.configure(database_url=request.getfixturevalue("database_url"), sessions="postgres")
    else:
        mcp_redis.configure(sessions="local")
    if request.param in ("write_through", "postgres"):
        pg = mcp_redis.default_client().postgres()
        pg.ensure_schema()
        pg.execute(pg.sql("TRUNCATE {schema}.agent_directory"))
    yield request.param


def test_prefix12_and_agent_key_form_resolve_after_unbind_and_after_the_ttl(mode: str) -> None:
    store, directory = SessionStore(), AgentDirectory()
    assert directory.register(AGENT) == AGENT
    store.bind("s1", AGENT)
    assert store.unbind("s1")
    assert store.resolve_agent_prefix(PREFIX12) == AGENT
    assert store.resolve_agent_prefix("agent-" + PREFIX12) == AGENT
    store.bind("s2", AGENT, ttl=0.05)
    time.sleep(0.15)  # expiry is a deadline: 0.1 s past it
    assert store.get("s2") is None
    assert store.resolve_agent_prefix(PREFIX12) == AGENT
    assert directory.resolve("agent-" + PREFIX12) == AGENT
    assert directory.resolve(AGENT) == AGENT


def test_the_first_agent_registered_under_a_prefix_keeps_it(mode: str) -> None:
    directory = AgentDirectory()
    assert directory.register(AGENT) == AGENT
    assert directory.register(TWIN) == AGENT  # refused: the prefix never moves silently
    assert directory.register(AGENT) == AGENT
    assert directory.resolve(PREFIX12) == AGENT
    assert directory.resolve(TWIN) is None  # a whole id resolves only to itself
    assert directory.unregister(TWIN) is False
    assert directory.unregister(AGENT) is True
    assert directory.resolve(PREFIX12) is None
    assert directory.register(TWIN) == TWIN
    assert directory.resolve("agent-" + PREFIX12) == TWIN


def test_an_unregistered_agent_and_short_prefixes_do_not_resolve(mode: str) -> None:
    directory = AgentDirectory()
    directory.register(AGENT)
    assert directory.resolve(PREFIX12[:8]) is None  # only the legacy 12-character form
    assert directory.resolve("agent-" + PREFIX12[:8]) is None
    assert directory.resolve("1234567890ab") is None


def test_the_directory_is_rebuilt_from_postgres_after_a_redis_flushdb(redis_url: str, database_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url, database_url=database_url)
    redis = mcp_redis.default_client().redis("sessions").client
    directory = AgentDirectory()
    directory.register(AGENT)
    redis.flushdb()
    assert directory.resolve("agent-" + PREFIX12) == AGENT
    keys = redis.keys("mcp:agent_prefix:*")
    assert keys == ["mcp:agent_prefix:" + PREFIX12]
    assert redis.pttl(keys[0]) > 0  # rebuilt, with a TTL
    assert directory.register(TWIN) == AGENT  # the record, not the cache, decides


def test_every_directory_key_in_redis_has_a_ttl(redis_url: str) -> None:
    mcp_redis.configure(redis_url=redis_url)
    redis = mcp_redis.default_client().redis("sessions").client
    redis.flushdb()
    AgentDirectory().register(AGENT)
    keys = redis.keys("mcp:agent_prefix:*")
    assert keys and all(redis.pttl(k) > 0 for k in keys)


def test_bad_arguments_are_refused_naming_them(mode: str) -> None:
    directory = AgentDirectory()
    with pytest.raises(mcp_redis.InvalidArgument) as info:
        directory.register("")
    assert info.value.argument == "agent_id"
    with pytest.raises(mcp_redis.InvalidArgumentType) as type_info:
        directory.resolve(42)  # type: ignore[arg-type]
    assert type_info.value.argument == "text"


def test_postgres_mode_without_a_database_refuses_instead_of_keeping_nothing() -> None:
    mcp_redis.configure(sessions="postgres")
    with pytest.raises(mcp_redis.ConfigurationError, match="DATABASE_URL"):  # as SessionStore says
        AgentDirectory().register(AGENT)


def test_a_whole_id_shaped_like_a_key_form_resolves_to_itself(mode: str) -> None:
    # "agent-<12 characters>" is also how a prefix is written in keys: a registered
    # id of exactly that shape still resolves to itself.
    directory = AgentDirectory()
    assert directory.register("agent-abcdefabcdef") == "agent-abcdefabcdef"
    assert directory.resolve("agent-abcdefabcdef") == "agent-abcdefabcdef"
    assert directory.resolve("agent-abcdef") == "agent-abcdefabcdef"  # its own 12-character prefix
    assert directory.register("abcdefabcdef-0000") == "abcdefabcdef-0000"
    assert directory.resolve("agent-abcdefabcdef") == "agent-abcdefabcdef", "the whole id wins over the key form"
    assert directory.resolve("abcdefabcdef") == "abcdefabcdef-0000"


def test_unregister_while_redis_is_down_raises_and_a_retry_once_it_answers_stops_the_copy_resolving(
        redis_server: object, database_url: str) -> None:
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:  # type: ignore[attr-defined]
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url, retry_attempts=1)
        directory = AgentDirectory()
        assert directory.register(AGENT) == AGENT
        assert directory.resolve(PREFIX12) == AGENT  # cached in Redis
        proxy.drop()
        with pytest.raises(mcp_redis.BackendUnavailable, match="call unregister again"):
            directory.unregister(AGENT)
        proxy.pass_through()
        mcp_redis.default_client().redis("sessions").policy.breaker.record_success()
        assert directory.unregister(AGENT) is True  # Redis's copy, this time
        assert directory.resolve(PREFIX12) is None


def test_a_registration_whose_redis_write_lands_late_never_outlives_an_unregister_made_meanwhile(
        redis_server: object, database_url: str) -> None:
    """One process re-registers while its link to Redis is slow; another unregisters the agent in
    between. The late write must not leave Redis resolving an agent PostgreSQL no longer has
    (it did, for the entry's 7 days): the record stays locked until Redis has the entry."""
    import threading

    from mcp_redis.testing import wait_for
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:  # type: ignore[attr-defined]
        slow = mcp_redis.Client(redis_url=proxy.url(), database_url=database_url)
        fast = mcp_redis.Client(redis_url=redis_server.url, database_url=database_url)  # type: ignore[attr-defined]
        try:
            assert AgentDirectory(client=fast).register(AGENT) == AGENT
            AgentDirectory(client=slow).resolve(PREFIX12)  # the slow process's connections, made now
            proxy.delay_requests(1.0)
            again = threading.Thread(target=AgentDirectory(client=slow).register, args=(AGENT,))
            again.start()
            wait_for(lambda: proxy.stats.get("requests_delayed", 0) >= 1, what="its Redis write on the way")
            assert AgentDirectory(client=fast).unregister(AGENT) is True
            again.join(10)
            assert AgentDirectory(client=fast).resolve(PREFIX12) is None
            assert AgentDirectory(client=fast).resolve(AGENT) is None
            # The same for a read repair (after a FLUSHDB) racing an unregister.
            proxy.delay_requests(0)
            assert AgentDirectory(client=fast).register(AGENT) == AGENT
            redis_server.client().flushdb()  # type: ignore[attr-defined]
            proxy.delay_requests(0.5)
            delayed = proxy.stats.get("requests_delayed", 0)
            repair = threading.Thread(target=AgentDirectory(client=slow).resolve, args=(PREFIX12,))
            repair.start()
            wait_for(lambda: proxy.stats.get("requests_delayed", 0) >= delayed + 2, what="its repair write on the way")
            assert AgentDirectory(client=fast).unregister(AGENT) is True
            repair.join(10)
            assert AgentDirectory(client=fast).resolve(PREFIX12) is None
        finally:
            slow.close()
            fast.close()


def test_with_a_database_the_redis_copy_lives_an_hour_and_a_hung_redis_holds_the_record_one_attempt(
        redis_server: object, database_url: str) -> None:
    """The copy's TTL bounds how long a write that reached Redis after its writer gave up can
    outlive an unregister; the record's row is locked for one Redis attempt, not the retries."""
    from mcp_redis.metrics import METRICS
    from mcp_redis.testing.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", redis_server.port) as proxy:  # type: ignore[attr-defined]
        mcp_redis.configure(redis_url=proxy.url(), database_url=database_url, socket_timeout=0.5)
        directory = AgentDirectory()
        assert directory.register(AGENT) == AGENT
        key = f"mcp:agent_prefix:{PREFIX12}"
        assert 0 < redis_server.client().pttl(key) <= 3600 * 1000  # type: ignore[attr-defined]  # an hour
        proxy.blackhole()
        retries = METRICS.counter("backend_retries_total", backend="redis")
        assert directory.register(AGENT) == AGENT  # the record answers; the copy is skipped
        assert METRICS.counter("backend_retries_total", backend="redis") == retries


def test_redis_alone_register_and_unregister_never_lose_a_registration_to_a_concurrent_one(redis_url: str) -> None:
    """With Redis alone, register was SET NX then GET, and unregister GET then DEL. Another
    process's unregister landing in register's gap made it answer "registered" with nothing
    stored; an unregister(A) + register(B) landing in unregister's gap deleted B's
    registration (a reviewer). Each is now one atomic command or script."""
    prefix = "0f8e2a4c6b1d"
    a, b = prefix + "-aaaa-holder", prefix + "-bbbb-second"
    ours = mcp_redis.Client(redis_url=redis_url, sessions="redis")
    theirs = mcp_redis.Client(redis_url=redis_url, sessions="redis")  # another process, in effect
    directory, other = AgentDirectory(client=ours), AgentDirectory(client=theirs)
    client = ours.redis("sessions").client
    real_get = client.get
    try:
        assert directory.register(a) == a

        def get_then_a_is_unregistered(key: str) -> object:
            client.get = real_get
            assert other.unregister(a)
            return real_get(key)

        client.get = get_then_a_is_unregistered
        holder = directory.register(b)  # a holds the prefix when it is asked
        client.get = real_get
        assert holder == a and directory.resolve(prefix) == a  # "a holds it", and it does

        assert directory.register(a) == a

        def get_then_b_takes_the_prefix(key: str) -> object:
            value = real_get(key)
            client.get = real_get
            assert other.unregister(a) and other.register(b) == b
            return value

        client.get = get_then_b_takes_the_prefix
        directory.unregister(a)  # a's own registration at most, never b's
        if client.get is not real_get:  # nothing read in a gap: b registers now
            client.get = real_get
            assert other.register(b) == b
        assert directory.resolve(prefix) == b and directory.resolve(b) == b
    finally:
        client.get = real_get
        ours.close()
        theirs.close()
