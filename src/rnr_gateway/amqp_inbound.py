"""What an AMQP consumer hands on: one delivery, read and settled without aio-pika's
per-message wrapping (see ``Inbound``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage


class Inbound:
    """One delivery as the consumer hands it on: what it says, and how to settle it.

    Consumers are registered on aio-pika's underlying aiormq channel and get this thin
    view of aiormq's message instead of aio-pika's ``IncomingMessage``, which copies
    every AMQP property into a new object and runs the callback in a second task: at
    full rate that cost more CPU than decoding and storing the reading (bench/drain.py).
    """

    __slots__ = ("_message", "body")

    def __init__(self, message: DeliveredMessage) -> None:
        self._message = message
        self.body: bytes = message.body

    @property
    def routing_key(self) -> str:
        return self._message.delivery.routing_key or ""  # type: ignore[union-attr]

    @property
    def exchange(self) -> str:
        return self._message.delivery.exchange or ""  # type: ignore[union-attr]

    @property
    def delivery_tag(self) -> int:
        return int(self._message.delivery.delivery_tag or 0)  # type: ignore[union-attr]

    @property
    def redelivered(self) -> bool:
        return bool(self._message.delivery.redelivered)  # type: ignore[union-attr]

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.header.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def timestamp(self) -> datetime | None:
        return self._message.header.properties.timestamp

    @property
    def priority(self) -> int | None:
        return self._message.header.properties.priority

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        """The channel it came on; ChannelInvalidStateError once that is closed (the broker
        then owns the delivery again and redelivers it)."""
        channel = self._message.channel
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("channel closed")
        return channel

    async def ack(self, multiple: bool = False) -> None:
        await self.channel.basic_ack(self.delivery_tag, multiple=multiple)


def adapt(fn: Callable[[Inbound], None]) -> Callable[[DeliveredMessage], Any]:
    async def callback(message: DeliveredMessage) -> None:  # aiormq runs it as a task
        fn(Inbound(message))

    return callback
