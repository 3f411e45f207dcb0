"""The Redis lock backend: one Lua script per operation, a FIFO of waiters, BLPOP wake-ups.

`RedisBackend` is ``locks=redis``; `GatedRedisBackend` is the same under
``lock_fallback=postgres``, where every grant and renewal passes a per-name
gate PostgreSQL vouches for (see its docstring). The scripts are
``mcp_redis/lua/lock_*.lua``, run through the client's `ScriptSet`
(``conn.script(name)``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Any, ClassVar, Hashable, List, Optional, Sequence, Tuple

import redis.exceptions as rex

from ..connections import RedisConnection
from ..metrics import METRICS
from ..resilience import is_unblocked
from ..validation import MAX_SECONDS
from .base import Backend, Hold, LockKeys, ms
from .postgres import _END_EPISODE, _LAST_FENCE, _RECORD_FENCE, advisory_key
from .turns import FairTurns

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["RedisBackend", "FencedRedisBackend", "GatedRedisBackend", "HANDOFF_GRACE", "LIVENESS_TTL", "FENCE_TTL"]

log = logging.getLogger("mcp_redis.locks")

#: How long (s) a lock released to a waiter stays reserved for it; a waiter
#: that died while queued delays the next holder by at most this. Also the
#: default of lock_release.lua (1000 ms), which a release does not send.
HANDOFF_GRACE = 1.0
# The longest single BLPOP (s); also bounded by half the socket timeout.
_MAX_WAIT_SLICE = 1.0
# Redis's default cron period (hz 10): how late an idle server may time out a BLPOP.
_SERVER_TICK = 0.1
_RESERVED = "r:"
_TICKET = re.compile(r"[0-9a-f]{24}")
#: How long (s) a lock's fencing counter (``…#fence``) lives after it was
#: last raised above the clock (or created): the literal 3600000 in
#: lock_fence.lua and lock_gate.lua. Tokens still rise across its expiry
#: (see the end of lock_fence.lua) while no token runs more than this
#: ahead of the Redis server's clock.
FENCE_TTL = 3600.0
#: How long (s) a process's liveness key outlives its last heartbeat, by default
#: (setting ``lock_liveness_ttl``): a holder process that died stops blocking
#: others this long after its last beat (the watchdog beats every third of it
#: while the process holds a lock).
LIVENESS_TTL = 1.5
# A holder's value starts with its process's liveness id: "L" + 24 hex + "|".
_LIVE_TAG = re.compile(r"L([0-9a-f]{24})\|")


def record_ms(settings: Any) -> int:
    """How long (ms) a per-call record must last: past every retry of that call.

    A retry reaches the server at most one connect, one reply timeout and one
    backoff after the attempt before it; a second and further retries each
    find the record made by the attempt that ran. One second of slack.
    """
    s = settings
    per_attempt = s.socket_connect_timeout + s.socket_timeout + s.retry_max_backoff
    return ms(max(1, s.retry_attempts) * per_attempt + 1.0)


class RedisBackend(Backend):
    """Lease locks in Redis: Lua scripts, a FIFO of waiters, BLPOP wake-ups."""

    name = "redis"
    leased = True
    renews_in_batches = True
    heartbeat_every: Optional[float] = LIVENESS_TTL / 3  # per client: a third of its lock_liveness_ttl
    #: Draw every grant's fencing token with the grant (as ``fencing=True``).
    #: True when a fallback is configured: a hold taken through Redis must
    #: still have its token when Redis goes away mid-hold, the outage the
    #: fallback is for (a token drawn on first read would be unavailable).
    fence_with_grant: ClassVar[bool] = False

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        # Settings are fixed per client: computed once, not per release.
        self._record_ms = record_ms(client.settings)
        self._liveness_ttl = client.settings.lock_liveness_ttl
        self._beat_every = self._liveness_ttl / 3
        self.heartbeat_every = self._beat_every
        # One waiter per lock in Redis from this process; its other threads
        # wanting that lock wait their turn here, in FIFO order, holding no
        # pooled connection (else a crowd of waiters could take every
        # connection and leave none for the holder's release).
        self._turns = FairTurns()
        # This process's liveness (per client, so a forked child has its own):
        # every value it holds starts with `_live_tag`; while `_live_key`
        # exists the holder is alive, however old its lease. Beaten by the
        # watchdog; an acquire beats first only when the last beat is a third
        # of lock_liveness_ttl old (so a hot loop pays no extra round trip).
        live_id = secrets.token_hex(12)
        self._live_tag = f"L{live_id}|"
        self._live_key = _live_key(client.settings.key_prefix, live_id)
        self._live_ok_until = 0.0
        # What the beats prove (monotonic times): the key lives at least until
        # `_live_until` (the last beat's send time + lock_liveness_ttl), and it may
        # have lapsed at `_live_gap_at` (a beat answered after the one before
        # it could have expired; -inf: never since this client began).
        self._live_until = 0.0
        self._live_gap_at = float("-inf")
        # True once a lock script has run on this client: until then every
        # acquire takes the script path, so a user whose ACL refuses scripts
        # (EVALSHA) is refused before holding anything, instead of holding a
        # lock it cannot release (a plain SET would be allowed).
        self._scripts_run = False

    def heartbeat(self) -> None:
        """Refresh this process's liveness key (TTL ``lock_liveness_ttl``).

        A beat answered after the beat before it could have expired records
        a gap (`liveness_gap`): meanwhile another caller may have taken over
        any lock this process held.
        """
        conn = self.client.redis("locks")
        started = time.monotonic()
        conn.call(conn.client.set, self._live_key, "1", px=ms(self._liveness_ttl))
        answered = time.monotonic()
        if answered >= self._live_until:
            self._live_gap_at = answered
        self._live_until = max(self._live_until, started + self._liveness_ttl)
        self._live_ok_until = started + self._beat_every

    def liveness_gap(self) -> float:
        return self._live_gap_at

    def live_since(self, moment: float) -> bool:
        """True if this process's liveness key has lived without a gap from `moment` until now."""
        return self._live_gap_at < moment and time.monotonic() < self._live_until

    def _confirm(self, conn: RedisConnection, keys: LockKeys, token: str) -> bool:
        """After a grant: False if it named a liveness key that may have lapsed, and the lock was taken over.

        A grant that Redis ran late (a busy server, a retry after a lost
        reply) can name this process after its liveness key expired: a
        waiter may then have taken the lock over as a dead holder's. Then
        the key is beaten again (from here on no takeover script can pass:
        it checks the key), and the lock read back.
        """
        if time.monotonic() < self._live_until - self._beat_every:  # the usual case: no round trip
            return True
        self.heartbeat()
        return bool(_text(conn.call(conn.client.get, keys.lock)) == token)

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        conn = self.client.redis("locks")
        lease_ms = ms(lease)
        fencing = fencing or self.fence_with_grant
        if time.monotonic() >= self._live_ok_until:
            self.heartbeat()  # the key must exist before any value naming it does
        token = self._live_tag + token
        # First a plain try, no script: the uncontended path costs Redis one
        # SET, like redis-py's Lock. GET makes a retry after a lost reply see
        # its own grant. With `fencing`, the token is drawn in the same round
        # trip (the script runs right after the SET and sees its outcome);
        # otherwise on first read of `fencing_token` (`fence`). A failed try
        # joins the queue atomically in the script below, so the release that
        # follows is sure to signal us: no wake-up can be lost. The client's
        # first acquire takes the script path (see `_scripts_run`).
        if self._scripts_run:
            started = time.monotonic()
            fence: Any = None
            if fencing:
                command = ("SET", keys.lock, token, "NX", "PX", lease_ms, "GET")
                previous, fence = conn.call(conn.run_command_and_script, command, conn.script("lock_fence"),
                                            [keys.lock, keys.fence], [token])
            else:
                previous = conn.call(conn.set_nx_get, keys.lock, token, lease_ms)
            if (previous is None or _text(previous) == token) and self._confirm(conn, keys, token):
                # Granted (or granted to this call's lost try).
                if fencing and fence is None:  # a retried SET: draw it now
                    fence = self._draw(conn, keys, token)
                hold = Hold(self, keys, token, None if fence is None else int(fence), lease, started + lease, conn)
                hold.granted_at = started
                return hold
            if deadline is not None and deadline <= time.monotonic():
                return None
        if not self._turns.take(keys.lock, deadline):
            return None  # another thread of this process waited in Redis all along
        try:
            return self._wait(conn, keys, token, lease_ms, lease, deadline, fencing)
        finally:
            self._turns.pass_on(keys.lock)  # granted or given up: the next thread of ours queues in Redis

    def _wait(self, conn: RedisConnection, keys: LockKeys, token: str, lease_ms: int, lease: float,
              deadline: Optional[float], fencing: bool) -> Optional[Hold]:
        """Queue in Redis for the lock (this thread's turn among this process's waiters) until granted or `deadline`."""
        slice_cap = min(_MAX_WAIT_SLICE, conn.settings.socket_timeout / 2)
        queue_ttl = str(ms(slice_cap + 2 * HANDOFF_GRACE))
        # The signal list is named by this call's nonce (the value's tail): unique per waiter.
        ticket = token[-24:] if _TICKET.fullmatch(token[-24:]) else secrets.token_hex(12)
        signal = keys.signal(ticket)
        key_list = [keys.lock, keys.queue, signal]
        queued = False
        dead_holder: Optional[str] = None
        dead_live_key: Optional[str] = None
        try:
            while True:
                if time.monotonic() >= self._live_ok_until:  # a long wait: beat before a grant can name us
                    self.heartbeat()
                started = time.monotonic()  # after the beat: a gap it found predates this grant
                queued = True
                args = [token, lease_ms, queue_ttl]
                script_keys = key_list
                if dead_holder is not None:
                    args.append(dead_holder)
                    if dead_live_key is not None:  # checked in the script too (one slot: not on a Cluster)
                        script_keys = key_list + [dead_live_key]
                reply = conn.call(conn.run_script, conn.script("lock_acquire"), script_keys, args)
                self._scripts_run = True
                if not isinstance(reply, list):  # granted
                    queued = False
                    if not self._confirm(conn, keys, token):
                        dead_holder = None  # taken over while this grant was late: wait on
                        continue
                    fence = self._draw(conn, keys, token) if fencing else None
                    hold = Hold(self, keys, token, fence, lease, started + lease, conn)
                    hold.granted_at = started
                    return hold
                _, value, *holder = reply
                pttl = int(value)
                # A holder whose process's liveness key is gone died (or stalled
                # past its lock_liveness_ttl): take its lock over now, not at its lease's end.
                dead_holder, live_pttl, dead_live_key = self._holder_liveness(conn, keys, holder[0] if holder else "")
                if dead_holder is not None:
                    continue
                if live_pttl > 0:
                    pttl = min(pttl, live_pttl) if pttl > 0 else live_pttl
                now = time.monotonic()
                remaining = float("inf") if deadline is None else deadline - now
                if remaining <= 0:
                    return None
                wait = min(remaining, slice_cap, pttl / 1000 + 0.001 if pttl > 0 else slice_cap)
                conn.call(_wait_for_signal, conn.client, signal, wait)
        finally:
            if queued:
                self._leave_queue(conn, keys, signal)

    def fence(self, hold: Hold) -> Optional[int]:
        """Draw `hold`'s fencing token (one round trip); None when the lock no longer holds it."""
        return self._draw(hold.handle, hold.keys, hold.token)

    @staticmethod
    def _draw(conn: RedisConnection, keys: LockKeys, token: str) -> Optional[int]:
        reply = conn.call(conn.run_script, conn.script("lock_fence"), [keys.lock, keys.fence], [token])
        return None if reply is None else int(reply)

    def _holder_liveness(self, conn: RedisConnection, keys: LockKeys,
                         holder: Any) -> Tuple[Optional[str], int, Optional[str]]:
        """(the holder's value if its process is dead, else None; ms its liveness key has left, or -1;
        that key, for the takeover script to check again, or None on a Cluster: another slot)."""
        holder = _text(holder)
        match = _LIVE_TAG.match(holder) if isinstance(holder, str) else None
        if match is None:  # free, reserved, or held by a value with no liveness (older versions)
            return None, -1, None
        live_key = _live_key(keys.prefix, match.group(1))
        left = int(conn.call(conn.client.pttl, live_key))
        if left == -2:
            METRICS.inc("lock_takeover_total")
            return holder, -1, None if conn.is_cluster else live_key
        return None, left, None

    def replicate(self, hold: Hold, replicas: int, timeout: float) -> int:
        """Wait until `replicas` replicas have the lock; returns how many did (-1: lost).

        ``WAIT`` counts the writes of its own connection, so one pipeline on
        one connection (the key's node on a cluster) re-writes the lease with
        the owner-checked extend script, then WAITs: replication is ordered,
        so the acknowledgement covers the acquisition before it.
        """
        conn: RedisConnection = hold.handle
        target = conn.client
        if conn.is_cluster:
            target = target.get_redis_connection(target.get_node_from_key(hold.keys.lock))
        wait_ms = max(1, min(ms(timeout), ms(conn.settings.socket_timeout * 0.8)))

        def run() -> Tuple[int, int]:
            pipe = target.pipeline(transaction=False)
            conn.script("lock_extend")([hold.keys.lock], [hold.token, ms(hold.lease), "1"], client=pipe)
            pipe.execute_command("WAIT", replicas, wait_ms)
            extended, acked = pipe.execute()
            return int(extended), int(acked)

        extended, acked = conn.call(run)
        return acked if extended else -1

    def _leave_queue(self, conn: RedisConnection, keys: LockKeys, signal: str) -> None:
        """A waiter giving up: leave the queue; pass on a reservation made for us."""
        try:
            conn.call(conn.run_script, conn.script("lock_release"), [keys.lock, keys.queue, signal],
                      [_RESERVED + signal, ms(HANDOFF_GRACE)])
        except Exception:  # the entry lapses with the queue's short TTL anyway
            log.debug("lock: could not leave the queue", exc_info=True)

    def release(self, hold: Hold) -> bool:
        """One round trip. A retry after a lost reply (in this call, or a
        background retry of a release that raised) that finds the lock gone or
        handed on, while this hold's lease cannot yet have run out, reports the
        release as done: nothing but that release (or Redis losing its data) can
        have removed it. Past the lease it is `False`, as for any lost lock.
        """
        conn: RedisConnection = hold.handle
        script = conn.script("lock_release")
        keys = [hold.keys.lock, hold.keys.queue]
        args = [hold.token]  # the script's default grace is ms(HANDOFF_GRACE)
        # A retry: of this call's lost reply, or (the watchdog's background
        # release) of an earlier call that could not tell whether it ran. On a
        # Cluster every try may be one: redis-py's cluster client retries a
        # dropped connection itself, inside one `run()`.
        tries = 1 if hold.release_sent or conn.is_cluster else 0
        hold.release_sent = True

        def run() -> Any:
            nonlocal tries
            tries += 1
            try:
                return conn.run_script(script, keys, args)
            except rex.ResponseError:
                tries -= 1  # refused (READONLY, BUSY, NOREPLICAS...): it did nothing
                raise

        if conn.call(run):
            return True
        # `expires_at` was taken before the grant (or renewal) was sent: never late.
        # And no takeover can have happened: this process's liveness key lived
        # without a gap since the grant (a takeover needs it gone).
        return tries > 1 and time.monotonic() < hold.expires_at and self.live_since(hold.granted_at)

    def extend(self, hold: Hold, seconds: float, replace: bool) -> bool:
        """Set (`replace`, idempotent) or add to the lease; an addition is recorded
        per call, so a retry after a lost reply does not add it twice."""
        conn: RedisConnection = hold.handle
        started = time.monotonic()
        keys = [hold.keys.lock]
        if replace:
            args: List[Any] = [hold.token, ms(seconds), "1"]
        else:
            keys.append(f"{hold.keys.lock}#e{os.urandom(12).hex()}")
            args = [hold.token, ms(seconds), "0", self._record_ms]
        ok = bool(conn.call(conn.run_script, conn.script("lock_extend"), keys, args))
        if ok and replace:
            hold.expires_at = started + seconds
        elif ok:
            hold.expires_at = min(hold.expires_at + seconds, started + MAX_SECONDS)  # as lock_extend.lua
        return ok

    def extend_all(self, holds: Sequence[Hold]) -> List[Optional[bool]]:
        """One pipeline of renewals (`holds` share one connection): the watchdog's round trip per
        batch instead of per hold, which a process holding hundreds of locks under CPU load
        could not make fast enough (each round trip waits to take the GIL back)."""
        conn: RedisConnection = holds[0].handle
        started = time.monotonic()
        script = conn.script("lock_extend")
        calls = [([hold.keys.lock], [hold.token, ms(hold.lease), "1"]) for hold in holds]
        if conn.is_cluster:
            # One master's batch, in a thread of its own (`batch_apart`), past the client's one
            # breaker: another master that stopped answering opens it, and a healthy master's
            # holds must still be renewed (a failure raises here; the watchdog tries again).
            try:
                replies = conn.run_scripts(script, calls)
            except Exception as exc:
                misconfigured = conn.misconfiguration(exc)  # as the policy names it (NOPERM...)
                if misconfigured is not None:
                    raise misconfigured from exc
                raise
        else:
            replies = conn.call(conn.run_scripts, script, calls)
        done: List[Optional[bool]] = []
        for hold, reply in zip(holds, replies):
            if isinstance(reply, BaseException):  # an error reply (READONLY, OOM...): renewed on its own
                done.append(None)
                continue
            if reply:
                hold.expires_at = started + hold.lease
            done.append(bool(reply))
        return done

    def batch_of(self, hold: Hold) -> Hashable:
        """One connection's holds; on a cluster, those of one master: a pipeline fails as a whole
        when one node it reaches is down, and one dead master must not stop the renewals of
        every lock the process holds on the others."""
        conn: RedisConnection = hold.handle
        if not conn.is_cluster:
            return id(conn)
        try:
            return id(conn), conn.client.get_node_from_key(hold.keys.lock).name
        except Exception:  # the slot's master is not known now: renewed with the others unknown
            return id(conn), None

    def batch_apart(self, hold: Hold) -> bool:
        return bool(hold.handle.is_cluster)

    def beats_apart(self) -> bool:
        return bool(self.client.redis("locks").is_cluster)

    def owned(self, hold: Hold) -> bool:
        conn: RedisConnection = hold.handle
        return bool(conn.call(conn.client.get, hold.keys.lock) == hold.token)

    def owned_all(self, holds: Sequence[Hold]) -> List[bool]:
        if not holds:
            return []
        conn: RedisConnection = holds[0].handle
        mget = conn.client.mget_nonatomic if conn.is_cluster else conn.client.mget
        values = conn.call(mget, [hold.keys.lock for hold in holds])
        return [_text(value) == hold.token for hold, value in zip(holds, values)]

    def locked(self, keys: LockKeys) -> bool:
        conn = self.client.redis("locks")
        return bool(conn.call(conn.client.exists, keys.lock))


def _text(value: Any) -> Any:
    """A reply as text (the lock connection may or may not decode responses)."""
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def _live_key(prefix: str, live_id: str) -> str:
    """The liveness key of the process (client) `live_id` (TTL its ``lock_liveness_ttl``)."""
    return f"{prefix}lock-live:{live_id}"


def _wait_for_signal(client: Any, key: str, wait: float) -> bool:
    """BLPOP `key` for at most `wait` seconds on a pooled connection; True if signalled.

    An idle Redis times blocked commands out only on its cron tick (100 ms at
    the default ``hz 10``), late by up to a tick. So a long wait asks the
    server for one tick less (its reply then comes by `wait`), and only a
    short last stretch is timed here: if it runs out first, the connection is
    dropped, abandoning the BLPOP. A signal lost that way is harmless: the
    release also reserved the lock for us, and our next try claims it.
    """
    target = client
    if hasattr(client, "get_node_from_key"):  # RedisCluster: the node owning the key
        target = client.get_redis_connection(client.get_node_from_key(key))
    if wait > 1.5 * _SERVER_TICK:
        server_wait, client_wait = wait - _SERVER_TICK, wait + 2 * _SERVER_TICK
    else:
        server_wait = client_wait = wait
    pool = target.connection_pool
    connection = pool.get_connection()
    try:
        # BLPOP's timeout 0 means forever: never send less than 2 ms.
        connection.send_command("BLPOP", key, round(max(server_wait, 0.002), 3))
        if connection.can_read(timeout=client_wait):
            return connection.read_response() is not None
        connection.disconnect()
        return False
    except (rex.MovedError, rex.AskError):
        # The slot moved (cluster resharding): wake up; the next try goes
        # through the cluster client, which follows the move and learns it.
        return False
    except rex.ResponseError as exc:
        if not is_unblocked(exc):
            connection.disconnect()
            raise
        # The master became a replica under the BLPOP (a graceful failover:
        # CLUSTER FAILOVER, SENTINEL FAILOVER) and released it: wake up; the
        # next try goes to the new master as every command does.
        return False
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


class FencedRedisBackend(RedisBackend):
    """Redis under ``lock_fallback=local``: every grant draws its fencing token (`fence_with_grant`)."""

    fence_with_grant = True


class GatedRedisBackend(RedisBackend):
    """Redis under ``lock_fallback=postgres``: a grant or renewal counts only through the name's gate.

    A fallback hold lives in PostgreSQL, invisible to Redis. The gate
    (``<lock key>#gate``, TTL one lease) records that PostgreSQL said no
    fallback hold of the name exists; it is opened only while holding the
    name's advisory lock, so no fallback grant can start meanwhile. Absent
    (expired, never set, or lost with Redis's data), the holder asks
    PostgreSQL first: while a fallback hold exists, the grant is given back
    and retried until `deadline`; a renewal fails (the lease is lost). With
    the gate open a grant costs one ``EXISTS`` more than plain Redis, and no
    PostgreSQL round trip. A fallback grant waits two leases after its
    episode began (`PostgresBackend.acquire_fallback`), so every Redis hold
    granted or renewed before the gate closed has ended. Every grant draws
    its fencing token (`fence_with_grant`), which the gate reconciles with
    PostgreSQL's.
    """

    unbounded_calls = True  # a renewal past the gate's lease asks PostgreSQL (`_open_gate`)
    renews_in_batches = False  # each renewal goes through the gate (`extend`)

    fence_with_grant = True

    def acquire(self, keys: LockKeys, token: str, lease: float, deadline: Optional[float],
                fencing: bool = False) -> Optional[Hold]:
        delay = 0.002
        while True:
            hold = super().acquire(keys, token, lease, deadline, fencing)
            if hold is None:
                return None
            try:
                if self._through_gate(hold):
                    return hold
            except BaseException:  # PostgreSQL could not say: fail closed, hold nothing
                self._give_back(hold)
                raise
            self._give_back(hold)
            remaining = float("inf") if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            # A fallback hold exists: it frees in PostgreSQL, where no release
            # signals us. Back off 2 ms -> 100 ms.
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    def extend(self, hold: Hold, seconds: float, replace: bool) -> bool:
        """Renew through the gate. With the gate absent, PostgreSQL is asked before the lease
        grows: a renewal it cannot answer raises with the lease as it was, so the watchdog's
        retries end with that lease and the hold is lost (a lease grown first, then refused
        by an error, was grown again by every retry: a fallback holder entered beside it).
        The gate is looked at again once the lease has grown: a lease grown while the gate
        lived ends within a lease of the gate's end."""
        conn: RedisConnection = hold.handle
        if not conn.call(conn.client.exists, _gate_key(hold.keys)) and not self._open_gate(hold):
            self._give_back(hold)  # a fallback hold exists
            return False
        if not super().extend(hold, seconds, replace):
            return False
        if self._through_gate(hold):
            return True
        self._give_back(hold)
        return False

    def _give_back(self, hold: Hold) -> None:
        try:
            self.release(hold)
        except Exception:  # its lease runs out anyway
            log.debug("lock: could not give back a grant the gate refused", exc_info=True)

    def _through_gate(self, hold: Hold) -> bool:
        """True when no PostgreSQL fallback hold of the name can exist while `hold` lasts."""
        conn: RedisConnection = hold.handle
        if conn.call(conn.client.exists, _gate_key(hold.keys)):
            return True
        return self._open_gate(hold)

    def _open_gate(self, hold: Hold) -> bool:
        """Ask PostgreSQL; if no fallback hold exists, end its episode and open the gate.

        Under the name's transaction-scoped advisory lock: the gate is set,
        and the fencing tokens of both tiers reconciled (the hold's token
        rises above PostgreSQL's, which records it), before any fallback
        grant can begin.
        """

        pg = self.client.postgres()
        pg.ensure_schema()
        conn: RedisConnection = hold.handle
        lock_key = hold.keys.lock
        if hold.fence is None:  # reconciled below: drawn now (above the clock, like every token)
            hold.fence = self.fence(hold)
            if hold.fence is None:  # no longer held: nothing to open the gate for
                return False

        def run() -> bool:
            with pg.connection() as pgconn, pgconn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (advisory_key(lock_key),))
                row = cur.fetchone()
                if not (row and row[0]):
                    return False
                cur.execute(pg.sql(_END_EPISODE), (lock_key,))
                cur.execute(pg.sql(_LAST_FENCE), (lock_key,))
                row = cur.fetchone()
                floor = int(row[0]) if row else 0
                script = conn.script("lock_gate")
                fence = conn.call(conn.run_script, script, [_gate_key(hold.keys), hold.keys.fence],
                                  [ms(hold.lease), floor, hold.fence])
                hold.fence = int(fence)
                cur.execute(pg.sql(_RECORD_FENCE), (lock_key, hold.fence))
            return True

        opened = bool(pg.policy.call(run))
        if opened:
            METRICS.inc("lock_gate_total", outcome="opened")
        else:
            METRICS.inc("lock_gate_total", outcome="fallback_held")
        return opened


def _gate_key(keys: LockKeys) -> str:
    """``space.key(ns, *ids, tag=True, suffix="gate")``: the lock's key plus ``#gate`` (same slot)."""
    return keys.lock + "#gate"


