"""The Redis L2 tier of the metadata cache (`Backend` over one deployment).

One per client (``client.singleton``), on the cache deployment
(``client.redis("metadata_cache")``: ``MCP_REDIS_CACHE_URL``, else
``REDIS_URL``), so caches can live on an evicting Redis. Each verb is one
round trip through the connection's resilience policy; the scripts
(``cache_fill``, ``cache_invalidate``, ``cache_generation`` in
``mcp_redis/lua/``) come from the client's `ScriptSet`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, List, Optional, Sequence, Tuple, Type

import redis.exceptions as rex

from ..connections import RedisConnection
from ..errors import BackendUnavailable
from ..scripts import lua
from .base import Fill

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["RedisBackend"]


class RedisBackend:
    """The L2 tier on Redis: JSON envelopes, epoch keys, generation keys."""

    errors: ClassVar[Tuple[Type[BaseException], ...]] = (BackendUnavailable, rex.RedisError)

    def __init__(self, client: Client) -> None:
        self._client = client
        self._conn: Optional[RedisConnection] = None

    @property
    def conn(self) -> RedisConnection:
        """The cache deployment's connection (raises `BackendUnavailable`/`ConfigurationError`).

        Kept after first use: a client builds one connection per deployment
        and this backend lives and dies with the client (and its fork reset).
        """
        conn = self._conn
        if conn is None:
            conn = self._conn = self._client.redis("metadata_cache")
        return conn

    @property
    def available(self) -> bool:
        return (self._conn or self.conn).policy.available

    def generation(self, key: str, px: int) -> str:
        conn = self.conn
        # GETEX keeps a generation in use alive; a missing one reads as "0".
        return str(conn.call(conn.client.getex, key, px=px) or "0")

    def get(self, key: str) -> Optional[str]:
        conn = self._conn or self.conn
        return conn.call(conn.get, key)

    def get_all(self, keys: Sequence[str]) -> List[Optional[str]]:
        conn = self.conn
        mget = conn.client.mget_nonatomic if conn.is_cluster else conn.client.mget
        return list(conn.call(mget, list(keys)))

    def begin(self, value_key: str, epoch_key: str, marker_px: int) -> Tuple[Optional[str], str]:
        conn = self.conn
        raw, epoch = conn.call(conn.run_script, conn.script("cache_begin"), [value_key, epoch_key], [marker_px])
        return raw, str(epoch)

    def begin_many(self, entries: Sequence[Tuple[str, str]], marker_px: int) -> List[str]:
        conn = self.conn
        return [str(reply[1]) for reply in conn.call(self._begin_pipeline, conn, entries, marker_px)]

    @staticmethod
    def _begin_pipeline(conn: RedisConnection, entries: Sequence[Tuple[str, str]], marker_px: int) -> Any:
        pipe = conn.client.pipeline(transaction=False)  # EVAL, as in _fill_pipeline
        for value_key, epoch_key in entries:
            pipe.execute_command("EVAL", lua("cache_begin"), 2, value_key, epoch_key, marker_px)
        return pipe.execute()

    def abandon(self, epoch_keys: Sequence[Tuple[str, str]]) -> None:
        conn = self.conn
        if len(epoch_keys) == 1:
            conn.call(conn.run_script, conn.script("cache_abandon"), [epoch_keys[0][0]], [epoch_keys[0][1]])
        else:
            conn.call(self._abandon_pipeline, conn, epoch_keys)

    @staticmethod
    def _abandon_pipeline(conn: RedisConnection, epoch_keys: Sequence[Tuple[str, str]]) -> Any:
        pipe = conn.client.pipeline(transaction=False)  # EVAL, as in _fill_pipeline
        for epoch_key, marker in epoch_keys:
            pipe.execute_command("EVAL", lua("cache_abandon"), 1, epoch_key, marker)
        return pipe.execute()

    def fill(self, value_key: str, epoch_key: str, epoch: str, envelope: str, px: int) -> None:
        conn = self.conn
        conn.call(conn.run_script, conn.script("cache_fill"), [value_key, epoch_key], [epoch, envelope, px])

    def fill_many(self, fills: Sequence[Fill]) -> None:
        conn = self.conn
        conn.call(self._fill_pipeline, conn, fills)

    @staticmethod
    def _fill_pipeline(conn: RedisConnection, fills: Sequence[Fill]) -> Any:
        # EVAL, not EVALSHA: a cluster pipeline does not load scripts per node
        # (and its .eval() is no command), so the command is sent as is.
        pipe = conn.client.pipeline(transaction=False)
        for f in fills:
            pipe.execute_command("EVAL", lua("cache_fill"), 2, f.value_key, f.epoch_key, f.epoch, f.envelope, f.px)
        return pipe.execute()

    def write(self, value_key: str, epoch_key: str, guard_px: int, channel: str,
              envelope: str, px: int, message: str) -> None:
        conn = self.conn
        conn.call(conn.run_script, conn.script("cache_invalidate"), [value_key, epoch_key],
                  [guard_px, channel, envelope, px, message])

    def bump_generation(self, key: str, guard_px: int, channel: str, message_prefix: str) -> str:
        conn = self.conn
        return str(conn.call(conn.run_script, conn.script("cache_generation"), [key], [guard_px, channel, message_prefix]))

    def claim(self, key: str, token: str, px: int) -> bool:
        """``SET NX PX``; True also when the key already holds `token`: an attempt whose reply was
        lost set it, and the retry must not wait for its own lock (``GET`` tells, Redis ≥ 7.0)."""
        conn = self.conn
        held = conn.call(conn.client.set, key, token, nx=True, px=px, get=True)
        return held is None or held == token or held == token.encode()

    def release(self, key: str) -> None:
        conn = self.conn
        conn.call(conn.client.delete, key)
