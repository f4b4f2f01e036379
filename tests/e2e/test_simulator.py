"""The fleet simulator answers commands the way the firmwares do, through the real broker,
the gateway and PostgreSQL: what ``make run`` shows with no hardware."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from rnr_gateway import topology
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from rnr_gateway.simulate import FleetConfig, run_fleet
from tests.conftest import eventually, running
from tests.e2e.command_node import fast, settled, statuses

pytestmark = pytest.mark.slow


async def test_simulated_nodes_answer_commands_as_their_firmware_does(
    settings: Settings, unique: str, db: asyncpg.Connection
) -> None:
    s = fast(settings)
    config = FleetConfig.from_settings(
        s,
        nodes=2,
        legacy_share=0.5,
        rate_hz=4,
        node_prefix=f"S{unique[:6]}",
        progress_interval_s=60,
    )
    (legacy, _), (enhanced, _) = config.node_ids()
    stop = asyncio.Event()
    async with running(Gateway(s)) as gw:
        fleet = asyncio.create_task(run_fleet(config, stop, progress=lambda _: None))
        try:
            await eventually(
                lambda: gw.presence.is_online(legacy) and gw.presence.is_online(enhanced), bool
            )

            async def outcome(node_id: str, body: dict[str, Any]) -> Any:
                record = await gw.commands.submit(node_id, body)
                return await settled(gw, record.message_id, within=15)

            # an enhanced node acks as the MicroPython firmware does (the same code)
            relay = await outcome(enhanced, {"action": "RELAY_CONTROL", "relay": 2, "state": True})
            assert statuses(relay) == ["queued", "sent", "received", "executed"]
            update = await outcome(enhanced, {"action": "FIRMWARE_UPDATE", "url": "http://x/f"})
            assert update.status == "failed" and "cannot fetch http://x/f" in update.reason
            odd = await outcome(enhanced, {"action": "SELF_DESTRUCT"})
            assert odd.status == "rejected" and odd.reason == "unknown action SELF_DESTRUCT"
            servo = await outcome(enhanced, {"action": "SERVO_ANGLE", "angle": 45})
            assert servo.status == "executed"
            # a legacy node sends no ack: its status event tells the gateway what it did
            light = await outcome(legacy, {"action": "LIGHT_CONTROL", "state": True})
            assert statuses(light) == ["queued", "sent", "executed"]
            assert light.reason == "inferred"
            # the readings show what the commands did
            servo_at = servo.finished_at
            rows = await eventually(
                lambda: db.fetch(
                    "SELECT node_id, data FROM sensor_data WHERE kind = 'reading'"
                    " AND received_at > $1::timestamptz + interval '0.5 s'",
                    servo_at,
                ),
                lambda rows: {r["node_id"] for r in rows} == {legacy, enhanced},
            )
            for row in rows:
                data = orjson.loads(row["data"])
                if row["node_id"] == enhanced:
                    assert data["servo_angle"] == 45
                else:
                    assert data["light_state"] is True
            # REBOOT: acked executed, then the node comes back with a new boot number
            first_boot = config.boot
            reboot = await outcome(enhanced, {"action": "REBOOT"})
            assert reboot.status == "executed" and reboot.reason == "rebooting"
            await eventually(
                lambda: db.fetchval(
                    "SELECT count(*) FROM sensor_data WHERE node_id = $1 AND boot = $2",
                    enhanced,
                    first_boot + 1,
                ),
                lambda n: n > 0,
            )
        finally:
            stop.set()
            report = await asyncio.wait_for(fleet, 30)
    assert report.errors == 0
    by_id = {n.node_id: n for n in report.nodes}
    assert by_id[enhanced].reboots == 1 and by_id[enhanced].commands >= 5
    assert by_id[legacy].commands == 1


async def test_the_built_in_simulator_stops_first_and_leaves_nothing_in_the_broker(
    settings: Settings, unique: str, db: asyncpg.Connection
) -> None:
    """``run --simulate N``: at a stop the fleet ends before the consumers do, and what it
    sent last (its enhanced nodes going offline) is stored, not left to expire."""
    config = FleetConfig.from_settings(
        settings,
        nodes=4,
        legacy_share=0.5,
        rate_hz=50,
        node_prefix=f"T{unique[:6]}",
        progress_interval_s=60,
    )
    enhanced = [n for n, legacy in config.node_ids() if not legacy]

    async def simulator(gw: Gateway) -> None:
        await run_fleet(config, stop=gw.stopping, progress=lambda _: None)

    async with running(Gateway(settings, extras={"simulator": simulator})) as gw:
        await eventually(lambda: gw.presence.counts()[0], lambda online: online == 4)
        await asyncio.sleep(0.5)  # a steady stream: the stop comes in the middle of it
    connection = await aio_pika.connect(settings.amqp.url.value, timeout=5)
    async with connection, connection.channel() as channel:
        for name in (topology.SENSOR_QUEUE, topology.STATUS_QUEUE):
            queue = await channel.declare_queue(name, passive=True)
            assert queue.declaration_result.message_count == 0, name
    rows = await db.fetch("SELECT node_id, status FROM nodes WHERE node_id = ANY($1)", enhanced)
    assert {r["node_id"]: r["status"] for r in rows} == dict.fromkeys(enhanced, "offline")
