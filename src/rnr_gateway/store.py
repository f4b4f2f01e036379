"""SQL for the ingest pipeline: one statement per batch, set-based (unnest), idempotent."""

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

# One statement per batch: atomic on its own (no BEGIN/COMMIT round trips), and the
# database does the per-node aggregation. In-batch repeats of a key are dropped before
# (``_unique``), so joining the inserted keys back to the batch finds each row once.
# A message without a key that the broker redelivers (a crash between commit and ack)
# is skipped when the same node's identical payload was stored within the queue's TTL,
# if its payload tells it apart from the node's other messages (``_self_identifying``).
WRITE_BATCH = """
WITH m AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::float8[],
                $6::int[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::bool[])
         WITH ORDINALITY AS m(n, d, r, k, t, b, s, st, fw, mac, rd, i)
),
seen AS (
    SELECT m.i FROM m
    WHERE m.rd AND EXISTS (
        SELECT 1 FROM sensor_data old
        WHERE old.node_id = m.n AND old.received_at > m.r - interval '1 hour'
          AND old.data = m.d::jsonb)
),
ins AS (
    INSERT INTO sensor_data (node_id, data, received_at, kind, ts, boot, seq)
    SELECT n, d::jsonb, r, k, t, b, s FROM m WHERE m.i NOT IN (SELECT i FROM seen)
    ON CONFLICT (node_id, boot, seq) WHERE boot IS NOT NULL AND seq IS NOT NULL DO NOTHING
    RETURNING node_id, boot, seq
),
fresh AS (
    SELECT m.* FROM m
    WHERE (m.b IS NULL OR m.s IS NULL) AND m.i NOT IN (SELECT i FROM seen)
    UNION ALL
    SELECT m.* FROM m JOIN ins ON ins.node_id = m.n AND ins.boot = m.b AND ins.seq = m.s
),
per_node AS (
    -- a redelivered or repeated message is not a new one: nodes count messages
    SELECT n, max(mac) AS mac, max(r) AS l, count(*) AS c,
           (array_agg(st ORDER BY r DESC, i DESC))[1] AS st,
           (array_agg(fw ORDER BY i DESC) FILTER (WHERE fw IS NOT NULL))[1] AS fw,
           (array_agg(b ORDER BY i DESC) FILTER (WHERE b IS NOT NULL))[1] AS b
    FROM fresh GROUP BY n
),
upserted AS (
    INSERT INTO nodes (node_id, mac_address, last_seen, message_count, status, firmware,
                       last_boot)
    SELECT n, mac, l, c, st, fw, b FROM per_node
    ORDER BY n  -- concurrent batches lock nodes in the same order
    ON CONFLICT (node_id) DO UPDATE SET
        last_seen = GREATEST(nodes.last_seen, EXCLUDED.last_seen),
        message_count = nodes.message_count + EXCLUDED.message_count,
        status = CASE WHEN nodes.last_seen IS NULL OR EXCLUDED.last_seen >= nodes.last_seen
                      THEN EXCLUDED.status ELSE nodes.status END,
        firmware = COALESCE(EXCLUDED.firmware, nodes.firmware),
        last_boot = COALESCE(EXCLUDED.last_boot, nodes.last_boot),
        updated_at = now()
),
recorded AS (
    INSERT INTO failed_messages (fingerprint, source, routing_key, headers, body,
                                 body_truncated, reason, detail, count)
    SELECT f, src, rk, h::jsonb, b, tr, rsn, dt, c
    FROM unnest($12::bytea[], $13::text[], $14::text[], $15::text[], $16::bytea[],
                $17::bool[], $18::text[], $19::text[], $20::int[])
         AS x(f, src, rk, h, b, tr, rsn, dt, c)
    ON CONFLICT (fingerprint) DO UPDATE SET
        count = failed_messages.count + EXCLUDED.count,
        last_seen = now(),
        reason = EXCLUDED.reason,
        detail = EXCLUDED.detail
)
SELECT i FROM fresh ORDER BY i
"""


@dataclass(frozen=True, slots=True)
class Accepted:
    message: Decoded
    received_at: datetime
    # the broker delivered it before (to a consumer that did not ack it): for a message
    # without (boot, seq) an identical payload stored lately is taken as this one
    redelivered: bool = False


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
    unique = _unique(accepted)
    rows = await conn.fetch(WRITE_BATCH, *_message_columns(unique), *_failed_columns(failed))
    stored = [unique[r["i"] - 1] for r in rows]
    return BatchResult(len(stored), len(accepted) - len(stored), len(failed), stored)


def _unique(rows: Sequence[Accepted]) -> Sequence[Accepted]:
    """The batch without in-batch repeats of a (node, boot, seq) key (the first one stays)."""
    seen: set[tuple[str, int, int]] = set()
    out: list[Accepted] = []
    for row in rows:
        m = row.message
        if m.boot is not None and m.seq is not None:
            key = (m.node_id, m.boot, m.seq)
            if key in seen:
                continue
            seen.add(key)
        out.append(row)
    return out if len(out) < len(rows) else rows


def _message_columns(rows: Sequence[Accepted]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], [], [], [], [], [], []]
    (node, data, received, kind, ts, boot, seq, status, fw, mac, redelivered) = cols
    for row in rows:
        m = row.message
        node.append(m.node_id)
        # the payload as it came (jsonb parses it again anyway); re-encoded only when the
        # body was not the object itself (a bare status word)
        data.append(m.text if m.text is not None else orjson.dumps(m.data).decode())
        received.append(row.received_at)
        kind.append(m.kind)
        ts.append(m.ts)
        boot.append(m.boot)
        seq.append(m.seq)
        status.append("offline" if m.offline else "online")
        fw.append(m.fw)
        mac.append(mac_address(m.node_id))
        redelivered.append(row.redelivered and _self_identifying(m))  # rd: compare it
    return cols


def _self_identifying(m: Decoded) -> bool:
    """A payload without (boot, seq) that still names its moment: the node's uptime, or a
    timestamp. Two such payloads that are identical are one message. A bare status word,
    a ping or an event stamped "unknown" repeats for real, and is never taken for a
    redelivery of an earlier one."""
    if m.boot is not None and m.seq is not None:
        return False
    if isinstance(m.data.get("uptime"), int):
        return True
    stamp = m.data.get("timestamp")
    return isinstance(stamp, int | float) or (
        isinstance(stamp, str) and stamp not in ("", "unknown")
    )


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
            _text(row.source),
            _text(row.routing_key),
            orjson.dumps(_text(row.headers), default=str).decode(),
            row.body[:MAX_FAILED_BODY],  # bytea: kept as it came
            len(row.body) > MAX_FAILED_BODY,
            _text(row.reason),
            _text(row.detail[:1000]),
            1,
        )
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    return cols


def _text(value: Any, depth: int = 0) -> Any:
    """``value`` with NUL characters replaced in its strings (keys too): PostgreSQL's text
    and jsonb refuse them, and a record of what went wrong must not fail in turn."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if depth > 8:
        return str(value).replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_text(str(k)): _text(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_text(v, depth + 1) for v in value]
    return value
