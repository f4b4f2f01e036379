"""SQL for the ingest pipeline: one transaction per batch, set-based (unnest), idempotent."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from .codec import Decoded
from .topics import mac_address

if TYPE_CHECKING:
    from .db import Conn

MAX_FAILED_BODY = 16_384

INSERT_MESSAGES = """
INSERT INTO sensor_data (node_id, data, received_at, kind, ts, boot, seq)
SELECT n, d::jsonb, r, k, t, b, s
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::float8[],
            $6::int[], $7::int8[]) AS m(n, d, r, k, t, b, s)
ON CONFLICT (node_id, boot, seq) WHERE boot IS NOT NULL AND seq IS NOT NULL DO NOTHING
RETURNING node_id, boot, seq
"""

UPSERT_NODES = """
INSERT INTO nodes (node_id, mac_address, last_seen, message_count, status, firmware, last_boot)
SELECT n, m, l, c, s, f, b
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[], $5::text[], $6::text[],
            $7::int[]) AS u(n, m, l, c, s, f, b)
ON CONFLICT (node_id) DO UPDATE SET
    last_seen = GREATEST(nodes.last_seen, EXCLUDED.last_seen),
    message_count = nodes.message_count + EXCLUDED.message_count,
    status = CASE WHEN nodes.last_seen IS NULL OR EXCLUDED.last_seen >= nodes.last_seen
                  THEN EXCLUDED.status ELSE nodes.status END,
    firmware = COALESCE(EXCLUDED.firmware, nodes.firmware),
    last_boot = COALESCE(EXCLUDED.last_boot, nodes.last_boot),
    updated_at = now()
"""

UPSERT_FAILED = """
INSERT INTO failed_messages (fingerprint, source, routing_key, headers, body, body_truncated,
                             reason, detail, count)
SELECT f, src, rk, h::jsonb, b, tr, rsn, dt, c
FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bool[],
            $7::text[], $8::text[], $9::int[]) AS x(f, src, rk, h, b, tr, rsn, dt, c)
ON CONFLICT (fingerprint) DO UPDATE SET
    count = failed_messages.count + EXCLUDED.count,
    last_seen = now(),
    reason = EXCLUDED.reason,
    detail = EXCLUDED.detail
"""


@dataclass(frozen=True, slots=True)
class Accepted:
    message: Decoded
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Failed:
    source: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class BatchResult:
    inserted: int
    duplicates: int
    failed: int
    stored: Sequence[Accepted] = ()  # the messages that are new (not duplicates)


async def write_batch(
    conn: Conn, accepted: Sequence[Accepted], failed: Sequence[Failed]
) -> BatchResult:
    async with conn.transaction():
        inserted = 0
        fresh: list[Accepted] = []
        if accepted:
            keys = await conn.fetch(INSERT_MESSAGES, *_message_columns(accepted))
            inserted = len(keys)
            fresh = _fresh(accepted, {(r["node_id"], r["boot"], r["seq"]) for r in keys})
            if fresh:
                # a redelivered or repeated message is not a new one: nodes count messages
                await conn.execute(UPSERT_NODES, *_node_columns(fresh))
        if failed:
            await conn.execute(UPSERT_FAILED, *_failed_columns(failed))
    return BatchResult(inserted, len(accepted) - inserted, len(failed), fresh)


def _message_columns(rows: Sequence[Accepted]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], [], []]
    for row in rows:
        m = row.message
        for col, value in zip(
            cols,
            (
                m.node_id,
                orjson.dumps(m.data).decode(),
                row.received_at,
                m.kind,
                m.ts,
                m.boot,
                m.seq,
            ),
            strict=True,
        ):
            col.append(value)
    return cols


def _fresh(
    rows: Sequence[Accepted], inserted: set[tuple[str, int | None, int | None]]
) -> list[Accepted]:
    """The rows the insert really added: every unkeyed one, and the first of each new key."""
    pending = set(inserted)
    out = []
    for row in rows:
        m = row.message
        if m.boot is None or m.seq is None:
            out.append(row)
        elif (m.node_id, m.boot, m.seq) in pending:
            pending.discard((m.node_id, m.boot, m.seq))
            out.append(row)
    return out


def _node_columns(rows: Sequence[Accepted]) -> list[list[Any]]:
    """One row per node (sorted, so concurrent batches lock nodes in the same order)."""
    per_node: dict[str, list[Any]] = {}
    for row in rows:
        m = row.message
        agg = per_node.get(m.node_id)
        state = "offline" if m.offline else "online"
        if agg is None:
            per_node[m.node_id] = [row.received_at, 1, state, m.fw, m.boot]
            continue
        agg[1] += 1
        if row.received_at >= agg[0]:
            agg[0], agg[2] = row.received_at, state
        agg[3] = m.fw or agg[3]
        agg[4] = m.boot if m.boot is not None else agg[4]
    cols: list[list[Any]] = [[], [], [], [], [], [], []]
    for node_id in sorted(per_node):
        last, count, state, fw, boot = per_node[node_id]
        for col, value in zip(
            cols, (node_id, mac_address(node_id), last, count, state, fw, boot), strict=True
        ):
            col.append(value)
    return cols


def fingerprint(source: str, routing_key: str, body: bytes) -> bytes:
    return hashlib.sha256(b"\0".join((source.encode(), routing_key.encode(), body))).digest()


def _failed_columns(rows: Sequence[Failed]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], [], [], [], []]
    # one statement may not touch a row twice: the same message again in this batch only
    # adds to the count of the first (row index by fingerprint)
    seen: dict[bytes, int] = {}
    for row in rows:
        fp = fingerprint(row.source, row.routing_key, row.body)
        if fp in seen:
            cols[8][seen[fp]] += 1
            continue
        seen[fp] = len(seen)
        values = (
            fp,
            row.source,
            row.routing_key,
            orjson.dumps(row.headers, default=str).decode(),
            row.body[:MAX_FAILED_BODY],
            len(row.body) > MAX_FAILED_BODY,
            row.reason,
            row.detail[:1000],
            1,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    return cols
