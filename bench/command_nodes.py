"""The test nodes of bench/commands.py, in a child process so that the gateway's event
loop carries only the gateway: real MQTT clients (TCP_NODELAY) that ack ``received`` then
``executed`` for every command (each QoS 1, waiting for its PUBACK) and send a heartbeat
every 10 s, as firmware does.

    python -m bench.command_nodes < config.json   (started by bench.commands)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import orjson

from rnr_gateway.mqtt import NODELAY
from rnr_gateway.settings import Settings

from .services import child

HEARTBEAT_S = 10.0


def mqtt_config(settings: Settings) -> dict[str, Any]:
    return {
        "hostname": settings.mqtt.host,
        "port": settings.mqtt.port,
        "username": settings.mqtt.username,
        "password": settings.mqtt.password.value if settings.mqtt.password else None,
    }


async def heartbeats(client: aiomqtt.Client, node_id: str) -> None:
    """As firmware does: without them presence rightly takes the node for gone."""
    beat = orjson.dumps({"type": "heartbeat", "status": "online"})
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        await client.publish(f"devices/{node_id}/data", beat, qos=0)


async def serve_nodes(config: dict[str, Any], node_ids: list[str]) -> None:
    """Each node acks ``received`` then ``executed`` for every command, as firmware does."""

    async def node(node_id: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            **config,
            identifier=f"bench-{node_id}",
            socket_options=NODELAY,
        ) as client:
            await client.subscribe(f"devices/{node_id}/commands", qos=1)
            status = orjson.dumps({"status": "online", "node_id": node_id})
            await client.publish(f"devices/{node_id}/status", status, qos=1)
            beats = asyncio.create_task(heartbeats(client, node_id))
            ready.set()
            try:
                async for message in client.messages:
                    mid = orjson.loads(message.payload)["message_id"]
                    for outcome in ("received", "executed"):
                        ack = orjson.dumps({"message_id": mid, "status": outcome})
                        await client.publish(f"devices/{node_id}/ack", ack, qos=1)
            finally:
                beats.cancel()

    readies = [asyncio.Event() for _ in node_ids]
    tasks = [asyncio.create_task(node(n, r)) for n, r in zip(node_ids, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def nodes_process(settings: Settings, node_ids: list[str]) -> AsyncIterator[None]:
    proc = await child("bench.command_nodes", {"mqtt": mqtt_config(settings), "nodes": node_ids})
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 90)
    if line.strip() != b"ready":
        raise SystemExit("bench: the node process did not start")
    try:
        yield
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    config = json.loads(sys.stdin.read())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_nodes(config["mqtt"], config["nodes"]))


if __name__ == "__main__":
    main()
