"""Command endpoints (PROTOCOL §4, §7): the outbox in rnr_gateway.commands does the work."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..errors import (
    CommandConflict,
    CommandTooLarge,
    DependencyUnavailable,
    GatewayError,
    InvalidCommand,
    NotFound,
)
from .common import gateway, int_param, json_response, read_json, require
from .errors import HttpError
from .nodes import node_id_of

T = TypeVar("T")
OPTIONS = ("priority", "ttl_s", "retain")
# the stable 503 codes of PROTOCOL §7, as the other routes answer them
UNAVAILABLE = {"postgresql": "database"}


async def _call(work: Awaitable[T]) -> T:
    """The command engine's errors, as HTTP errors with their stable codes."""
    try:
        return await work
    except NotFound as exc:
        raise HttpError(404, getattr(exc, "code", "not_found"), str(exc)) from None
    except InvalidCommand as exc:
        raise HttpError(422, exc.code, str(exc)) from None
    except CommandTooLarge as exc:
        raise HttpError(413, exc.code, str(exc)) from None
    except CommandConflict as exc:
        raise HttpError(409, exc.code, str(exc)) from None
    except DependencyUnavailable as exc:
        code = f"{UNAVAILABLE.get(exc.system, exc.system)}_unavailable"
        raise HttpError(503, code, f"{exc}; retry shortly") from None
    except GatewayError as exc:
        raise HttpError(422, "invalid_command", str(exc)) from None


def _split(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The legacy body (action + flat parameters, none dropped) and our delivery options."""
    options = {key: body.pop(key) for key in OPTIONS if key in body}
    return body, options


async def send_action(request: Request) -> Response:
    require(request, "command")
    node_id = node_id_of(request)
    body, options = _split(await read_json(request))
    record = await _call(gateway(request).commands.submit(node_id, body, **options))
    action = body.get("action")
    return json_response(
        {
            "message": f"Action {action} sent to node {node_id}",  # the legacy shape
            "message_id": record.message_id,
            "status": record.status,
            "command": record.to_json(),
        },
        status=202,
    )


async def broadcast(request: Request) -> Response:
    require(request, "command")
    body = await read_json(request)
    if "node_ids" not in body:  # a fleet-wide command is never a default
        raise HttpError(
            422,
            "invalid_request",
            'say which nodes: "node_ids" is a list of node ids, or "all" for every known node',
        )
    node_ids = body.pop("node_ids")
    if node_ids == "all":
        node_ids = None
    if node_ids is not None and (
        not isinstance(node_ids, list) or not all(isinstance(n, str) for n in node_ids)
    ):
        raise HttpError(422, "invalid_request", 'node_ids must be a list of node ids or "all"')
    command = body.pop("command", None)
    if isinstance(command, dict):
        body = {**command, **{k: v for k, v in body.items() if k in OPTIONS}}
    params, options = _split(body)
    group, records = await _call(gateway(request).commands.broadcast(node_ids, params, **options))
    return json_response(
        {
            "broadcast_id": group,
            "count": len(records),
            "commands": [
                {"node_id": r.node_id, "message_id": r.message_id, "status": r.status}
                for r in records
            ],
        },
        status=202,
    )


async def get_command(request: Request) -> Response:
    require(request, "read")
    record = await _call(gateway(request).commands.get(request.path_params["message_id"]))
    return json_response(record.to_json())


async def node_commands(request: Request) -> Response:
    require(request, "read")
    node_id = node_id_of(request)
    limit = int_param(request, "limit", 50, 1, 1000)
    records = await _call(gateway(request).commands.for_node(node_id, limit))
    return json_response([r.to_json() for r in records])


async def cancel(request: Request) -> Response:
    require(request, "command")
    record = await _call(gateway(request).commands.cancel(request.path_params["message_id"]))
    return json_response(record.to_json())


routes = [
    Route("/api/nodes/{node_id}/actions", send_action, methods=["POST"]),
    Route("/api/esp32/command/{node_id}", send_action, methods=["POST"]),  # legacy alias
    # the path the seed really served (its ESP32 router carried the prefix twice)
    Route("/api/esp32/esp32/command/{node_id}", send_action, methods=["POST"]),
    Route("/api/nodes/{node_id}/commands", node_commands, methods=["GET"]),
    Route("/api/commands/broadcast", broadcast, methods=["POST"]),
    Route("/api/commands/{message_id}", get_command, methods=["GET"]),
    Route("/api/commands/{message_id}/cancel", cancel, methods=["POST"]),
]
