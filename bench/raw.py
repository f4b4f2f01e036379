"""The raw ceiling: the least a consumer can do to move readings from RabbitMQ into
PostgreSQL with the same guarantee as the gateway (ack only after commit).

One aio-pika consumer with manual acks on ``sensor_data_enhanced``; one writer takes
whatever has arrived, COPYs it (``copy_records_to_table``) into ``sensor_data`` in one
implicit transaction and then acks everything up to the last delivery (``multiple``).
No classification, no validation, no node table, no metrics.

``RAW_CONSUME=aiormq`` consumes on aio-pika's underlying aiormq channel instead of
through ``Queue.consume`` (no ``IncomingMessage`` per delivery), the way the gateway
does; ``bench.drain`` reports both.

    RABBITMQ_URL=... DATABASE_URL=... PREFETCH_COUNT=500 python -m bench.raw
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from rnr_gateway.topology import SENSOR_QUEUE

COLUMNS = ("node_id", "data", "received_at", "ts", "boot", "seq")


def record(message: AbstractIncomingMessage | DeliveredMessage, now: datetime) -> tuple[Any, ...]:
    body = message.body
    fields = orjson.loads(body)
    node_id = (message.routing_key or "").split(".")[1]
    return (node_id, body.decode(), now, fields.get("ts"), fields.get("boot"), fields.get("seq"))


async def main() -> None:
    prefetch = int(os.environ.get("PREFETCH_COUNT", "500"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    db = await asyncpg.connect(os.environ["DATABASE_URL"], command_timeout=30)
    amqp = await aio_pika.connect(os.environ["RABBITMQ_URL"])
    pending: list[Any] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage | DeliveredMessage) -> None:
        pending.append(message)
        arrived.set()

    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(SENSOR_QUEUE, passive=True)
    underlay = await channel.get_underlay_channel()
    if os.environ.get("RAW_CONSUME") == "aiormq":
        tag = str((await underlay.basic_consume(SENSOR_QUEUE, on_message)).consumer_tag)
    else:
        tag = await queue.consume(on_message, no_ack=False)
    stopping = asyncio.ensure_future(stop.wait())
    while True:
        waiting = asyncio.ensure_future(arrived.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if stop.is_set():
            break
        arrived.clear()
        batch = pending.copy()
        pending.clear()
        if not batch:
            continue
        now = datetime.now(UTC)
        await db.copy_records_to_table(
            "sensor_data", records=[record(m, now) for m in batch], columns=COLUMNS
        )
        await underlay.basic_ack(batch[-1].delivery_tag, multiple=True)
    await underlay.basic_cancel(tag)
    await amqp.close()
    await db.close()


if __name__ == "__main__":
    asyncio.run(main())
