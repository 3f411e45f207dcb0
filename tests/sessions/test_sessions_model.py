"""Property: any sequence of bind/unbind leaves `get`, `sessions_for` and
`resolve_agent_prefix` agreeing with a plain dict model, on real Redis."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcp_redis
from mcp_redis import AmbiguousPrefix, SessionStore
from mcp_redis.testing import RedisServer

SESSIONS = ["s1", "s2", "s\x00", "s\ud800", "s*?"]
AGENTS = ["ab", "abc", "ab\x00", "b\udfff", "zz"]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("bind"), st.sampled_from(SESSIONS), st.sampled_from(AGENTS)),
        st.tuples(st.just("unbind"), st.sampled_from(SESSIONS), st.just("")),
    ),
    max_size=20,
)


@pytest.fixture(params=["redis", "local"])
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return str(request.param)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
def test_bindings_and_indexes_match_a_dict_model(mode: str, redis_server: RedisServer,
                                                 steps: List[Tuple[str, str, str]]) -> None:
    if mode == "redis":
        redis_server.client().flushall()
        mcp_redis.configure(redis_url=redis_server.url)
    else:
        mcp_redis.reset(configuration=True)
        mcp_redis.configure(sessions="local")
    store = SessionStore()
    model: Dict[str, str] = {}
    for op, sid, agent in steps:
        if op == "bind":
            store.bind(sid, agent, ttl=60)
            model[sid] = agent
        else:
            assert store.unbind(sid) == (sid in model)
            model.pop(sid, None)
    for sid in SESSIONS:
        assert store.get(sid) == model.get(sid)
    for agent in AGENTS:
        assert store.sessions_for(agent) == sorted(s for s, a in model.items() if a == agent)
    bound = set(model.values())
    for prefix in ["a", "ab", "b", "z", "q"]:
        matches = sorted(a for a in bound if a.startswith(prefix))
        if prefix in bound or len(matches) == 1:
            expected = prefix if prefix in bound else matches[0]
            assert store.resolve_agent_prefix(prefix) == expected
        elif not matches:
            assert store.resolve_agent_prefix(prefix) is None
        else:
            with pytest.raises(AmbiguousPrefix):
                store.resolve_agent_prefix(prefix)
