"""Failed messages: listed, and replayed through the broker (PROTOCOL §6)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import topology
from ..errors import DependencyUnavailable, GatewayError
from .common import gateway, int_param, json_response, query, require
from .errors import HttpError, invalid, not_found


async def list_failed(request: Request) -> Response:
    require(request, "read")
    limit = int_param(request, "limit", 100, 1, 1000)
    reason = request.query_params.get("reason")
    rows = await query(
        request,
        lambda c: c.fetch(
            "SELECT id, source, routing_key, headers::text AS headers, body, body_truncated,"
            " reason, detail, first_seen, last_seen, count, replayed_at FROM failed_messages"
            " WHERE ($1::text IS NULL OR reason = $1) ORDER BY last_seen DESC LIMIT $2",
            reason,
            limit,
        ),
    )
    out = []
    for row in rows:
        item = dict(row)
        body = bytes(row["body"])
        try:
            item["body"] = body.decode()
            item["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            item["body"] = body.hex()
            item["body_encoding"] = "hex"
        out.append(item)
    return json_response(out)


async def replay(request: Request) -> Response:
    """Publish the stored body again with its original routing key (admin)."""
    require(request, "admin")
    try:
        failed_id = int(request.path_params["failed_id"])
    except ValueError:
        raise invalid("the id must be an integer") from None
    row = await query(
        request,
        lambda c: c.fetchrow(
            "SELECT routing_key, body, body_truncated FROM failed_messages WHERE id = $1", failed_id
        ),
    )
    if row is None:
        raise not_found(f"failed message {failed_id}")
    if row["body_truncated"]:
        raise invalid("this message was stored truncated and cannot be replayed", "truncated")
    try:
        await gateway(request).amqp.publish(
            topology.DEVICE_EXCHANGE,
            row["routing_key"],
            bytes(row["body"]),
            headers={"x-rnr-replay-of": failed_id},
        )
    except DependencyUnavailable:
        raise HttpError(
            503, "rabbitmq_unavailable", "RabbitMQ is unavailable; retry shortly"
        ) from None
    except GatewayError as exc:
        raise invalid(str(exc), "replay_refused") from None
    await query(
        request,
        lambda c: c.execute(
            "UPDATE failed_messages SET replayed_at = now() WHERE id = $1", failed_id
        ),
    )
    return json_response(
        {"message": f"failed message {failed_id} replayed", "routing_key": row["routing_key"]}
    )


routes = [
    Route("/api/failed-messages", list_failed, methods=["GET"]),
    Route("/api/failed-messages/{failed_id}/replay", replay, methods=["POST"]),
]
