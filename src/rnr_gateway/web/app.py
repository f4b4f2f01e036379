"""The Starlette application and the uvicorn server run inside the gateway's loop."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PortInUse
from ..log import redact_server_logs
from . import commands, data, failed, health, nodes, ws
from .errors import HttpError, error_response, handle_http_error

if TYPE_CHECKING:
    from ..gateway import Gateway

log = logging.getLogger(__name__)
UNMATCHED = "unmatched"


class RequestMetrics:
    """Counts HTTP requests in ``rnr_http_requests_total{route, status}``. The route label
    is the matched route's path template (``/api/nodes/{node_id}``), or ``unmatched``, so
    its values are bounded by the route table, never by what clients send."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            self._count(scope, status or 500)  # answered by the server-error handler
            raise
        self._count(scope, status)

    def _count(self, scope: Scope, status: int) -> None:
        route = getattr(scope.get("route"), "path", None) or UNMATCHED
        self.counter.labels(route, str(status)).inc()


async def dashboard(request: Request) -> Response:
    page = resources.files("rnr_gateway.web").joinpath("static/index.html").read_text()
    return HTMLResponse(page)


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", f"no route for {request.method} {request.url.path}")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, "method_not_allowed", f"{request.method} is not allowed here")


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "unexpected error; see the gateway log")


def build_app(gateway: Gateway, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/", dashboard),
        *health.routes,
        *nodes.routes,
        *data.routes,
        *failed.routes,
        *commands.routes,
        *(extra_routes or []),
        *ws.routes,
    ]
    # outermost: every request is counted, including those CORS answers by itself
    middleware = [Middleware(RequestMetrics, counter=gateway.metrics.http_requests)]
    origins = list(gateway.settings.http.cors_origins)
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["*"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=list(data.PAGE_HEADERS),
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HttpError: handle_http_error,
            404: not_found,
            405: method_not_allowed,
            500: server_error,
        },
    )
    app.state.gateway = gateway
    return app


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: a port clash is a clear error at start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(host, port, exc.strerror or str(exc)) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(app: Starlette, graceful_s: float, ws_compression: bool = False) -> Server:
    redact_server_logs()  # no query string (where a client may put a token) in a log
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, int(graceful_s)),
        ws_max_size=65_536,
        ws_per_message_deflate=ws_compression,
    )
    return Server(config)
