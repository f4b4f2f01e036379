"""Sensor data (legacy shape: a plain list, newest first) and per-boot completeness.

A full page carries the cursor to the next one in ``X-Next-Before-Id`` and a
``Link: <...>; rel="next"`` header, so the legacy body stays a plain list."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..topics import valid_node_id
from .common import int_param, json_response, optional_int_param, query, require, time_range
from .errors import invalid
from .nodes import node_id_of

if TYPE_CHECKING:
    from asyncpg import Record

    from ..db import Conn

PAGE_HEADERS = ("Link", "X-Next-Before-Id")  # exposed to cross-origin dashboards (CORS)
KINDS = ("reading", "event", "heartbeat", "ping", "status", "all")
MAX_ID = 2**63 - 1
SENSOR_DATA = (
    "SELECT id, node_id, data::text AS data, received_at FROM sensor_data"
    " WHERE ($1::text IS NULL OR node_id = $1)"
    " AND ($2::timestamptz IS NULL OR received_at >= $2)"
    " AND ($3::timestamptz IS NULL OR received_at < $3)"
    " AND ($4 = 'all' OR kind = $4)"
    # keyset: the rows listed after the cursor row, in the list's own order
    " AND ($5::timestamptz IS NULL OR (received_at, id) < ($5, $6::bigint))"
    " ORDER BY received_at DESC, id DESC LIMIT $7"
)


class Filter:
    """The query parameters of a sensor-data listing, validated (422 otherwise)."""

    def __init__(self, request: Request) -> None:
        node_id = request.path_params.get("node_id") or request.query_params.get("node_id")
        if node_id is not None and not valid_node_id(node_id):
            raise invalid(f"{node_id[:80]!r} is not a valid node id", "invalid_node_id")
        self.node_id: str | None = node_id
        self.limit = int_param(request, "limit", 100, 1, 1000)
        self.since, self.until = time_range(request)
        self.kind = request.query_params.get("kind", "reading")
        if self.kind not in KINDS:
            raise invalid("kind must be reading, event, heartbeat, ping, status or all")
        self.before_id = optional_int_param(request, "before_id", 1, MAX_ID)

    async def fetch(self, conn: Conn) -> list[Record]:
        cursor_at: datetime | None = None
        if self.before_id is not None:
            cursor_at = await conn.fetchval(
                "SELECT received_at FROM sensor_data WHERE id = $1", self.before_id
            )
            if cursor_at is None:
                raise invalid(
                    f"before_id {self.before_id} names no row; pass the id of the last row"
                    " of the previous page (the X-Next-Before-Id header)"
                )
        rows: list[Record] = await conn.fetch(
            SENSOR_DATA,
            self.node_id,
            self.since,
            self.until,
            self.kind,
            cursor_at,
            self.before_id,
            self.limit,
        )
        return rows


def next_page(request: Request, rows: list[Record], limit: int) -> dict[str, str]:
    """Headers pointing at the next page, when this one is full."""
    if len(rows) < limit:
        return {}
    last = str(rows[-1]["id"])
    url = request.url.include_query_params(before_id=last)
    return {"X-Next-Before-Id": last, "Link": f'<{url.path}?{url.query}>; rel="next"'}


async def sensor_data(request: Request) -> Response:
    require(request, "read")
    wanted = Filter(request)
    rows = await query(request, wanted.fetch)
    return json_response(
        [
            {
                "id": r["id"],
                "node_id": r["node_id"],
                "data": orjson.loads(r["data"]),
                "received_at": r["received_at"],
            }
            for r in rows
        ],
        headers=next_page(request, rows, wanted.limit),
    )


async def completeness(request: Request) -> Response:
    """Per boot: sequence numbers expected vs received (enhanced nodes only)."""
    require(request, "read")
    node_id = node_id_of(request)
    since, until = time_range(request)
    rows = await query(request, lambda c: _completeness(c, node_id, since, until))
    boots = [
        {
            "boot": r["boot"],
            "first_seq": r["first_seq"],
            "last_seq": r["last_seq"],
            "received": r["received"],
            "expected": r["last_seq"] - r["first_seq"] + 1,
            "lost": r["last_seq"] - r["first_seq"] + 1 - r["received"],
        }
        for r in rows
    ]
    expected = sum(b["expected"] for b in boots)
    received = sum(b["received"] for b in boots)
    return json_response(
        {
            "node_id": node_id,
            "boots": boots,
            "expected": expected,
            "received": received,
            "lost": expected - received,
            "completeness_percent": round(100.0 * received / expected, 3) if expected else None,
        }
    )


async def _completeness(c: Conn, node_id: str, since: Any, until: Any) -> list[Record]:
    return await c.fetch(
        "SELECT boot, min(seq) AS first_seq, max(seq) AS last_seq, count(*) AS received"
        " FROM sensor_data WHERE node_id = $1 AND boot IS NOT NULL AND seq IS NOT NULL"
        " AND ($2::timestamptz IS NULL OR received_at >= $2)"
        " AND ($3::timestamptz IS NULL OR received_at < $3)"
        " GROUP BY boot ORDER BY boot",
        node_id,
        since,
        until,
    )


routes = [
    Route("/api/nodes/{node_id}/sensor-data", sensor_data, methods=["GET"]),
    Route("/api/nodes/{node_id}/completeness", completeness, methods=["GET"]),
    Route("/api/sensor-data", sensor_data, methods=["GET"]),
]
