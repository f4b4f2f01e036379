"""The command outbox in PostgreSQL, the record of truth: rows, transitions, queries.

Every transition is one statement: a conditional UPDATE (only from the states it may
come from) and its ``command_events`` row, so a race (an ack overtaking our own PUBACK, a
cancel against a dispatch) is decided by the row lock, never by timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import orjson

from .command_codec import TERMINAL, Ack, CommandEvent, CommandRecord, Moved, NewCommand, Status

if TYPE_CHECKING:
    from .db import Conn

COLUMNS = (
    "message_id, node_id, action, params::text AS params, priority, ttl_s, retain,"
    " broadcast_id, status, reason, created_at, expires_at, sent_at, received_at,"
    " finished_at, attempts, updated_at"
)
TERMINAL_LIST = sorted(TERMINAL)


INSERT = """
WITH ins AS (
    INSERT INTO commands (message_id, node_id, action, params, priority, ttl_s, retain,
                          broadcast_id, status, reason, created_at, expires_at, updated_at,
                          source)
    SELECT m, n, a, p::jsonb, pr, t, r, b, 'queued', $11, c, e, c, s
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int2[], $6::float8[],
                $7::bool[], $8::text[], $9::timestamptz[], $10::timestamptz[], $12::text[])
         AS i(m, n, a, p, pr, t, r, b, c, e, s)
    WHERE NOT $13 OR EXISTS (SELECT 1 FROM nodes WHERE nodes.node_id = i.n)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id, status, reason, created_at
), ev AS (
    INSERT INTO command_events (message_id, status, reason, at)
    SELECT message_id, status, reason, created_at FROM ins
)
SELECT message_id FROM ins
"""

MOVE = """
WITH t AS (
    UPDATE commands c SET
        status = $2, reason = $3, updated_at = $4,
        sent_at = CASE WHEN $5 THEN COALESCE(c.sent_at, $4) ELSE c.sent_at END,
        received_at = CASE WHEN $2 = 'received' THEN COALESCE(c.received_at, $4)
                           ELSE c.received_at END,
        finished_at = CASE WHEN $2 = ANY($6::text[]) THEN $4 ELSE NULL END
    WHERE c.message_id = $1
      AND (c.status = ANY($7::text[]) OR ($8 AND c.status = 'expired' AND c.attempts > 0))
      AND ($9::text IS NULL OR c.node_id = $9)
      AND (NOT $10 OR c.attempts = 0)
    RETURNING c.message_id, c.node_id, c.status, c.reason, c.retain, c.attempts
), ev AS (
    INSERT INTO command_events (message_id, status, reason, at)
    SELECT message_id, status, reason, $4 FROM t
)
SELECT * FROM t
"""

EXPIRE_DUE = """
WITH t AS (
    UPDATE commands SET status = 'expired', updated_at = $1, finished_at = $1,
        reason = CASE WHEN attempts = 0 THEN 'not delivered before expires_at'
                      ELSE 'expired before a resend; an earlier delivery attempt is unknown' END
    WHERE status = 'queued' AND expires_at <= $1
    RETURNING message_id, node_id, status, reason, retain, attempts
), ev AS (
    INSERT INTO command_events (message_id, status, reason, at)
    SELECT message_id, status, reason, $1 FROM t
)
SELECT * FROM t
"""


async def insert(
    conn: Conn, commands: Sequence[NewCommand], reason: str, *, known_nodes_only: bool = False
) -> set[str]:
    """Insert as queued (with their first event); returns the ids that were new.

    With ``known_nodes_only`` a command for a node not in ``nodes`` is not inserted.
    """
    cols: list[list[Any]] = [[] for _ in range(11)]
    for c in commands:
        values = (
            c.message_id,
            c.node_id,
            c.action,
            orjson.dumps(c.params).decode(),
            c.options.priority,
            c.options.ttl_s,
            c.options.retain,
            c.broadcast_id,
            c.created_at,
            c.expires_at,
            c.source,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    rows = await conn.fetch(INSERT, *cols[:10], reason, cols[10], known_nodes_only)
    return {r["message_id"] for r in rows}


async def move(
    conn: Conn,
    message_id: str,
    status: Status,
    reason: str,
    at: datetime,
    *,
    allowed_from: Sequence[Status],
    delivered: bool = False,
    reopen_expired: bool = False,
    node_id: str | None = None,
    never_attempted: bool = False,
) -> Moved | None:
    """One transition if the command is in an allowed state; None if it was not."""
    row = await conn.fetchrow(
        MOVE,
        message_id,
        status,
        reason,
        at,
        delivered,
        TERMINAL_LIST,
        list(allowed_from),
        reopen_expired,
        node_id,
        never_attempted,
    )
    return None if row is None else _moved(row, at)


async def claim(conn: Conn, message_id: str, at: datetime) -> int | None:
    """Count a publish attempt of a still-queued, unexpired command; None if it is not."""
    value = await conn.fetchval(
        "UPDATE commands SET attempts = attempts + 1, updated_at = $2"
        " WHERE message_id = $1 AND status = 'queued' AND expires_at > $2 RETURNING attempts",
        message_id,
        at,
    )
    return cast(int | None, value)


async def expire_due(conn: Conn, at: datetime) -> list[Moved]:
    return [_moved(r, at) for r in await conn.fetch(EXPIRE_DUE, at)]


def _record(row: asyncpg.Record, events: tuple[CommandEvent, ...] = ()) -> CommandRecord:
    values = dict(row.items())
    values["params"] = orjson.loads(values["params"])
    return CommandRecord(**values, events=events)


def _moved(row: asyncpg.Record, at: datetime) -> Moved:
    return Moved(
        row["message_id"],
        row["node_id"],
        row["status"],
        row["reason"],
        at,
        row["retain"],
        row["attempts"],
    )


async def fetch(conn: Conn, message_id: str, *, events: bool = False) -> CommandRecord | None:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM commands WHERE message_id = $1", message_id)
    if row is None:
        return None
    history: tuple[CommandEvent, ...] = ()
    if events:
        rows = await conn.fetch(
            "SELECT status, reason, at FROM command_events WHERE message_id = $1 ORDER BY id",
            message_id,
        )
        history = tuple(CommandEvent(r["status"], r["reason"], r["at"]) for r in rows)
    return _record(row, history)


async def fetch_many(conn: Conn, message_ids: Sequence[str]) -> list[CommandRecord]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM commands WHERE message_id = ANY($1::text[])", list(message_ids)
    )
    by_id = {r["message_id"]: _record(r) for r in rows}
    return [by_id[m] for m in message_ids if m in by_id]


async def for_node(conn: Conn, node_id: str, limit: int) -> list[CommandRecord]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM commands WHERE node_id = $1 ORDER BY created_at DESC LIMIT $2",
        node_id,
        limit,
    )
    return [_record(r) for r in rows]


async def open_commands(conn: Conn, in_flight_since: datetime) -> list[CommandRecord]:
    """Queued commands (oldest first) and ones sent or received since ``in_flight_since``."""
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM commands WHERE status = 'queued'"
        " OR (status IN ('sent', 'received') AND updated_at >= $1)"
        " ORDER BY created_at, message_id",
        in_flight_since,
    )
    return [_record(r) for r in rows]


async def existing_nodes(conn: Conn, node_ids: Sequence[str] | None) -> list[str]:
    """The given nodes that exist (all nodes when None), sorted."""
    if node_ids is None:
        rows = await conn.fetch("SELECT node_id FROM nodes ORDER BY node_id")
    else:
        rows = await conn.fetch(
            "SELECT node_id FROM nodes WHERE node_id = ANY($1::text[]) ORDER BY node_id",
            list(node_ids),
        )
    return [r["node_id"] for r in rows]


async def record_unmatched(conn: Conn, ack: Ack) -> str:
    """Keep an ack that moved nothing, with why; returns the reason."""
    reason = await conn.fetchval(
        "INSERT INTO command_acks_unmatched (node_id, message_id, status, detail, reason)"
        " SELECT $1, $2, $3, $4, CASE WHEN c.message_id IS NULL THEN 'unknown_command'"
        "  WHEN c.node_id <> $1 THEN 'wrong_node' ELSE 'already_' || c.status END"
        " FROM (SELECT 1) AS one LEFT JOIN commands c ON c.message_id = $2"
        " RETURNING reason",
        ack.node_id,
        ack.message_id,
        ack.status,
        ack.detail,
    )
    return str(reason)


async def retained_now(conn: Conn) -> dict[str, str]:
    """node → message id of the command whose retained copy is on commands/last."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (node_id) node_id, message_id FROM commands"
        " WHERE retain AND attempts > 0 AND retain_cleared_at IS NULL"
        " ORDER BY node_id, updated_at DESC"
    )
    return {r["node_id"]: r["message_id"] for r in rows}


async def retained_settled(conn: Conn, at: datetime) -> list[tuple[str, str]]:
    """(node, message id) of retained copies that may go: acked, finished or expired."""
    rows = await conn.fetch(
        "SELECT node_id, message_id FROM commands"
        " WHERE retain AND attempts > 0 AND retain_cleared_at IS NULL"
        " AND (status NOT IN ('queued', 'sent') OR expires_at <= $1)",
        at,
    )
    return [(r["node_id"], r["message_id"]) for r in rows]


async def mark_retain_cleared(conn: Conn, message_ids: Sequence[str], at: datetime) -> None:
    await conn.execute(
        "UPDATE commands SET retain_cleared_at = $2"
        " WHERE message_id = ANY($1::text[]) AND retain_cleared_at IS NULL",
        list(message_ids),
        at,
    )


async def replaced_retained(conn: Conn, node_id: str, keep: str, at: datetime) -> None:
    """A newer retained command replaced the older copies of this node."""
    await conn.execute(
        "UPDATE commands SET retain_cleared_at = $3 WHERE node_id = $1 AND retain"
        " AND attempts > 0 AND retain_cleared_at IS NULL AND message_id <> $2",
        node_id,
        keep,
        at,
    )
