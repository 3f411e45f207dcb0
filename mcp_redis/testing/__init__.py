"""Test tooling: real servers, topologies and faults for tests, benchmarks and the demo.

Not part of the library's runtime: nothing under `mcp_redis` outside this
package (and the demo) imports it. Loopback only; every server is private.

* `mcp_redis.testing.servers` (re-exported here): `RedisServer`, a throwaway
  ``redis-server`` on a free port; `PostgresDatabase`, a throwaway database;
  `servers_required`, `redis_binary`, `server_flavor`, `free_port`, `wait_for`.
* `mcp_redis.testing.topology`: local Sentinel and Cluster topologies
  (`SentinelTopology`, `ClusterTopology`, `SlotMigration`).
* `mcp_redis.testing.faultproxy`: `FaultProxy`, a fault-injecting TCP proxy.
* `mcp_redis.testing.tls`: `Pki`, a throwaway CA and certificates made with
  ``openssl`` for TLS-only servers and topologies (``tls=``).
"""

from __future__ import annotations

from .servers import (
    DEFAULT_ADMIN_DSN,
    SERVER_BINARIES_VARIABLE,
    PostgresDatabase,
    RedisServer,
    free_port,
    redis_binary,
    server_flavor,
    servers_required,
    wait_for,
)

__all__ = [
    "DEFAULT_ADMIN_DSN",
    "SERVER_BINARIES_VARIABLE",
    "free_port",
    "redis_binary",
    "server_flavor",
    "servers_required",
    "RedisServer",
    "PostgresDatabase",
    "wait_for",
]
