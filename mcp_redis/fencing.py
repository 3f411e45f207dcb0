"""Fenced writes: make a lock's fencing token count where the data lives.

A lock is a lease: a holder that stalls (GC pause, SIGSTOP, a swapped-out VM)
past it can wake up and write after another holder took the lock and wrote.
Fencing tokens (`DistributedLock.fencing_token`) rise with every grant, so
the store can refuse the older holder's write: `fenced_update` runs

    UPDATE <table> SET <col> = %s, ..., <fence> = %s
    WHERE <key> = %s AND ... AND COALESCE(<fence>, 0) < %s

with the holder's token, on the caller's own cursor (inside the caller's
transaction). It needs no library-owned PostgreSQL object: only a
``BIGINT`` column of the caller's table (a NULL fence counts as 0, so existing
rows take their first fenced write). Identifiers go through
``psycopg2.sql.Identifier`` and every value is a parameter.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["fenced_update"]


def _names(table: Union[str, Sequence[str]]) -> Sequence[str]:
    parts = table.split(".") if isinstance(table, str) else list(table)
    if not parts or not all(isinstance(p, str) and p for p in parts) or len(parts) > 3:
        raise InvalidArgument("table", "must be 'table', 'schema.table' or a tuple of 1-3 non-empty names")
    return parts


def _columns(values: Any, argument: str) -> Mapping[str, Any]:
    if not isinstance(values, Mapping):
        raise InvalidArgumentType(argument, f"must be a mapping of column -> value, not {type(values).__name__}")
    if not values:
        raise InvalidArgument(argument, "must name at least one column")
    for column in values:
        if not isinstance(column, str) or not column:
            raise InvalidArgument(argument, "column names must be non-empty strings")
    return values


_BIGINT_MAX = 2 ** 63 - 1


def fenced_update(cursor: Any, table: Union[str, Sequence[str]], set_values: Mapping[str, Any],
                  where: Mapping[str, Any], fence_column: str, token: int) -> bool:
    """Update the rows matching `where` only if their fence is below `token`; True if a row was written.

    `cursor`: a psycopg2 cursor (the caller commits). `table`: ``"name"``,
    ``"schema.name"`` or a tuple of names. `set_values`: column -> new value;
    `where`: column -> value, all matched with ``=`` (None is refused: use a
    value). `fence_column` is set to `token` by the same statement. False
    means the write did not count: a holder with a newer token already wrote
    (or no row matched) — the caller lost its lock and must not go on as if
    its write had landed.
    """
    from psycopg2 import sql

    names = _names(table)
    values = _columns(set_values, "set_values")
    match = _columns(where, "where")
    if not isinstance(fence_column, str) or not fence_column:
        raise InvalidArgument("fence_column", "must be a non-empty column name")
    if fence_column in values or fence_column in match:
        raise InvalidArgument("fence_column", "is set by fenced_update itself: leave it out of set_values and where")
    if isinstance(token, bool) or not isinstance(token, int):
        raise InvalidArgumentType("token", f"must be an int (a fencing token), not {type(token).__name__}")
    if token <= 0:
        raise InvalidArgument("token", f"must be positive, got {token!r}")
    if token > _BIGINT_MAX:
        raise InvalidArgument("token", f"must fit the BIGINT fence column (at most 2**63 - 1), got {token!r}")
    for column, value in match.items():
        if value is None:
            raise InvalidArgument("where", f"value of {column!r} is None (= never matches NULL)")
    fence = sql.Identifier(fence_column)
    statement = sql.SQL("UPDATE {table} SET {sets}, {fence} = %s WHERE {conds} AND COALESCE({fence}, 0) < %s").format(
        table=sql.Identifier(*names),
        sets=sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values),
        fence=fence,
        conds=sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in match),
    )
    params = [*values.values(), token, *match.values(), token]
    cursor.execute(statement, params)
    return bool(cursor.rowcount and cursor.rowcount > 0)
