"""The command outbox in PostgreSQL, the record of truth: rows, transitions, queries.

Transitions are set-based statements: a conditional UPDATE (only from the states each may
come from) and its ``command_events`` rows, so a race (an ack overtaking our own PUBACK, a
cancel against a dispatch) is decided by the row lock, never by timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from .command_codec import (
    TERMINAL,
    Ack,
    CommandEvent,
    CommandRecord,
    Moved,
    NewCommand,
    Status,
)

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

MOVE_MANY = """
WITH i AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[],
                         $6::bool[], $7::text[], $8::bool[], $9::text[], $10::text[])
                  AS i(mid, status, reason, allowed, delivered, reopen, node, unsent,
                       ack, detail)
), t AS (
    UPDATE commands c SET
        status = i.status, reason = i.reason, updated_at = $11,
        sent_at = CASE WHEN i.delivered THEN COALESCE(c.sent_at, $11) ELSE c.sent_at END,
        received_at = CASE WHEN i.status = 'received' THEN COALESCE(c.received_at, $11)
                           ELSE c.received_at END,
        finished_at = CASE WHEN i.status = ANY($12::text[]) THEN $11 ELSE NULL END
    FROM i
    WHERE c.message_id = i.mid
      AND (c.status = ANY(string_to_array(i.allowed, ','))
           OR (i.reopen AND c.status = 'expired' AND c.attempts > 0))
      AND (i.node IS NULL OR c.node_id = i.node)
      AND (NOT i.unsent OR c.attempts = 0)
    RETURNING c.message_id, c.node_id, c.status, c.reason, c.retain, c.attempts,
        -- the node's ack came before our PUBACK was recorded: it was sent all the same
        (i.delivered AND c.status <> 'sent' AND NOT EXISTS (
            SELECT 1 FROM command_events e
            WHERE e.message_id = c.message_id AND e.status = 'sent')) AS implied_sent
), ev AS (
    INSERT INTO command_events (message_id, status, reason, at)
    SELECT message_id, status, reason, $11 FROM (
        SELECT message_id, 'sent' AS status, $13 AS reason, 1 AS o FROM t WHERE implied_sent
        UNION ALL
        SELECT message_id, status, reason, 2 FROM t
    ) x ORDER BY o  -- ids in that order: sent, then what the ack says
), u AS (
    INSERT INTO command_acks_unmatched (node_id, message_id, status, detail, reason)
    SELECT i.node, i.mid, i.ack, i.detail,
           CASE WHEN c.message_id IS NULL THEN 'unknown_command'
                WHEN c.node_id <> i.node THEN 'wrong_node'
                ELSE 'already_' || c.status END
    FROM i LEFT JOIN commands c ON c.message_id = i.mid
    WHERE i.ack IS NOT NULL AND i.mid NOT IN (SELECT message_id FROM t)
    RETURNING message_id, reason
)
SELECT message_id, node_id, status, reason, retain, attempts, implied_sent,
       NULL AS unmatched FROM t
UNION ALL
SELECT message_id, NULL, NULL, NULL, NULL, NULL, NULL, reason FROM u
"""
IMPLIED_SENT = "delivered: the node acked before the broker's PUBACK was recorded"

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


@dataclass(frozen=True, slots=True)
class Step:
    """One transition to try: to ``status`` if the command is in one of ``allowed_from``."""

    message_id: str
    status: Status
    reason: str
    allowed_from: tuple[Status, ...]
    delivered: bool = False  # the node has it: set sent_at if it was not
    reopen_expired: bool = False  # also from 'expired' after an unknown delivery attempt
    node_id: str | None = None  # only if the command is this node's
    never_attempted: bool = False  # only if it was never handed to MQTT (cancel)
    ack: Ack | None = None  # the node's ack this comes from: kept as unmatched if it fails


async def move_many(
    conn: Conn, steps: Sequence[Step], at: datetime
) -> tuple[list[Moved], dict[str, str]]:
    """Transitions in one statement (each command at most once): those that applied, and
    for steps from an ack that did not, the reason it is kept as unmatched (id → reason).

    A delivered step (an ack) that finds no ``sent`` in the command's history records
    ``sent`` first, in the same statement: both moves are returned, ``sent`` first.
    """
    assert len({s.message_id for s in steps}) == len(steps), "one step per command"
    cols: list[list[Any]] = [[] for _ in range(10)]
    for s in steps:
        values = (
            s.message_id,
            s.status,
            s.reason,
            ",".join(s.allowed_from),
            s.delivered,
            s.reopen_expired,
            s.node_id,
            s.never_attempted,
            s.ack.status if s.ack else None,
            s.ack.detail if s.ack else None,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    moved: list[Moved] = []
    unmatched: dict[str, str] = {}
    for row in await conn.fetch(MOVE_MANY, *cols, at, TERMINAL_LIST, IMPLIED_SENT):
        if row["unmatched"] is None:
            if row["implied_sent"]:
                sent = _moved(row, at)
                moved.append(replace(sent, status="sent", reason=IMPLIED_SENT))
            moved.append(_moved(row, at))
        else:
            unmatched[row["message_id"]] = row["unmatched"]
    return moved, unmatched


async def claim_many(conn: Conn, message_ids: Sequence[str], at: datetime) -> set[str]:
    """Count a publish attempt of each still-queued, unexpired command; returns those."""
    rows = await conn.fetch(
        "UPDATE commands SET attempts = attempts + 1, updated_at = $2"
        " WHERE message_id = ANY($1::text[]) AND status = 'queued' AND expires_at > $2"
        " RETURNING message_id",
        list(message_ids),
        at,
    )
    return {r["message_id"] for r in rows}


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


async def queued_before(conn: Conn, before: datetime) -> list[str]:
    """Ids of commands still queued that were accepted before ``before``."""
    rows = await conn.fetch(
        "SELECT message_id FROM commands WHERE status = 'queued' AND created_at < $1", before
    )
    return [r["message_id"] for r in rows]


async def fetch_many(conn: Conn, message_ids: Sequence[str]) -> list[CommandRecord]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM commands WHERE message_id = ANY($1::text[])"
        " ORDER BY created_at, message_id",
        list(message_ids),
    )
    return [_record(r) for r in rows]


async def last_event_id(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM sensor_data"))


async def events_after(
    conn: Conn, node_ids: Sequence[str], after: int
) -> list[tuple[str, str, int]]:
    """(node, status, id) of the nodes' status events stored after ``after``, in order."""
    rows = await conn.fetch(
        "SELECT node_id, data->>'status' AS status, id FROM sensor_data"
        " WHERE id > $2 AND node_id = ANY($1::text[]) AND kind = 'event'"
        " AND data->>'status' IS NOT NULL ORDER BY id",
        list(node_ids),
        after,
    )
    return [(r["node_id"], r["status"], r["id"]) for r in rows]


async def unacking_nodes(conn: Conn, sent_before: datetime, since: datetime) -> list[str]:
    """Nodes whose latest command (sent since ``since``, and longer ago than an ack
    timeout) got no ack at all: legacy firmware, as far as the outbox can tell."""
    rows = await conn.fetch(
        "SELECT node_id FROM ("
        "  SELECT DISTINCT ON (node_id) node_id, sent_at, received_at, status, reason"
        "  FROM commands WHERE sent_at >= $2 ORDER BY node_id, sent_at DESC"
        ") latest"
        " WHERE sent_at < $1 AND received_at IS NULL"
        " AND (status = 'sent' OR (status = 'executed' AND reason = 'inferred'))",
        sent_before,
        since,
    )
    return [r["node_id"] for r in rows]


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
