"""The AMQP adapter against the real broker: topology mismatch, consumer verification."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aio_pika
import pytest

from rnr_gateway import topology
from rnr_gateway.amqp import Amqp
from rnr_gateway.amqp_exclusive import STANDBY_RETRY_S, Consumer
from rnr_gateway.amqp_inbound import Inbound
from rnr_gateway.errors import TopologyMismatch
from rnr_gateway.gateway import Gateway
from rnr_gateway.metrics import Metrics
from rnr_gateway.settings import Settings
from tests.conftest import TOKENS, BrokerAdmin, eventually, running


async def test_existing_queue_with_other_arguments_is_one_clear_error(
    settings: Settings, broker_admin: BrokerAdmin, vhost: str
) -> None:
    broker_admin.client.delete(f"/api/queues/{vhost}/{topology.SENSOR_QUEUE}").raise_for_status()
    connection = await aio_pika.connect(settings.amqp.url.value)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            topology.SENSOR_QUEUE, durable=True, arguments={"x-message-ttl": 1000}
        )
    with pytest.raises(TopologyMismatch) as raised:
        async with Amqp(settings.amqp, Metrics()):
            pass
    message = str(raised.value)
    assert topology.SENSOR_QUEUE in message and vhost in message
    assert "x-message-ttl" in message  # the broker's account of what differs
    assert f"rabbitmqctl delete_queue -p {vhost} {topology.SENSOR_QUEUE}" in message


async def test_existing_exchange_of_another_type_is_one_clear_error(
    settings: Settings, broker_admin: BrokerAdmin, vhost: str
) -> None:
    exchange = topology.DATA_EXCHANGE
    broker_admin.client.delete(f"/api/exchanges/{vhost}/{exchange}").raise_for_status()
    broker_admin.client.put(
        f"/api/exchanges/{vhost}/{exchange}", json={"type": "fanout", "durable": True}
    ).raise_for_status()
    with pytest.raises(TopologyMismatch) as raised:
        async with Amqp(settings.amqp, Metrics()):
            pass
    message = str(raised.value)
    assert f"exchange {exchange!r} in vhost {vhost!r}" in message
    assert "fanout" in message or "type" in message  # the broker's account of what differs
    assert f"delete exchange name={exchange}" in message


async def test_a_consumer_the_broker_cancels_comes_back_at_once(
    settings: Settings, broker_admin: BrokerAdmin, vhost: str
) -> None:
    """Deleting the queue cancels the consumer: the adapter reconnects, declares the queue
    again and consumes, well before its periodic consumer check (30 s) would notice."""
    got: list[bytes] = []
    consumer = Consumer(topology.SENSOR_QUEUE, lambda m: got.append(m.body))
    metrics = Metrics()
    async with Amqp(settings.amqp, metrics, [consumer]) as amqp:
        runner = asyncio.create_task(amqp.run())
        try:
            await amqp.verify_consumers()
            broker_admin.client.delete(
                f"/api/queues/{vhost}/{topology.SENSOR_QUEUE}"
            ).raise_for_status()
            await eventually(
                lambda: metrics.value("rnr_reconnects_total", {"system": "rabbitmq"}),
                lambda n: n >= 1,
                within=10,
            )
            await eventually(amqp.connected.is_set, bool, within=10)
            assert await amqp.verify_consumers() == {topology.SENSOR_QUEUE: 1}
            await amqp.publish(topology.DATA_EXCHANGE, "devices.N1.data", b"back")
            await eventually(lambda: got, lambda g: g == [b"back"], within=5)
        finally:
            amqp.request_stop()
            await asyncio.wait_for(runner, 10)


async def test_consumers_are_verified_with_the_broker(
    settings: Settings, broker_admin: BrokerAdmin, vhost: str
) -> None:
    got: list[bytes] = []
    consumer = Consumer(topology.SENSOR_QUEUE, lambda m: got.append(m.body))
    metrics = Metrics()
    async with Amqp(settings.amqp, metrics, [consumer]) as amqp:
        counts = await amqp.verify_consumers()
        assert counts == {topology.SENSOR_QUEUE: 1}
        # the management API's figures lag by its stats interval (5 s): an emission from
        # before the consumer existed says 0 until the next one
        await eventually(
            lambda: broker_admin.queue(vhost, topology.SENSOR_QUEUE),
            lambda q: q.get("consumers") == 1,
        )
        assert metrics.value("rnr_amqp_consumers", {"queue": topology.SENSOR_QUEUE}) == 1
        await amqp.publish(topology.DATA_EXCHANGE, "devices.N1.data", b'{"temperature":1}')
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert got == [b'{"temperature":1}']


async def test_tokens_never_appear_in_logs(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx

    caplog.set_level(logging.DEBUG)
    anonymous = replace(settings, http=replace(settings.http, anonymous_scope="read"))
    async with running(Gateway(anonymous)) as gateway:
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            for token in [*TOKENS.values(), "some-wrong-token"]:
                await http.get("/api/nodes", headers={"Authorization": f"Bearer {token}"})
                await http.post(
                    "/api/nodes", content=b"{", headers={"Authorization": f"Bearer {token}"}
                )
    assert "API_ANONYMOUS_SCOPE" in caplog.text  # the start-up warning is there
    for token in [*TOKENS.values(), "some-wrong-token"]:
        assert token not in caplog.text
    assert settings.amqp.url.value.split("@")[0].split(":")[-1] not in caplog.text  # password


def ignore(message: Inbound) -> None:
    pass


async def ignore_incoming(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


def command_consumers() -> list[Consumer]:
    return [
        Consumer(topology.COMMAND_QUEUE, ignore, exclusive=True),
        Consumer(topology.ACK_QUEUE, ignore, exclusive=True),
        Consumer(topology.SENSOR_QUEUE, ignore),  # ingest: shared, that is how it scales
    ]


async def test_exclusive_consumers_are_one_process_s_and_pass_on_when_it_goes(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    held: list[tuple[str, bool]] = []
    first = Amqp(settings.amqp, Metrics(), command_consumers())
    second = Amqp(settings.amqp, Metrics(), command_consumers())
    first.on_exclusive.append(lambda h: held.append(("first", h)))
    second.on_exclusive.append(lambda h: held.append(("second", h)))
    async with first:
        assert first.exclusive
        async with second:
            watcher = asyncio.create_task(second.run())
            try:
                assert not second.exclusive
                assert await second.verify_consumers() == {topology.SENSOR_QUEUE: 2}
                assert "standing by:" in caplog.text and "in exclusive use" in caplog.text
                await first.__aexit__(None, None, None)  # the holder goes away
                await eventually(lambda: second.exclusive, bool, within=STANDBY_RETRY_S + 10)
                assert await second.verify_consumers() == {
                    topology.COMMAND_QUEUE: 1,
                    topology.ACK_QUEUE: 1,
                    topology.SENSOR_QUEUE: 1,
                }
            finally:
                second.request_stop()
                await asyncio.wait_for(watcher, 10)
    assert held == [("first", True), ("first", False), ("second", True), ("second", False)]


async def test_exclusive_consumers_are_all_or_none(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp.url.value)
    async with connection:
        channel = await connection.channel()
        acks = await channel.declare_queue(topology.ACK_QUEUE, passive=True)
        await acks.consume(ignore_incoming)  # someone else reads the acks
        async with Amqp(settings.amqp, Metrics(), command_consumers()) as amqp:
            assert not amqp.exclusive
            commands = await channel.declare_queue(topology.COMMAND_QUEUE, passive=True)
            # it had the command queue first, and let it go again
            assert commands.declaration_result.consumer_count == 0
