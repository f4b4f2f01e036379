"""WebSocket /ws: authenticated before any event is sent, Origin checked, a snapshot first,
then events from the hub through the client's own bounded queue and sender."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..broadcast import CLOSE, Client
from ..settings import Scope
from .errors import HttpError

log = logging.getLogger(__name__)
AUTH_TIMEOUT_S = 5.0
SEND_TIMEOUT_S = 10.0
SEND_BATCH = 64  # frames a sender sends back to back under one timeout
POLICY_VIOLATION = 1008
UNAUTHORIZED = 4401
TOO_SLOW = 4008
EVENT_TYPES = frozenset(("sensor_data", "node_status", "command_status", "stats"))


def origin_allowed(websocket: WebSocket, allowed: tuple[str, ...]) -> bool:
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True  # non-browser clients send no Origin
    return urlsplit(origin).netloc == websocket.headers.get("host")


async def endpoint(websocket: WebSocket) -> None:
    gw = websocket.app.state.gateway
    if not origin_allowed(websocket, gw.settings.http.cors_origins):
        await websocket.close(code=POLICY_VIOLATION, reason="origin not allowed")
        return
    scope: Scope | None
    try:
        scope = gw.auth.scope_of(websocket.headers)
    except HttpError:
        await websocket.close(code=POLICY_VIOLATION, reason="invalid token")
        return
    await websocket.accept()
    if scope is None:
        scope = await _first_frame_auth(websocket, gw)
        if scope is None:
            return
    client = gw.hub.connect()
    ended = "client"
    try:
        snapshot = orjson.dumps(await gw.snapshot()).decode()
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await websocket.send_text(snapshot)
        ended = await _serve(websocket, client, gw)
    except TimeoutError:
        ended = "send_timeout"
    except (WebSocketDisconnect, OSError, RuntimeError) as exc:
        log.debug("websocket ended: %s", exc)  # a client going away is not an error
    finally:
        gw.hub.disconnect(client)
        gw.metrics.ws_disconnects.labels(ended).inc()


async def _serve(websocket: WebSocket, client: Client, gw: Any) -> str:
    """The client's sender and receive loop, until one ends; returns why the connection
    ended: ``client`` (it closed or vanished), ``send_timeout`` (it stopped reading),
    ``too_slow`` (closed after overflowing again and again) or ``shutdown``."""
    ended = "client"
    try:
        async with asyncio.TaskGroup() as tg:
            sender = tg.create_task(_send(websocket, client, gw))
            tg.create_task(_receive(websocket, client, sender))
    except* TimeoutError:
        ended = "send_timeout"
    except* (WebSocketDisconnect, OSError, RuntimeError) as group:
        log.debug("websocket ended: %s", group.exceptions[0])
    if ended == "client" and client.close_reason:
        ended = client.close_reason
    return ended


async def _first_frame_auth(websocket: WebSocket, gw: Any) -> Scope | None:
    """Browsers cannot set headers: the first frame must be {"type":"auth","token":...}."""
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            frame = await websocket.receive_text()
        message = orjson.loads(frame)
        token = message.get("token") if isinstance(message, dict) else None
        scope: Scope | None = (
            gw.auth.scope_of_token(token)
            if message.get("type") == "auth" and isinstance(token, str)
            else None
        )
    except (TimeoutError, orjson.JSONDecodeError, WebSocketDisconnect, KeyError):
        scope = None
    if scope is None:
        with contextlib.suppress(Exception):
            await websocket.send_text(
                '{"type":"error","code":"unauthorized",'
                '"message":"send {\\"type\\":\\"auth\\",\\"token\\":...} first"}'
            )
            await websocket.close(code=UNAUTHORIZED)
    return scope


async def _send(websocket: WebSocket, client: Client, gw: Any) -> None:
    """Send what is queued, back to back (up to SEND_BATCH frames under one timeout)."""
    while True:
        frames = [await client.queue.get()]
        while len(frames) < SEND_BATCH and not client.queue.empty():
            frames.append(client.queue.get_nowait())
        sent = 0
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                for frame in frames:
                    if frame == CLOSE:
                        too_slow = client.close_reason == "too_slow"
                        await websocket.close(code=TOO_SLOW if too_slow else 1001)
                        return
                    await websocket.send_text(frame)
                    sent += 1
        finally:
            gw.metrics.ws_events.inc(sent)


async def _receive(websocket: WebSocket, client: Client, sender: asyncio.Task[None]) -> None:
    """A send-only socket never notices a disconnect: this loop does, and takes filters."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text:
                _apply(client, text)
    finally:
        sender.cancel()


def _apply(client: Client, text: str) -> None:
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return
    if not isinstance(message, dict) or message.get("type") != "subscribe":
        return
    nodes, types = message.get("nodes"), message.get("types")
    client.subscribe(
        [str(n) for n in nodes] if isinstance(nodes, list) else None,
        [str(t) for t in types if t in EVENT_TYPES] if isinstance(types, list) else None,
    )


routes = [WebSocketRoute("/ws", endpoint)]
