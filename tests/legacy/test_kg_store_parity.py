# Behaviour re-stated from the legacy server, CIRWEL/unitares (Apache-2.0):
# the observable behaviour of KnowledgeGraphAGE._check_rate_limit and
# add_discovery in https://github.com/CIRWEL/unitares,
# src/storage/knowledge_graph_age.py (commit 1a74e5a0d19f39915794024bba3cd76dde82d263):
# its limit, window, per-agent key, ValueError and message text (quoted
# below), and its place inside the store's transaction. Re-stated as a small
# in-process model for mcp_redis; not the legacy code itself.
"""`compat.kg_store_rate_limited` behaves as the legacy ``kg_store`` check, call for call."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List, Tuple, Union

import pytest

import mcp_redis
from mcp_redis import compat

Outcome = Union[str, Tuple[str, str]]


class LegacyKgStore:
    """The legacy check's observable behaviour: 20 stores per agent per sliding hour, inside the store's transaction.

    The check inserts a row when fewer than the limit were stored in the
    last hour, else raises ValueError; a store that fails afterwards rolls
    the transaction back, row included.
    """

    rate_limit_stores_per_hour = 20

    def __init__(self) -> None:
        self.rows: Dict[str, int] = {}

    def add_discovery(self, agent_id: str, fail: bool) -> str:
        count = self.rows.get(agent_id, 0)
        if count >= self.rate_limit_stores_per_hour:
            raise ValueError(
                f"Rate limit exceeded: Agent '{agent_id}' has stored {count} "
                f"discoveries in the last hour (limit: {self.rate_limit_stores_per_hour}/hour). "
                f"This prevents knowledge graph poisoning flood attacks. "
                f"Please wait before storing more discoveries."
            )
        self.rows[agent_id] = count + 1  # the INSERT, in the transaction
        if fail:
            self.rows[agent_id] = count  # ROLLBACK
            raise RuntimeError("graph write failed")
        return "stored"


#: (agent, the store fails): 25 stores of one agent, two of them failing, and another agent.
SCENARIO = [("agent-a", i in (3, 7)) for i in range(25)] + [("agent-b", False)] * 2 + [("agent-a", False)]


def outcomes(store: Callable[[str, bool], Any]) -> List[Outcome]:
    out: List[Outcome] = []
    for agent, fail in SCENARIO:
        try:
            out.append(store(agent, fail))
        except ValueError as exc:
            out.append(("ValueError", str(exc)))
        except RuntimeError:
            out.append("RuntimeError")
    return out


@pytest.fixture(params=["redis", "postgres"])
def shared_backend(request: pytest.FixtureRequest) -> None:
    if request.param == "redis":
        mcp_redis.configure(redis_url=request.getfixturevalue("redis_url"))
    else:
        mcp_redis.configure(database_url=request.getfixturevalue("database_url"), rate_limits="postgres")


def test_kg_store_rate_limited_answers_every_call_as_the_legacy_check(shared_backend: None) -> None:
    @compat.kg_store_rate_limited()
    def add_discovery(agent_id: str, fail: bool) -> str:
        if fail:
            raise RuntimeError("graph write failed")
        return "stored"

    expected = outcomes(LegacyKgStore().add_discovery)
    # 20 for agent-a (its two failed stores gave their slots back), 2 for agent-b; 4 refusals.
    assert expected.count("stored") == 22 and sum(isinstance(o, tuple) for o in expected) == 4
    assert outcomes(add_discovery) == expected


def test_kg_store_rate_limited_on_a_method_keyed_by_the_discoverys_agent(shared_backend: None) -> None:
    class Discovery:
        def __init__(self, agent_id: str) -> None:
            self.agent_id = agent_id

    class Graph:
        @compat.kg_store_rate_limited(key=lambda self, discovery, fail: discovery.agent_id)
        async def add_discovery(self, discovery: Discovery, fail: bool) -> str:
            if fail:
                raise RuntimeError("graph write failed")
            return "stored"

    graph = Graph()
    expected = outcomes(LegacyKgStore().add_discovery)
    assert outcomes(lambda agent, fail: asyncio.run(graph.add_discovery(Discovery(agent), fail))) == expected


def test_the_refusal_is_a_value_error_and_a_rate_limit_exceeded(shared_backend: None) -> None:
    @compat.kg_store_rate_limited(limit=1)
    def add_discovery(agent_id: str) -> None:
        pass

    add_discovery("agent-a")
    with pytest.raises(ValueError, match=r"Agent 'agent-a' has stored 1 discoveries") as caught:
        add_discovery("agent-a")
    assert isinstance(caught.value, mcp_redis.RateLimitExceeded) and caught.value.retry_after > 0
