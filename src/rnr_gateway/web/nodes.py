"""Nodes and their presence events (legacy paths and shapes kept for the original
dashboard)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..topics import mac_address, valid_node_id
from .common import gateway, int_param, json_response, query, read_json, require, time_range
from .errors import invalid, not_found

if TYPE_CHECKING:
    from asyncpg import Record

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


def _page(request: Request) -> tuple[int, int]:
    """``limit`` and ``offset`` of a node list (``/api/nodes``, ``/api/nodes/online``)."""
    return (
        int_param(request, "limit", 1000, 1, 10_000),
        int_param(request, "offset", 0, 0, 10_000_000),
    )


async def list_nodes(request: Request) -> Response:
    require(request, "read")
    limit, offset = _page(request)
    rows = await query(
        request,
        lambda c: c.fetch(
            f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY node_id LIMIT $1 OFFSET $2", limit, offset
        ),
    )
    return json_response([node_json(r, request) for r in rows])


async def online_nodes(request: Request) -> Response:
    require(request, "read")
    limit, offset = _page(request)
    presence = gateway(request).presence
    online = sorted(n for n in presence.nodes if presence.is_online(n))
    rows = await query(
        request,
        lambda c: c.fetch(
            f"SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ANY($1::text[])"
            " ORDER BY node_id LIMIT $2 OFFSET $3",
            online,
            limit,
            offset,
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
    """Presence transitions, newest first; ``since``/``until`` bound their time."""
    require(request, "read")
    node_id = node_id_of(request)
    limit = int_param(request, "limit", 100, 1, 1000)
    since, until = time_range(request)
    rows = await query(
        request,
        lambda c: c.fetch(
            "SELECT from_status, to_status, reason, at FROM node_events WHERE node_id = $1"
            " AND ($2::timestamptz IS NULL OR at >= $2)"
            " AND ($3::timestamptz IS NULL OR at < $3)"
            " ORDER BY at DESC, id DESC LIMIT $4",
            node_id,
            since,
            until,
            limit,
        ),
    )
    return json_response([dict(r) for r in rows])


routes = [
    Route("/api/nodes", list_nodes, methods=["GET"]),
    Route("/api/nodes", create_node, methods=["POST"]),
    Route("/api/nodes/online", online_nodes, methods=["GET"]),
    Route("/api/nodes/count", count_nodes, methods=["GET"]),
    Route("/api/nodes/{node_id}", get_node, methods=["GET"]),
    Route("/api/nodes/{node_id}", update_node, methods=["PUT"]),
    Route("/api/nodes/{node_id}", delete_node, methods=["DELETE"]),
    Route("/api/nodes/{node_id}/events", node_events, methods=["GET"]),
]
