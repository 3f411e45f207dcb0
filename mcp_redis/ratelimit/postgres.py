"""The PostgreSQL rate-limit backend: table ``<pg_schema>.rate_limits``, on the database clock.

It runs the Python models of the Lua scripts (`mcp_redis.ratelimit.algorithms`)
inside one transaction per call, serialised per (name, key) by
``pg_advisory_xact_lock``: exact across every process and host.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple, Type

from ..errors import BackendUnavailable
from ..keys import encode_id
from ..postgres import Postgres, pg_error
from .algorithms import Algorithm, refund_model, run_model
from .base import Policy, Reply, Spec, granted

__all__ = ["PostgresBackend"]

_PG_LOCK_AND_CLOCK = (
    "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint "
    "FROM (SELECT pg_advisory_xact_lock(hashtextextended(%s, 7477)) AS locked) AS l"
)
_PG_READ = (
    "SELECT window_us, state FROM {schema}.rate_limits "
    "WHERE name = %s AND rate_key = %s AND algorithm = %s AND expires_at > clock_timestamp()"
)
_PG_WRITE = (
    "INSERT INTO {schema}.rate_limits (name, rate_key, algorithm, window_us, state, expires_at) "
    "VALUES (%s, %s, %s, %s, %s, to_timestamp(%s / 1000000.0)) "
    "ON CONFLICT (name, rate_key, algorithm, window_us) DO UPDATE SET "
    "state = EXCLUDED.state, expires_at = EXCLUDED.expires_at, updated_at = clock_timestamp()"
)
_PG_SET_STATE = (
    "UPDATE {schema}.rate_limits SET state = %s, updated_at = clock_timestamp() "
    "WHERE name = %s AND rate_key = %s AND algorithm = %s AND window_us = %s"
)
_PG_DELETE_ONE = "DELETE FROM {schema}.rate_limits WHERE name = %s AND rate_key = %s AND algorithm = %s AND window_us = %s"
_PG_SWEEP = "DELETE FROM {schema}.rate_limits WHERE expires_at < clock_timestamp() - interval '1 minute'"


class PostgresBackend:
    """`<pg_schema>.rate_limits`: one transaction per hit, serialised per (name, key).

    ``pg_advisory_xact_lock`` on the (name, key) hash makes read-check-write
    atomic across every process and host (exact under concurrency, every
    algorithm, all or nothing over several limits); the clock is the
    database's ``clock_timestamp()``. Rows carry ``expires_at``: expired rows
    are ignored and swept every 1,000 writes of a process.
    """

    name = "postgres"

    def __init__(self, pg: Postgres) -> None:
        self.pg = pg
        # psycopg2 is imported when PostgreSQL is first used, not by `import mcp_redis`.
        self.errors: Tuple[Type[BaseException], ...] = (BackendUnavailable, pg_error())
        self._writes = 0

    def acquire(self, policy: Policy, key: str, cost: int, consume: bool, now_us: Optional[int] = None) -> Reply:
        """One transaction: lock (name, key), read its rows, run the model, write the rows consumed.

        The clock is the database's ``clock_timestamp()`` unless `now_us` is given.
        """
        algorithm, name, specs = policy.algorithm, policy.name, policy.specs
        self.pg.ensure_schema()
        reply: Reply = self.pg.policy.call(self._transaction, algorithm, name, key, specs, cost, consume,
                                                  now_us)
        if consume and reply.allowed:
            self._writes += 1
            if self._writes >= 1000:
                self._writes = 0
                try:
                    self.pg.execute(self.pg.sql(_PG_SWEEP))
                except BackendUnavailable:  # pragma: no cover - next sweep will do
                    pass
        return reply

    def _transaction(
        self, algorithm: Algorithm, name: str, key: str, specs: Sequence[Spec], cost: int, consume: bool,
        now_us: Optional[int],
    ) -> Reply:
        # Encoded ids: injective, and free of NUL, which TEXT cannot hold.
        name, key = encode_id(name), encode_id(key)
        with self.pg.connection() as conn, conn.cursor() as cur:
            cur.execute(_PG_LOCK_AND_CLOCK, (f"{name}:{key}",))
            row = cur.fetchone()
            assert row is not None
            now = int(row[0]) if now_us is None else now_us
            cur.execute(self.pg.sql(_PG_READ), (name, key, algorithm.value))
            found = {int(w): s for w, s in cur.fetchall()}
            states = [found.get(window) for _, window in specs]
            reply, written = run_model(algorithm, states, now, specs, cost, consume)
            if written:
                reply = granted(reply, now)
                cur.executemany(self.pg.sql(_PG_WRITE), [
                    (name, key, algorithm.value, window, json.dumps(state), now + ttl)
                    for (_, window), (state, ttl) in zip(specs, written)
                ])
        return reply

    def refund(self, policy: Policy, key: str, cost: int, reply: Reply, elapsed_us: int) -> bool:
        """One transaction, serialised like a hit: `refund_model` on the rows; the hit's clock reading is the ticket."""
        hit_us = getattr(reply, "ticket", None)
        if hit_us is None:
            return False
        # One attempt, like the Redis refund: a commit whose reply was lost
        # may have landed, and run again it would give the units back twice.
        done: bool = self.pg.policy.call(self._refund, policy, key, cost, reply, int(hit_us), attempts=1)
        return done

    def _refund(self, policy: Policy, key: str, cost: int, reply: Reply, hit_us: int) -> bool:
        algorithm, specs = policy.algorithm, policy.specs
        name, key = encode_id(policy.name), encode_id(key)
        with self.pg.connection() as conn, conn.cursor() as cur:
            cur.execute(_PG_LOCK_AND_CLOCK, (f"{name}:{key}",))
            row = cur.fetchone()
            assert row is not None
            now = int(row[0])
            cur.execute(self.pg.sql(_PG_READ + " AND window_us = ANY(%s)"),
                        (name, key, algorithm.value, [w for _, w in specs]))
            found = {int(w): s for w, s in cur.fetchall()}
            states = [found.get(w) for _, w in specs]
            changed = refund_model(algorithm, states, now, specs, cost, hit_us,
                                   [o.reset_after_us for o in reply.outcomes])
            for (_, window), new in zip(specs, changed):
                if new is None:
                    continue
                state, ttl = new
                if state is None:
                    cur.execute(self.pg.sql(_PG_DELETE_ONE), (name, key, algorithm.value, window))
                elif ttl is None:
                    cur.execute(self.pg.sql(_PG_SET_STATE), (json.dumps(state), name, key, algorithm.value, window))
                else:
                    cur.execute(self.pg.sql(_PG_WRITE), (name, key, algorithm.value, window, json.dumps(state), now + ttl))
        return any(new is not None for new in changed)

    def clear_all(self, policy: Policy) -> None:
        """Delete every row of the limiter."""
        self.pg.ensure_schema()
        self.pg.execute(self.pg.sql("DELETE FROM {schema}.rate_limits WHERE name = %s AND algorithm = %s"),
                        (encode_id(policy.name), policy.algorithm.value))

    def clear(self, policy: Policy, key: str) -> None:
        """Delete the key's rows of every limit of `policy`."""
        algorithm, specs = policy.algorithm, policy.specs
        name, key = encode_id(policy.name), encode_id(key)
        self.pg.execute(self.pg.sql(
            "DELETE FROM {schema}.rate_limits WHERE name = %s AND rate_key = %s AND algorithm = %s "
            "AND window_us = ANY(%s)"),
            (name, key, algorithm.value, [window for _, window in specs]),
        )

