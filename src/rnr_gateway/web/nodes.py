"""Nodes and their data (legacy paths and shapes kept for the original dashboard)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..topics import mac_address, valid_node_id
from .common import gateway, int_param, json_response, query, read_json, require, time_param
from .errors import invalid, not_found

if TYPE_CHECKING:
    from asyncpg import Record

    from ..db import Conn

NODE_COLUMNS = (
    "id, node_id, name, mac_address, location, created_at, last_seen, is_active, status,"
    " message_count, firmware, report_interval_s"
)
EDITABLE = {"name": str, "location": str, "mac_address": str, "is_active": bool}


def node_json(row: Record, request: Request) -> dict[str, Any]:
    item = dict(row)
    item["is_active"] = "true" if row["is_active"] else "false"  # the legacy shape
    item["status"] = gateway(request).presence.status(row["node_id"])
    return item


def node_id_of(request: Request) -> str:
    node_id: str = request.path_params["node_id"]
    if not valid_node_id(node_id):
        raise invalid(f"{node_id[:80]!r} is not a valid node id", "invalid_node_id")
    return node_id


async def list_nodes(request: Request) -> Response:
    require(request, "read")
    limit = int_param(request, "limit", 1000, 1, 10_000)
    offset = int_param(request, "offset", 0, 0, 10_000_000)
    rows = await query(
        request,
        lambda c: c.fetch(
            f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY node_id LIMIT $1 OFFSET $2", limit, offset
        ),
    )
    return json_response([node_json(r, request) for r in rows])


async def online_nodes(request: Request) -> Response:
    require(request, "read")
    presence = gateway(request).presence
    online = sorted(n for n in presence.nodes if presence.is_online(n))
    rows = await query(
        request,
        lambda c: c.fetch(
            f"SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ANY($1::text[]) ORDER BY node_id",
            online,
        ),
    )
    return json_response([node_json(r, request) for r in rows])


async def count_nodes(request: Request) -> Response:
    require(request, "read")
    count = await query(request, lambda c: c.fetchval("SELECT count(*) FROM nodes"))
    return json_response({"count": count})


async def get_node(request: Request) -> Response:
    require(request, "read")
    node_id = node_id_of(request)
    row = await _fetch_node(request, node_id)
    return json_response(node_json(row, request))


async def _fetch_node(request: Request, node_id: str) -> Record:
    row: Record | None = await query(
        request,
        lambda c: c.fetchrow(f"SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = $1", node_id),
    )
    if row is None:
        raise not_found(f"node {node_id!r}")
    return row


def _editable(body: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in body.items():
        kind = EDITABLE.get(key)
        if kind is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, str) and len(value) > 200):
            raise invalid(f"{key} must be a {kind.__name__} (strings up to 200 characters)")
        out[key] = value
    return out


async def create_node(request: Request) -> Response:
    require(request, "admin")
    body = await read_json(request)
    node_id = body.get("node_id")
    if not isinstance(node_id, str) or not valid_node_id(node_id):
        raise invalid("node_id must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", "invalid_node_id")
    fields = _editable(body)
    fields.setdefault("mac_address", mac_address(node_id))
    row = await query(
        request,
        lambda c: c.fetchrow(
            "INSERT INTO nodes (node_id, name, mac_address, location, is_active)"
            " VALUES ($1, $2, $3, $4, COALESCE($5, true)) ON CONFLICT (node_id) DO NOTHING"
            f" RETURNING {NODE_COLUMNS}",
            node_id,
            fields.get("name"),
            fields.get("mac_address"),
            fields.get("location"),
            fields.get("is_active"),
        ),
    )
    if row is None:
        raise invalid(f"node {node_id!r} already exists", "node_exists")
    return json_response(node_json(row, request), status=201)


async def update_node(request: Request) -> Response:
    require(request, "admin")
    node_id = node_id_of(request)
    fields = _editable(await read_json(request))
    if not fields:
        raise invalid(f"nothing to update; editable fields: {', '.join(EDITABLE)}")
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
    row = await query(
        request,
        lambda c: c.fetchrow(
            f"UPDATE nodes SET {assignments}, updated_at = now() WHERE node_id = $1"
            f" RETURNING {NODE_COLUMNS}",
            node_id,
            *fields.values(),
        ),
    )
    if row is None:
        raise not_found(f"node {node_id!r}")
    return json_response(node_json(row, request))


async def delete_node(request: Request) -> Response:
    require(request, "admin")
    node_id = node_id_of(request)
    status = await query(
        request, lambda c: c.execute("DELETE FROM nodes WHERE node_id = $1", node_id)
    )
    if status.endswith(" 0"):
        raise not_found(f"node {node_id!r}")
    gateway(request).presence.forget(node_id)
    return json_response({"message": f"Node {node_id} deleted"})


async def node_events(request: Request) -> Response:
    require(request, "read")
    node_id = node_id_of(request)
    limit = int_param(request, "limit", 100, 1, 1000)
    rows = await query(
        request,
        lambda c: c.fetch(
            "SELECT from_status, to_status, reason, at FROM node_events WHERE node_id = $1"
            " ORDER BY at DESC, id DESC LIMIT $2",
            node_id,
            limit,
        ),
    )
    return json_response([dict(r) for r in rows])


async def sensor_data(request: Request) -> Response:
    require(request, "read")
    node_id = request.path_params.get("node_id") or request.query_params.get("node_id")
    if node_id is not None and not valid_node_id(node_id):
        raise invalid(f"{node_id[:80]!r} is not a valid node id", "invalid_node_id")
    limit = int_param(request, "limit", 100, 1, 1000)
    since, until = time_param(request, "since"), time_param(request, "until")
    kind = request.query_params.get("kind", "reading")
    if kind not in ("reading", "event", "heartbeat", "ping", "status", "all"):
        raise invalid("kind must be reading, event, heartbeat, ping, status or all")
    rows = await query(
        request,
        lambda c: c.fetch(
            "SELECT id, node_id, data::text AS data, received_at FROM sensor_data"
            " WHERE ($1::text IS NULL OR node_id = $1)"
            " AND ($2::timestamptz IS NULL OR received_at >= $2)"
            " AND ($3::timestamptz IS NULL OR received_at < $3)"
            " AND ($4 = 'all' OR kind = $4)"
            " ORDER BY received_at DESC, id DESC LIMIT $5",
            node_id,
            since,
            until,
            kind,
            limit,
        ),
    )
    return json_response(
        [
            {
                "id": r["id"],
                "node_id": r["node_id"],
                "data": orjson.loads(r["data"]),
                "received_at": r["received_at"],
            }
            for r in rows
        ]
    )


async def completeness(request: Request) -> Response:
    """Per boot: sequence numbers expected vs received (enhanced nodes only)."""
    require(request, "read")
    node_id = node_id_of(request)
    since, until = time_param(request, "since"), time_param(request, "until")
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
    Route("/api/nodes", list_nodes, methods=["GET"]),
    Route("/api/nodes", create_node, methods=["POST"]),
    Route("/api/nodes/online", online_nodes, methods=["GET"]),
    Route("/api/nodes/count", count_nodes, methods=["GET"]),
    Route("/api/nodes/{node_id}", get_node, methods=["GET"]),
    Route("/api/nodes/{node_id}", update_node, methods=["PUT"]),
    Route("/api/nodes/{node_id}", delete_node, methods=["DELETE"]),
    Route("/api/nodes/{node_id}/events", node_events, methods=["GET"]),
    Route("/api/nodes/{node_id}/sensor-data", sensor_data, methods=["GET"]),
    Route("/api/nodes/{node_id}/completeness", completeness, methods=["GET"]),
    Route("/api/sensor-data", sensor_data, methods=["GET"]),
]
