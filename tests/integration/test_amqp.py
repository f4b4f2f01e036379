"""The AMQP adapter against the real broker: topology mismatch, consumer verification."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aio_pika
import pytest

from rnr_gateway import topology
from rnr_gateway.amqp import Amqp, Consumer, Inbound
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


async def test_a_second_consumer_on_a_queue_that_must_be_alone_is_a_warning(
    settings: Settings, broker_admin: BrokerAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    def ignore(message: Inbound) -> None:
        pass

    alone = Consumer(topology.ACK_QUEUE, ignore, alone="state is per instance")
    shared = Consumer(topology.SENSOR_QUEUE, ignore)  # ingest: sharing is how it scales
    async with Amqp(settings.amqp, Metrics(), [alone, shared]) as first:
        assert await first.verify_consumers() == {topology.ACK_QUEUE: 1, topology.SENSOR_QUEUE: 1}
        assert "consumers on" not in caplog.text
        async with Amqp(settings.amqp, Metrics(), [alone, shared]) as second:
            counts = await second.verify_consumers()
            assert counts == {topology.ACK_QUEUE: 2, topology.SENSOR_QUEUE: 2}
            await first.verify_consumers()
            await second.verify_consumers()  # once per process, not at every check
        expected = (
            f"2 consumers on {topology.ACK_QUEUE}: another process (a second gateway?) "
            "consumes it too; state is per instance"
        )

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if "consumers on" in r.getMessage()]

        assert warnings() == [expected] * 2  # each process said it once
        # alone again, then shared again: said again
        assert (await first.verify_consumers())[topology.ACK_QUEUE] == 1
        async with Amqp(settings.amqp, Metrics(), [alone]):
            await first.verify_consumers()
        assert warnings() == [expected] * 4
