"""The prefix index: which agent a prefix of its id names (`SessionStore.resolve_agent_prefix`).

The legacy server's ``_uuid_prefix_index``. In Redis: ``mcp:session_agents:{index}``
(a ZSET of agent ids, all at score 0, read lexicographically) and its horizons
``mcp:session_agents:{index}#expiry`` (when each agent's latest binding, plus
one refresh interval, ends), one hash slot so one script reads both. The
index only knows horizons: every candidate is verified against its bindings.
PostgreSQL answers from a bytea range of ``<pg_schema>.sessions``, memory by a scan;
`pick` turns the candidates of any backend into the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional

from ..errors import AmbiguousPrefix

if TYPE_CHECKING:
    from .redis import RedisTier

__all__ = ["PrefixIndex", "pick"]


def pick(found: List[str], prefix: str, max_candidates: int) -> Optional[str]:
    """The agent `prefix` names among `found` (sorted, at most max_candidates + 1).

    None when nothing matched; an id equal to `prefix` wins; otherwise two or
    more raise `AmbiguousPrefix` listing at most `max_candidates`.
    """
    if not found:
        return None
    if found[0] == prefix or len(found) == 1:
        return found[0]
    raise AmbiguousPrefix(prefix, found[:max_candidates])


class PrefixIndex:
    """The Redis prefix index of one `RedisTier` (its keys, scripts and policy)."""

    def __init__(self, tier: RedisTier) -> None:
        ks = tier.ks
        self.tier = tier
        self.lex = ks.key("session_agents", "index", tag=True)
        self.horizons = ks.key("session_agents", "index", tag=True, suffix="expiry")
        register = tier.conn.script
        self._add = register("session_agents")
        self._resolve = register("session_resolve")
        self._forget = register("session_forget_agent")
        self._members = register("session_members")

    def add(self, agent_id: str, ttl_ms: int, grace_ms: int, call: Callable[..., Any]) -> None:
        """Index `agent_id` until `ttl_ms` + `grace_ms` from now (Cluster: its own command)."""
        call(self._add, keys=[self.lex, self.horizons], args=[agent_id, ttl_ms, grace_ms])

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        """Agents starting with `prefix` that hold a live binding (verified), at most `limit`.

        Each candidate is checked against its bindings, and one found without
        any is dropped from the index, then the range is read again.
        """
        tier = self.tier
        raw = prefix.encode("utf-8", "surrogatepass")
        bounds = [b"[" + raw, b"(" + raw + b"\xff", limit]
        live: List[str] = []
        for _ in range(4):
            found: List[str] = tier.call(self._resolve, keys=[self.lex, self.horizons], args=bounds)
            live = [a for a in found if tier.sessions_for(a, 64)]
            if len(live) == len(found) or len(found) < limit:
                return live
            for agent in set(found) - set(live):
                self.forget(agent)
        return live

    def forget(self, agent_id: str) -> None:
        """Drop `agent_id` from the index if it has no binding left."""
        tier = self.tier
        index = tier.index_key(agent_id)
        if tier.cluster:  # two slots: check, then remove (a concurrent bind may slip in)
            if not tier.call(self._members, keys=[index], args=[1]):
                tier.call(tier.client.zrem, self.lex, agent_id)
                tier.call(tier.client.zrem, self.horizons, agent_id)
        else:
            tier.call(self._forget, keys=[index, self.lex, self.horizons], args=[agent_id])
