"""Two gateways on one vhost and one database: each stores part of the readings and one of
them sends the commands, yet a WebSocket client of either sees every reading and every
command transition (relayed through PostgreSQL NOTIFY)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson

from rnr_gateway.gateway import Gateway
from rnr_gateway.relay import MAX_PAYLOAD, pack
from rnr_gateway.settings import Settings
from tests.conftest import mqtt_client, running
from tests.e2e.command_node import TestNode, fast
from tests.e2e.test_ws import frame, ws


async def sharing(*gateways: Gateway) -> None:
    """Until each gateway knows the other ingests too and listens on the live channel."""
    for gw in gateways:
        await gw.amqp.verify_consumers()
        assert gw.amqp.shared("sensor_data_enhanced")
        await asyncio.wait_for(gw.relay.listening.wait(), 10)


async def test_each_client_sees_every_reading_whichever_gateway_stored_it(
    settings: Settings,
) -> None:
    nodes, per_node = 10, 20
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running(Gateway(settings)))
        second = await stack.enter_async_context(running(Gateway(settings)))
        await sharing(first, second)
        clients = [await stack.enter_async_context(ws(gw)) for gw in (first, second)]
        for socket in clients:
            assert (await frame(socket))["type"] == "snapshot"

        async def readings(socket: Any) -> set[tuple[str, int]]:
            got: set[tuple[str, int]] = set()
            async with asyncio.timeout(30):
                while len(got) < nodes * per_node:
                    f = await frame(socket)
                    if f["type"] == "sensor_data":
                        key = (f["node_id"], f["data"]["n"])
                        assert key not in got, f"{key} pushed twice"
                        got.add(key)
            return got

        readers = [asyncio.create_task(readings(s)) for s in clients]
        async with mqtt_client(settings, "relay-pub") as client:
            for i in range(per_node):
                for n in range(nodes):
                    body = orjson.dumps({"temperature": 20.5, "n": i})
                    await client.publish(f"devices/RELAY-{n}/data", body, qos=1)
        expected = {(f"RELAY-{n}", i) for n in range(nodes) for i in range(per_node)}
        assert await asyncio.gather(*readers) == [expected, expected]
        # both gateways stored a share, so each client saw readings the other one stored
        stored = [
            gw.metrics.value("rnr_messages_stored_total", {"kind": "reading"})
            for gw in (first, second)
        ]
        assert all(s > 0 for s in stored) and sum(s for s in stored) == len(expected)
        for gw in (first, second):
            assert gw.metrics.value("rnr_ws_relayed_total", {"direction": "received"}) > 0
        with contextlib.suppress(TimeoutError):  # nothing more: no echo of a relayed event
            while True:
                f = await frame(clients[0], within=0.5)
                assert f["type"] != "sensor_data", f


async def test_command_transitions_reach_clients_of_the_gateway_standing_by(
    settings: Settings,
) -> None:
    s = fast(settings)
    node = TestNode(s, "RELAY-CMD", announce=False)
    async with contextlib.AsyncExitStack() as stack:
        holder = await stack.enter_async_context(running(Gateway(s)))
        standby = await stack.enter_async_context(running(Gateway(s)))
        await stack.enter_async_context(node.connected())
        assert holder.commands.active.is_set() and not standby.commands.active.is_set()
        await sharing(holder, standby)
        socket = await stack.enter_async_context(ws(standby))
        assert (await frame(socket))["type"] == "snapshot"
        for _ in range(50):  # the node is online for the holder: its commands go out now
            if holder.presence.is_online(node.node_id):
                break
            await node.send("data", {"type": "heartbeat", "status": "online"})
            await asyncio.sleep(0.2)
        record = await standby.commands.submit(node.node_id, {"action": "PING"})
        seen: list[str] = []
        async with asyncio.timeout(15):
            while "executed" not in seen:
                f = await frame(socket)
                if f["type"] == "command_status" and f["message_id"] == record.message_id:
                    seen.append(f["status"])
        # "queued" from the standby itself, the rest from the holder, each once
        assert seen == ["queued", "sent", "received", "executed"]


def test_pack_splits_under_the_payload_limit_and_skips_what_never_fits() -> None:
    events = [orjson.dumps({"n": i, "pad": "x" * 300}) for i in range(100)]
    events.insert(50, orjson.dumps({"pad": "y" * MAX_PAYLOAD}))
    payloads, oversize = pack("origin", events)
    assert oversize == 1
    assert all(len(p.encode()) < MAX_PAYLOAD for p in payloads) and len(payloads) > 1
    lines = [line for p in payloads for line in p.split("\n")[1:]]
    assert [orjson.loads(line)["n"] for line in lines] == list(range(100))
    assert all(p.startswith("origin\n") for p in payloads)
