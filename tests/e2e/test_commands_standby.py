"""Two gateways on one vhost and one database: the broker gives the command and ack queues
(exclusive consumers) to one of them, which sends every command; the other accepts
commands over its API, routes them through the command queue and takes over when the
first one goes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from rnr_gateway import outbox
from rnr_gateway.amqp import Amqp
from rnr_gateway.amqp_exclusive import STANDBY_RETRY_S, Consumer
from rnr_gateway.command_codec import NewCommand, Options
from rnr_gateway.gateway import Gateway
from rnr_gateway.metrics import Metrics
from rnr_gateway.settings import Settings
from tests.conftest import eventually, running
from tests.e2e.command_node import FAST, TestNode, fast, settled, statuses

FAST_SWEEP_S = FAST.sweep_interval_s
QUEUES = ("device_commands_enhanced", "device_acks")


async def heard(gw: Gateway, node: TestNode) -> None:
    """Until this gateway has seen the node: its messages are shared out between the two."""
    for _ in range(50):
        if gw.presence.is_online(node.node_id):
            return
        await node.send("data", {"type": "heartbeat", "status": "online"})
        await asyncio.sleep(0.2)
    pytest.fail(f"gateway never saw {node.node_id} online")


async def test_one_gateway_sends_the_other_stands_by_then_takes_over(settings: Settings) -> None:
    s = fast(settings)
    node = TestNode(s, "NODE-TWO", announce=False)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running(Gateway(s)))
        async with running(Gateway(s)) as second, node.connected():
            assert first.commands.active.is_set()
            assert not second.commands.active.is_set()
            assert first.metrics.value("rnr_commands_dispatching") == 1
            assert second.metrics.value("rnr_commands_dispatching") == 0
            assert first.stats()["mqtt_publisher"]["dispatching_commands"] is True
            assert second.stats()["mqtt_publisher"]["dispatching_commands"] is False
            # the holder knows other gateways ingest too (it checks every 30 s): a node it
            # has commands for but has not heard from itself is looked up in `nodes`
            await first.amqp.verify_consumers()
            assert first.amqp.shared("sensor_data_enhanced")
            # the node's messages so far went to the other gateway (its batch did this)
            await first.db.pool.execute(
                "INSERT INTO nodes (node_id, last_seen, status) VALUES ($1, now(), 'online')",
                node.node_id,
            )
            assert not first.presence.is_online(node.node_id)
            # accepted by the gateway standing by, sent by the one holding the queues
            ids = [
                (await second.commands.submit("NODE-TWO", {"action": "PING", "n": i})).message_id
                for i in range(3)
            ]
            done = [await settled(first, mid) for mid in ids]
            assert [d.status for d in done] == ["executed"] * 3
            assert all(statuses(d) == ["queued", "sent", "received", "executed"] for d in done)
            assert node.log.ids == ids and node.log.max_outstanding == 1
            assert second.commands.scheduler.queued == second.commands.scheduler.in_flight == 0

            await stack.aclose()  # the first gateway stops: the second takes the queues
            await eventually(second.commands.active.is_set, bool, within=STANDBY_RETRY_S + 10)
            await heard(second, node)
            last = await second.commands.submit("NODE-TWO", {"action": "PING", "n": 3})
            assert (await settled(second, last.message_id)).status == "executed"
    assert node.log.executed == dict.fromkeys([*ids, last.message_id], 1)


async def test_a_legacy_node_s_status_event_stored_by_the_other_gateway_confirms(
    settings: Settings,
) -> None:
    s = fast(settings)
    node = TestNode(s, "NODE-OLD", acks=False, announce=False)  # legacy firmware
    async with running(Gateway(s)) as first, running(Gateway(s)) as second, node.connected():
        await first.amqp.verify_consumers()
        assert first.commands.active.is_set() and first.amqp.shared("sensor_data_enhanced")
        await first.db.pool.execute(
            "INSERT INTO nodes (node_id, last_seen, status) VALUES ($1, now(), 'online')",
            node.node_id,
        )
        relay3_on = (
            "INSERT INTO sensor_data (node_id, data, received_at, kind)"
            " VALUES ($1, '{\"status\": \"relay3_on\"}', now(), 'event')"
        )
        await first.db.pool.execute(relay3_on, node.node_id)  # from before the command
        await asyncio.sleep(5 * FAST_SWEEP_S)
        record = await second.commands.submit(
            node.node_id, {"action": "RELAY_CONTROL", "relay": 3, "state": True}
        )
        await settled(first, record.message_id, frozenset({"sent"}))
        await asyncio.sleep(5 * FAST_SWEEP_S)  # the old event confirms nothing
        assert (await first.commands.get(record.message_id)).status == "sent"
        # the node's `relay3_on` now, stored by the other gateway's batch
        await first.db.pool.execute(relay3_on, node.node_id)
        done = await settled(first, record.message_id)
    assert done.status == "executed" and done.reason == "inferred"
    assert statuses(done) == ["queued", "sent", "executed"]
    assert [c["message_id"] for c in node.log.received] == [record.message_id]


async def test_the_gateway_standing_by_leaves_retained_copies_to_the_holder(
    settings: Settings,
) -> None:
    s = fast(settings)
    # another holder of the command queues: the consumers alone, no sweep of its own
    holder = Amqp(s.amqp, Metrics(), [Consumer(q, lambda m: None, exclusive=True) for q in QUEUES])
    async with holder, running(Gateway(s)) as gateway:
        assert holder.exclusive and not gateway.commands.active.is_set()
        new = NewCommand.create("NODE-RET", {"action": "PING"}, Options(5, 300, True))
        async with gateway.db.pool.acquire() as conn:
            await outbox.insert(conn, [new], "accepted")
            # acked, its retained copy not cleared yet: only the holder knows what
            # devices/NODE-RET/commands/last holds now
            await conn.execute(
                "UPDATE commands SET status = 'executed', attempts = 1 WHERE message_id = $1",
                new.message_id,
            )

        async def cleared() -> bool:
            return bool(
                await gateway.db.pool.fetchval(
                    "SELECT retain_cleared_at IS NOT NULL FROM commands WHERE message_id = $1",
                    new.message_id,
                )
            )

        await asyncio.sleep(10 * FAST_SWEEP_S)  # ten sweeps of the gateway standing by
        assert not await cleared()
        await holder.__aexit__(None, None, None)  # the gateway takes the queues over
        await eventually(gateway.commands.active.is_set, bool, within=STANDBY_RETRY_S + 10)
        await eventually(cleared, bool)  # now its sweep settles the copy
