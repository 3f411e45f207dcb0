"""The prefix index: which agent a prefix of its id names (`SessionStore.resolve_agent_prefix`).

The legacy server's ``_uuid_prefix_index``, for agents holding a live binding.
In Redis it is the session index itself (``mcp:session_index:{all}``, see
`mcp_redis.sessions.redis`): its members start with the agent id, so a
lexicographic range on a prefix finds the agents it names, one jump per
agent (``session_resolve.lua``), each then verified against its bindings.
PostgreSQL answers from a bytea range of ``<pg_schema>.sessions``, memory by
a scan; `pick` turns the candidates of any backend into the answer. Agents
without a live binding: `mcp_redis.sessions.agents.AgentDirectory`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

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
    """Prefix lookups on the session index of one `RedisTier`."""

    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier
        self._resolve = tier.conn.script("session_resolve")

    def agents_with_prefix(self, prefix: str, limit: int) -> List[str]:
        """Agents starting with `prefix` that hold a live binding (verified), at most `limit`.

        Checking a candidate drops its dead entries, so a range read again
        after dropping some moves on to further agents.
        """
        tier = self.tier
        raw = prefix.encode("utf-8", "surrogatepass")
        live: List[str] = []
        for _ in range(4):
            found: List[str] = tier.call(self._resolve, keys=[tier.index], args=[raw, limit])
            live = sorted(a for a in found if tier.sessions_for(a, 1))
            if len(live) == len(found) or len(found) < limit:
                return live
        return live
