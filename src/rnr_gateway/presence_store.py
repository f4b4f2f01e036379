"""Presence in PostgreSQL: the state restored at start, the database's word on nodes
other gateways heard from, and transitions written once however many gateways saw them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpg import Pool, Record

    from .db import Conn
    from .presence import Transition

SECOND_OPINION_TIMEOUT_S = 5.0
LOAD = (
    "SELECT node_id, status, extract(epoch FROM last_seen) AS last_seen, report_interval_s"
    " FROM nodes WHERE last_seen IS NOT NULL"
)
SECOND_OPINION = """
SELECT n.node_id, n.status, extract(epoch FROM n.last_seen) AS seen, e.reason
FROM nodes n LEFT JOIN LATERAL (
    SELECT reason FROM node_events WHERE node_id = n.node_id ORDER BY at DESC, id DESC LIMIT 1
) e ON true
WHERE n.node_id = ANY($1::text[])
"""


async def load(conn: Conn) -> list[Record]:
    """Every node heard from at least once, with its stored status and interval."""
    return list(await conn.fetch(LOAD))


async def second_opinion(pool: Pool[Any], node_ids: list[str]) -> list[Record]:
    """What ``nodes`` (which every gateway's batch advances) and the latest ``node_events``
    row say of these nodes; raises on an unreachable database (bounded wait)."""
    async with asyncio.timeout(SECOND_OPINION_TIMEOUT_S):
        return list(await pool.fetch(SECOND_OPINION, node_ids))


# A transition is stored unless the node's history already says the same at that moment:
# with several gateways on a vhost each sees the node come and go (and the one that
# stored its LWT tells the others through ``nodes``), and the first one's record stands.
# Per-node advisory locks (taken in node order) keep two writers from both inserting.
LOCK_NODES = (
    "SELECT pg_advisory_xact_lock(hashtext('rnr-node-events'), hashtext(n))"
    " FROM unnest($1::text[]) AS n"
)
INSERT_EVENT = """
INSERT INTO node_events (node_id, from_status, to_status, reason, at)
SELECT $1, $2, $3, $4, $5
WHERE $3 IS DISTINCT FROM (SELECT to_status FROM node_events
                           WHERE node_id = $1 AND at <= $5 ORDER BY at DESC, id DESC LIMIT 1)
  AND $3 IS DISTINCT FROM (SELECT to_status FROM node_events
                           WHERE node_id = $1 AND at > $5 ORDER BY at, id LIMIT 1)
"""


async def write(conn: Conn, batch: list[Transition], intervals: dict[str, float | None]) -> None:
    latest = {t.node_id: t for t in batch}
    learned = sorted((n, v) for n, v in intervals.items() if n not in latest and v is not None)
    if learned:
        # rows locked one by one in node order, as the ingest batch locks them (an UPDATE
        # joined to a list locks in whatever order the join runs: deadlocks with ingest),
        # and in a transaction of their own, apart from the transitions' node order
        await conn.executemany(
            "UPDATE nodes SET report_interval_s = $2 WHERE node_id = $1", learned
        )
    if not latest:
        return
    async with conn.transaction():
        await conn.execute(LOCK_NODES, sorted(latest))
        await conn.executemany(
            INSERT_EVENT,
            [(t.node_id, t.previous, t.status, t.reason, t.at_datetime) for t in batch],
        )
        await conn.executemany(
            "UPDATE nodes SET status = $2, status_changed_at = $3,"
            " report_interval_s = COALESCE($4, report_interval_s) WHERE node_id = $1"
            " AND (status_changed_at IS NULL OR status_changed_at <= $3)",
            [(n, t.status, t.at_datetime, intervals.get(n)) for n, t in sorted(latest.items())],
        )
