"""WebSocket /ws and presence against a real server on a port-0 socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import PresenceSettings, Settings
from tests.conftest import TOKENS, eventually, mqtt_client, running

AUTH = {"Authorization": f"Bearer {TOKENS['read']}"}


def url(gateway: Gateway) -> str:
    return f"ws://127.0.0.1:{gateway.http_port}/ws"


@contextlib.asynccontextmanager
async def ws(gateway: Gateway, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    kwargs.setdefault("additional_headers", AUTH)
    async with connect(url(gateway), proxy=None, open_timeout=5, **kwargs) as socket:
        yield socket


async def frame(socket: ClientConnection, within: float = 10) -> dict[str, Any]:
    message = await asyncio.wait_for(socket.recv(), within)
    result: dict[str, Any] = orjson.loads(message)
    return result


async def frames_until(
    socket: ClientConnection, stop: Any, within: float = 15
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while not out or not stop(out[-1]):
            out.append(await frame(socket))
    return out


async def test_auth_header_first_frame_origin_and_snapshot(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus):  # a bad token is refused before accept
        async with ws(gateway, additional_headers={"Authorization": "Bearer wrong-token"}):
            pass
    with pytest.raises(InvalidStatus):
        async with ws(gateway, origin="http://evil.example"):
            pass
    async with ws(gateway) as socket:
        snapshot = await frame(socket)
        assert snapshot["type"] == "snapshot" and snapshot["nodes"] == []
    async with ws(gateway, additional_headers={}) as browser:  # browsers: first frame
        await browser.send(orjson.dumps({"type": "auth", "token": TOKENS["read"]}).decode())
        assert (await frame(browser))["type"] == "snapshot"
    async with ws(gateway, additional_headers={}) as bad:
        await bad.send('{"type":"auth","token":"not-a-token"}')
        assert (await frame(bad))["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await frame(bad)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_events_legacy_shapes_and_subscribe_filter(
    gateway: Gateway, settings: Settings
) -> None:
    async with ws(gateway) as all_events, ws(gateway) as only_b:
        await frame(all_events)
        await frame(only_b)
        await only_b.send('{"type":"subscribe","nodes":["B"],"types":["sensor_data"]}')
        await asyncio.sleep(0.2)  # the filter is applied by the server's receive loop
        async with mqtt_client(settings, "pub") as client:
            await client.publish("devices/A/data", b'{"temperature":1.5}', qos=1)
            await client.publish("devices/B/data", b'{"temperature":2.5}', qos=1)
        seen: set[str] = set()

        def both(f: dict[str, Any]) -> bool:
            if f["type"] == "sensor_data":
                seen.add(f["node_id"])
            return seen == {"A", "B"}

        got = await frames_until(all_events, both)
        readings = [f for f in got if f["type"] == "sensor_data"]
        # two writers commit concurrently: order across nodes is not guaranteed
        assert sorted((f["node_id"], f["data"]["temperature"]) for f in readings) == [
            ("A", 1.5),
            ("B", 2.5),
        ]
        assert {"type", "node_id", "data", "timestamp"} <= set(readings[0])
        status = [f for f in got if f["type"] == "node_status"]
        assert {(f["node_id"], f["status"], f["reason"]) for f in status} == {
            ("A", "online", "message"),
            ("B", "online", "message"),
        }
        b = await frame(only_b)
        assert (b["type"], b["node_id"]) == ("sensor_data", "B")
        with pytest.raises(TimeoutError):
            await frame(only_b, within=0.5)


def stalling_socket(gateway: Gateway) -> socket.socket:
    """A connection that buffers little: small segments and a small receive window, so a
    client that stops reading stalls the server's sends after some 100 KB, not megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.http_port or 0))
    sock.setblocking(False)
    return sock


async def test_stalled_and_vanished_clients_do_not_cost_the_others(
    gateway: Gateway, settings: Settings
) -> None:
    gateway.hub.queue_size = 50
    async with contextlib.AsyncExitStack() as stack:
        healthy = [await stack.enter_async_context(ws(gateway)) for _ in range(48)]
        # reads one frame, then nothing more (its library stops reading when it holds one)
        stalled = await stack.enter_async_context(
            ws(gateway, max_queue=1, sock=stalling_socket(gateway))
        )
        vanished = await stack.enter_async_context(ws(gateway))
        for client in [*healthy, vanished]:
            await frame(client)
        vanished.transport.abort()  # gone without a close frame
        count, pad = 300, "x" * 2000  # 600 KB for each client

        async def readings(client: ClientConnection) -> list[int]:
            got = await frames_until(
                client, lambda f: f.get("data", {}).get("temperature") == count - 1, within=60
            )
            return [f["data"]["temperature"] for f in got if f["type"] == "sensor_data"]

        readers = [asyncio.create_task(readings(s)) for s in healthy]
        async with mqtt_client(settings, "burst") as client:
            for i in range(count):
                body = orjson.dumps({"temperature": i, "note": pad})
                await client.publish("devices/BURST/data", body, qos=1)
        results = await asyncio.gather(*readers)
        assert [sorted(r) for r in results] == [list(range(count))] * len(healthy)
        assert all(r == list(range(count)) for r in results), "events of one node stay in order"
        # the stalled client really stalled: its queue overflowed (resync, or closed)
        stalls = gateway.metrics.value("rnr_ws_overflows_total") + gateway.metrics.value(
            "rnr_ws_closed_slow_total"
        )
        assert stalls >= 1, "the stalled client never overflowed"
        assert all(c.queue.qsize() <= 50 for c in gateway.hub.clients)
        await eventually(
            lambda: gateway.metrics.value("rnr_ws_disconnects_total", {"reason": "client"}),
            lambda n: n >= 1,  # the vanished one
        )
        assert stalled.state.name == "OPEN"  # still connected, just not reading


@pytest.fixture
def fast_presence(settings: Settings) -> Settings:
    return replace(
        settings,
        presence=PresenceSettings(
            offline_threshold_s=1.0, status_check_interval_s=0.2, new_node_threshold_s=1.0
        ),
    )


async def test_offline_after_threshold_lwt_immediately_each_pushed_once(
    fast_presence: Settings,
) -> None:
    async with running(Gateway(fast_presence)) as gateway, ws(gateway) as socket:
        await frame(socket)
        async with mqtt_client(fast_presence, "quiet") as client:
            await client.publish("devices/QUIET/data", b'{"temperature":1}', qos=1)
            await client.publish("devices/LWT/data", b'{"temperature":1}', qos=1)
            await client.publish("devices/LWT/status", b"offline", qos=1)
        got = await frames_until(
            socket,
            lambda f: f.get("node_id") == "QUIET" and f.get("status") == "offline",
            within=10,
        )
        status = [
            (f["node_id"], f["status"], f["reason"]) for f in got if f["type"] == "node_status"
        ]
        assert status.count(("QUIET", "offline", "timeout")) == 1
        assert status.count(("LWT", "offline", "lwt")) == 1
        assert status.count(("QUIET", "online", "message")) == 1
        with pytest.raises(TimeoutError):  # nothing more: each transition pushed once
            while True:
                extra = await frame(socket, within=1.0)
                assert extra["type"] != "node_status", extra
        events = await gateway.db.pool.fetch(
            "SELECT node_id, from_status, to_status, reason FROM node_events ORDER BY id"
        )
        assert [tuple(r) for r in events if r["node_id"] == "QUIET"] == [
            ("QUIET", "unknown", "online", "message"),
            ("QUIET", "online", "offline", "timeout"),
        ]


async def test_restart_keeps_state_without_spurious_transitions(
    fast_presence: Settings,
) -> None:
    steady = replace(
        fast_presence,
        presence=replace(
            fast_presence.presence,
            offline_threshold_s=3.0,
            new_node_threshold_s=3.0,
            status_check_interval_s=1.0,
        ),
    )
    async with mqtt_client(steady, "reporter") as client:
        async with running(Gateway(steady)):
            for _ in range(3):
                await client.publish("devices/KEEPS/data", b'{"temperature":1}', qos=1)
                await client.publish("devices/STOPS/data", b'{"temperature":1}', qos=1)
                await asyncio.sleep(0.3)
        await asyncio.sleep(4)  # the gateway is down; KEEPS keeps reporting, STOPS is silent
        await client.publish("devices/KEEPS/data", b'{"temperature":2}', qos=1)
        async with running(Gateway(steady)) as gateway, ws(gateway) as socket:
            snapshot = await frame(socket)
            shown = {n["node_id"]: n["status"] for n in snapshot["nodes"]}
            assert set(shown) == {"KEEPS", "STOPS"}
            assert shown["STOPS"] != "online"  # silent meanwhile: never shown online
            await client.publish("devices/KEEPS/data", b'{"temperature":3}', qos=1)
            got = await frames_until(
                socket,
                lambda f: f.get("node_id") == "STOPS" and f.get("type") == "node_status",
                within=10,
            )
            status = [
                (f["node_id"], f["status"], f["reason"]) for f in got if f["type"] == "node_status"
            ]
            assert status == [("STOPS", "offline", "startup")]
            assert gateway.presence.is_online("KEEPS")


async def test_frames_go_uncompressed_unless_ws_compression_is_on(settings: Settings) -> None:
    # the websockets client offers permessage-deflate, as browsers do
    for enabled, expected in ((False, None), (True, "permessage-deflate")):
        configured = replace(settings, http=replace(settings.http, ws_compression=enabled))
        async with running(Gateway(configured)) as gateway, ws(gateway) as socket:
            assert socket.response is not None
            agreed = socket.response.headers.get("Sec-WebSocket-Extensions")
            assert (agreed.split(";")[0] if agreed else None) == expected
            assert (await frame(socket))["type"] == "snapshot"


async def test_a_token_in_a_query_string_never_reaches_the_log(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway never reads one from there, but uvicorn logs the target it was sent
    (and, at DEBUG, the handshake's headers)."""
    caplog.set_level(logging.DEBUG)
    secret = TOKENS["read"]
    async with connect(f"{url(gateway)}?token={secret}", proxy=None, additional_headers=AUTH):
        pass
    with pytest.raises(InvalidStatus):  # the query string is no credential
        wrong = {"Authorization": "Bearer wrong-token"}
        async with connect(f"{url(gateway)}?token={secret}", proxy=None, additional_headers=wrong):
            pass
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client")]
    targets = [line for line in ours if "WebSocket /ws" in line]
    assert targets and all("?[query hidden]" in t for t in targets)
    assert "< authorization: [hidden]" in ours  # the handshake's headers, at DEBUG
    assert not [line for line in ours if secret in line]
