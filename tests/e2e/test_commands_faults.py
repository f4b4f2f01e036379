"""Commands under real faults: the gateway's MQTT connection dropped before the PUBACK,
and the gateway SIGKILLed with commands in flight. Nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import aio_pika
import asyncpg
import orjson
import pytest
from bench.services import BrokerAdmin

from rnr_gateway import topology
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from tests.conftest import env_for, eventually, running
from tests.e2e.command_node import TestNode, fast, settled, statuses
from tests.e2e.tcpproxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]


async def test_connection_dropped_before_puback_resends_same_id_executed_once(
    settings: Settings,
) -> None:
    s = fast(settings)
    async with TcpProxy(s.mqtt.host, s.mqtt.port) as proxy:
        via_proxy = replace(s, mqtt=replace(s.mqtt, host="127.0.0.1", port=proxy.listen_port))
        async with running(Gateway(via_proxy)) as gw:
            node = TestNode(s, "NODE-DROP", ack_delay_s=1.0)  # acks after the resend
            async with node.connected(gw):
                await eventually(gw.mqtt.connected.is_set, bool)
                proxy.swallow_replies = True  # the broker's PUBACK never reaches the gateway
                record = await gw.commands.submit("NODE-DROP", {"action": "PING"})
                await eventually(lambda: len(node.log.received), lambda n: n >= 1)
                proxy.swallow_replies = False
                proxy.drop_all()  # the connection is lost while the gateway waits
                done = await settled(gw, record.message_id)
            unconfirmed = gw.metrics.value(
                "rnr_mqtt_publishes_total", {"kind": "command", "result": "unconfirmed"}
            )
    mid = record.message_id
    assert node.log.ids == [mid, mid]  # resent, with the same id
    assert node.log.executed == {mid: 1}
    assert done.status == "executed" and done.attempts == 2
    assert statuses(done) == ["queued", "sent", "received", "executed"]
    assert unconfirmed == 1 and proxy.connections == 2


async def test_expiry_during_a_slow_publish_never_sends_late_nor_blocks_the_node(
    settings: Settings,
) -> None:
    """The broker's PUBACKs come 1.5 s late; commands live 1 s. The sweep records them
    expired meanwhile: the late PUBACK frees the node's slot, and a command whose retained
    copy took that long is not published at all."""
    s = fast(settings)
    s = replace(s, mqtt=replace(s.mqtt, publish_timeout_s=5.0))
    async with TcpProxy(s.mqtt.host, s.mqtt.port) as proxy:
        via_proxy = replace(s, mqtt=replace(s.mqtt, host="127.0.0.1", port=proxy.listen_port))
        async with running(Gateway(via_proxy)) as gw:
            node = TestNode(s, "NODE-SLOW", acks=False)  # legacy: the PUBACK is all there is
            other = TestNode(s, "NODE-SLOW2", acks=False)
            async with node.connected(gw), other.connected(gw):
                await eventually(gw.mqtt.connected.is_set, bool)
                proxy.reply_delay_s = 1.5
                late = await gw.commands.submit("NODE-SLOW", {"action": "PING"}, ttl_s=1.0)
                kept = await gw.commands.submit(
                    "NODE-SLOW2", {"action": "PING", "n": 2}, ttl_s=1.0, retain=True
                )
                first = await settled(gw, late.message_id, frozenset({"expired"}), within=5)
                second = await settled(gw, kept.message_id, frozenset({"expired"}), within=8)
                proxy.reply_delay_s = 0.0
                # the node is not held by either: a fresh command goes out and is sent
                after = await gw.commands.submit("NODE-SLOW", {"action": "PING", "n": 3})
                sent = await settled(gw, after.message_id, frozenset({"sent"}), within=10)
    assert late.message_id in node.log.ids  # published before it expired (the node judges)
    assert first.attempts == 1 and statuses(first) == ["queued", "expired"]
    assert kept.message_id not in other.log.ids  # expired while its retained copy went out
    assert statuses(second) == ["queued", "expired"]
    assert sent.status == "sent" and after.message_id in node.log.ids


async def test_another_producer_s_command_without_id_is_one_command_when_redelivered(
    settings: Settings, db: asyncpg.Connection, broker_admin: BrokerAdmin, vhost: str
) -> None:
    """A redelivery repeats the message as it was: a command that came without a message
    id (the management API's publish sets none; aio-pika and aiormq always set one) is
    named by its content, so a copy is not taken for a second command."""
    async with running(Gateway(fast(settings))):
        # the last one marks the end: the gateway takes the queue's commands in order
        for n in (1, 1, 2, 3):
            broker_admin.client.post(
                f"/api/exchanges/{vhost}/{topology.COMMAND_EXCHANGE}/publish",
                json={
                    "routing_key": "commands.NODE-NOID",
                    "payload": f'{{"action":"PING","n":{n}}}',
                    "payload_encoding": "string",
                    "properties": {},
                },
            ).raise_for_status()
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM commands WHERE params->>'n' = '3'"), bool
        )
        rows = await db.fetch("SELECT message_id, params FROM commands ORDER BY created_at")
    assert sorted(orjson.loads(r["params"])["n"] for r in rows) == [1, 2, 3]
    assert all(r["message_id"].startswith("amqp-") for r in rows)


@pytest.mark.slow
async def test_gateway_killed_with_commands_in_flight_loses_none_duplicates_none(
    settings: Settings, db: asyncpg.Connection, tmp_path: Path
) -> None:
    s = fast(settings)
    ids = [f"kill-{i}" for i in range(4)]
    node = TestNode(s, "NODE-KILL")
    node.hold.clear()  # kill-0 stays in flight: received, not acked
    async with node.connected():
        await publish_commands(s, "NODE-KILL", ids)  # another producer, on the command queue
        proc = await start_gateway(s, tmp_path / "gateway.log")
        try:
            await eventually(lambda: node.log.ids, lambda got: got == ids[:1], within=30)
            assert (await db.fetchval("SELECT count(*) FROM commands")) == 4
        finally:
            proc.kill()
            await proc.wait()
        node.hold.set()  # the node finishes kill-0 while no gateway runs; its acks wait
        async with running(Gateway(s)) as gw:
            await node.send("data", {"type": "heartbeat", "status": "online"})
            done = [await settled(gw, mid, within=20) for mid in ids]
    assert [d.status for d in done] == ["executed"] * 4
    assert node.log.executed == dict.fromkeys(ids, 1)
    assert list(dict.fromkeys(node.log.ids)) == ids  # in order; a resend would reuse the id
    assert node.log.max_outstanding == 1
    assert await db.fetchval("SELECT count(*) FROM commands") == 4
    assert await db.fetchval("SELECT count(*) FROM command_acks_unmatched") == 0


async def publish_commands(settings: Settings, node_id: str, ids: list[str]) -> None:
    connection = await aio_pika.connect(settings.amqp.url.value)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.COMMAND_EXCHANGE)
        for mid in ids:
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps({"action": "PING", "label": mid}),
                    message_id=mid,
                    priority=5,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=f"commands.{node_id}",
            )


async def start_gateway(settings: Settings, log_path: Path) -> asyncio.subprocess.Process:
    env = env_for(settings)
    c = settings.commands
    env.update(
        COMMAND_ACK_TIMEOUT_S=str(c.ack_timeout_s),
        COMMAND_EXEC_TIMEOUT_S=str(c.exec_timeout_s),
        COMMAND_SWEEP_INTERVAL_S=str(c.sweep_interval_s),
        MQTT_PUBLISH_TIMEOUT_S=str(settings.mqtt.publish_timeout_s),
        MQTT_RETRY_DELAY=str(settings.mqtt.retry_delay_s),
    )
    with log_path.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rnr_gateway",
            "run",
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
