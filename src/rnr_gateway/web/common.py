"""Helpers every route module shares: the gateway handle, auth, bounded JSON bodies,
query parameters and database access that turns outages into 503."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..db import TRANSIENT
from ..settings import Scope
from .errors import HttpError, invalid

if TYPE_CHECKING:
    from ..db import Conn
    from ..gateway import Gateway

T = TypeVar("T")


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def require(request: Request, scope: Scope) -> Scope:
    return gateway(request).auth.require(request.headers, scope)


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return ORJSONResponse(content, status_code=status, headers=headers)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, capped at HTTP_MAX_BODY_BYTES (413 beyond)."""
    limit = gateway(request).settings.http.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, "payload_too_large", f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, "payload_too_large", f"the body is over {limit} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", "invalid_json")
    return data


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = optional_int_param(request, name, low, high)
    return default if value is None else value


def optional_int_param(request: Request, name: str, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}")
    return value


def time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise invalid(f"{name} must be an ISO 8601 time, got {raw[:40]!r}") from None
    if value.tzinfo is None:
        raise invalid(f"{name} must carry a time zone (e.g. 2026-11-27T14:30:00Z)")
    return value


def time_range(request: Request) -> tuple[datetime | None, datetime | None]:
    """``since`` (inclusive) and ``until`` (exclusive); since must come before until."""
    since, until = time_param(request, "since"), time_param(request, "until")
    if since is not None and until is not None and since >= until:
        raise invalid("since must be earlier than until")
    return since, until


async def query(request: Request, work: Callable[[Conn], Awaitable[T]]) -> T:
    """Run read/write work on a pooled connection; an outage becomes a clear 503."""
    db = gateway(request).db
    try:
        async with db.pool.acquire(timeout=5) as conn:
            return await work(conn)
    except TRANSIENT:
        raise HttpError(
            503, "database_unavailable", "PostgreSQL is unavailable; retry shortly"
        ) from None
