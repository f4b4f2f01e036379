"""RabbitMQ adapter (aio-pika): connection, topology, consumers, confirmed publishes.

Reconnecting lives here: a fresh connection per attempt (2 s doubling to 60 s, with
jitter), the topology re-declared and every consumer re-created and then verified with
the broker (passive declare → consumer count), never assumed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
)

from . import topology
from .aio import first_of
from .amqp_exclusive import STANDBY_RETRY_S, Consumer, Exclusive, reply_text
from .amqp_inbound import adapt
from .errors import DependencyUnavailable, GatewayError, TopologyMismatch
from .metrics import Metrics
from .settings import AmqpSettings

log = logging.getLogger(__name__)
SYSTEM = "rabbitmq"
VERIFY_INTERVAL_S = 30.0
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)
RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT, GatewayError)
AMQP_FAILURE: tuple[type[BaseException], ...] = (
    *TRANSIENT,
    GatewayError,
    aiormq.exceptions.AMQPError,
    RuntimeError,
)


class Amqp:
    def __init__(
        self, settings: AmqpSettings, metrics: Metrics, consumers: Sequence[Consumer] = ()
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.consumers = tuple(consumers)
        self.generation = 0
        self._connection: AbstractConnection | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        # queue → its consumer's channel (a strong reference, as for aio-pika's queues)
        self._queues: dict[str, AbstractChannel] = {}
        self._tags: dict[str, str] = {}
        self._consuming = True
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._retry = asyncio.Event()
        self.connected = asyncio.Event()
        self.on_restored: list[Callable[[], None]] = []  # after a reconnect succeeded
        self.reconnect_attempts = 0
        self.publish_failures = 0
        self._exclusive = Exclusive()
        self.on_exclusive = self._exclusive.on_change  # told when ``exclusive`` changes
        self.consumer_counts: dict[str, int] = {}  # the broker's, at the last check

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Amqp:
        await self._open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        await self._close()

    def request_stop(self) -> None:
        self._stop.set()

    def retry_now(self) -> None:
        """Cut the current reconnect wait short (the broker is known to be back)."""
        self._retry.set()

    async def run(self) -> None:
        """Watch the connection; after a loss reconnect with backoff until stopped.
        Standing by for the exclusive consumers, try to take them every few seconds."""
        while not self._stop.is_set():
            standby = self._standing_by()
            await first_of(
                self._lost, self._stop, within=STANDBY_RETRY_S if standby else VERIFY_INTERVAL_S
            )
            if self._stop.is_set():
                return
            if self._lost.is_set():
                await self._reconnect()
            elif standby:
                await self._retry_exclusive()
            else:
                await self._verify_consumers_or_reconnect()

    async def _reconnect(self) -> None:
        self.connected.clear()
        self.metrics.dependency_up.labels(SYSTEM).set(0)
        self.metrics.outages.labels(SYSTEM).inc()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self._close()
        delay = self.settings.reconnect_initial_s
        attempt = 0
        self._retry.clear()
        while not self._stop.is_set():
            wait = delay * random.uniform(0.8, 1.2)
            attempt += 1
            log.debug("RabbitMQ reconnect attempt %d in %.1f s", attempt, wait)
            await first_of(self._stop, self._retry, within=wait)
            if self._stop.is_set():
                return
            self._retry.clear()
            self.reconnect_attempts += 1
            try:
                await self._open()
            except TopologyMismatch:
                raise
            except RETRYABLE as exc:
                log.debug("RabbitMQ reconnect attempt %d failed: %s", attempt, exc)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            self.metrics.reconnects.labels(SYSTEM).inc()
            log.warning(
                "RabbitMQ connection restored after %.1f s (%d attempts); consumers verified",
                loop.time() - started,
                attempt,
            )
            for callback in self.on_restored:
                callback()
            return

    async def _open(self) -> None:
        self._lost.clear()
        try:
            conn = await aio_pika.connect(
                self.settings.url.value,
                timeout=self.settings.socket_timeout_s,
                heartbeat=self.settings.heartbeat_s,
                client_properties={"connection_name": "rnr-gateway"},
            )
        except TRANSIENT as exc:
            raise DependencyUnavailable(SYSTEM, self.settings.display, _describe(exc)) from None
        try:
            await self._declare(conn)
            consume = await conn.channel(publisher_confirms=False)
            await consume.set_qos(prefetch_count=self.settings.prefetch)
            publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
            self._connection, self._consume_channel, self._publish_channel = conn, consume, publish
            self._exchanges = {}
            consumers = await self._start_consumers(conn) if self._consuming else []
        except BaseException:
            self._connection = None
            await _quietly_close(conn)
            raise
        conn.close_callbacks.add(self._on_lost)
        consume.close_callbacks.add(self._on_lost)
        publish.close_callbacks.add(self._on_lost)
        for channel in consumers:
            channel.close_callbacks.add(self._on_lost)
        self.generation += 1
        self.connected.set()
        self.metrics.dependency_up.labels(SYSTEM).set(1)
        log.info(
            "connected to RabbitMQ at %s (prefetch %d)",
            self.settings.display,
            self.settings.prefetch,
        )

    def _on_lost(self, sender: Any, exc: BaseException | None = None) -> None:
        if not self._lost.is_set() and not self._stop.is_set():
            log.warning(
                "RabbitMQ connection lost (%s); reconnecting with backoff",
                _describe(exc) if exc else "closed",
            )
        self._lost.set()
        self.connected.clear()
        for spec in self.consumers:  # gone with the channel, whatever the last check said
            self.metrics.consumers.labels(spec.queue).set(0)
        self._exclusive.set(False)

    async def _close(self) -> None:
        conn, self._connection = self._connection, None
        self._queues.clear()
        self._tags.clear()
        if conn is not None:
            await _quietly_close(conn)

    # -- topology ----------------------------------------------------------------------
    async def _declare(self, conn: AbstractConnection) -> None:
        """Declare PROTOCOL §2 idempotently; a queue with other arguments is a clear error."""
        channel = await conn.channel(publisher_confirms=False)
        try:
            for ex in topology.EXCHANGES:
                try:
                    await channel.declare_exchange(ex.name, ex.type, durable=True)
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    vhost, detail = self.settings.vhost, reply_text(exc)
                    raise TopologyMismatch(ex.name, vhost, detail, "exchange") from None
            for q in topology.QUEUES:
                try:
                    queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise TopologyMismatch(q.name, self.settings.vhost, reply_text(exc)) from None
                for exchange, key in q.bindings:
                    await queue.bind(exchange, key)
        finally:
            await _quietly_close(channel)

    # -- consumers ---------------------------------------------------------------------
    async def _start_consumers(self, conn: AbstractConnection) -> list[AbstractChannel]:
        channels = [await self._consume(conn, s) for s in self.consumers if not s.exclusive]
        channels += await self._take_exclusive(conn)
        await self.verify_consumers()
        return channels

    async def _consume(self, conn: AbstractConnection, spec: Consumer) -> AbstractChannel:
        # A channel per consumer: its delivery tags are then all that consumer's, so it
        # may settle a whole batch with one multiple ack (ingest does).
        channel = await conn.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            await channel.declare_queue(spec.queue, passive=True)  # a clear error if absent
            underlay = await channel.get_underlay_channel()
            # the broker cancels a consumer whose queue went (deleted, or lost with a
            # cluster node): this process's own consumer, which a count of the queue's
            # consumers cannot tell apart from another gateway's
            underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
            ok = await underlay.basic_consume(
                spec.queue, adapt(spec.on_message), no_ack=False, exclusive=spec.exclusive
            )
        except BaseException:
            await _quietly_close(channel)
            raise
        self._tags[spec.queue] = str(ok.consumer_tag)
        self._queues[spec.queue] = channel
        return channel

    def _on_cancelled(self, frame: Any) -> None:
        queue = next((q for q, tag in self._tags.items() if tag == frame.consumer_tag), None)
        if queue is None or not self._consuming:
            return
        log.warning("the broker cancelled this gateway's consumer on %s; reconnecting", queue)
        self.metrics.consumers.labels(queue).set(0)
        self._lost.set()

    async def _take_exclusive(self, conn: AbstractConnection) -> list[AbstractChannel]:
        async def consume(spec: Consumer) -> AbstractChannel:
            return await self._consume(conn, spec)

        async def release(spec: Consumer, channel: AbstractChannel) -> None:
            self._queues.pop(spec.queue, None)
            self._tags.pop(spec.queue, None)
            await _quietly_close(channel)

        return await self._exclusive.take(self.consumers, consume, release)

    async def _retry_exclusive(self) -> None:
        conn = self._connection
        if conn is None:
            return
        try:
            channels = await self._take_exclusive(conn)
            for channel in channels:
                channel.close_callbacks.add(self._on_lost)
            if channels:
                await self.verify_consumers()
        except AMQP_FAILURE as exc:
            log.warning("taking the exclusive consumers failed (%s); reconnecting", exc)
            self._lost.set()

    @property
    def exclusive(self) -> bool:
        """Whether this process holds the exclusive consumers."""
        return self._exclusive.held

    def _standing_by(self) -> bool:
        return (
            self._consuming
            and self.connected.is_set()
            and not self.exclusive
            and any(s.exclusive for s in self.consumers)
        )

    async def verify_consumers(self) -> dict[str, int]:
        """Ask the broker how many consumers each of our queues has; raise if one has none."""
        counts: dict[str, int] = {}
        if not self._consuming or self._consume_channel is None:
            return counts
        for name in self._queues:
            ok = await self._consume_channel.declare_queue(name, passive=True)
            result = ok.declaration_result
            counts[name] = int(result.consumer_count or 0)
            self.metrics.consumers.labels(name).set(counts[name])
            if counts[name] < 1:
                raise GatewayError(f"broker reports no consumer on {name!r} after consume")
        self.consumer_counts = counts
        return counts

    async def ready(self, queues: Sequence[str]) -> int:
        """Messages waiting in these queues, not yet delivered to any consumer."""
        if self._consume_channel is None:
            return 0
        total = 0
        for name in queues:
            ok = await self._consume_channel.declare_queue(name, passive=True)
            total += int(ok.declaration_result.message_count or 0)
        return total

    def shared(self, queue: str) -> bool:
        """Whether another process consumed this queue too at the last consumer check."""
        return self.consumer_counts.get(queue, 0) > 1

    async def _verify_consumers_or_reconnect(self) -> None:
        try:
            await self.verify_consumers()
        except AMQP_FAILURE as exc:
            log.warning("consumer check failed (%s); reconnecting", exc)
            self._lost.set()

    async def stop_consuming(self) -> None:
        """Shutdown stage 1: cancel every consumer; in-flight deliveries stay ours to ack."""
        self._consuming = False
        for name, channel in list(self._queues.items()):
            tag = self._tags.get(name)
            if tag is None:
                continue
            try:
                async with asyncio.timeout(self.settings.socket_timeout_s):
                    await (await channel.get_underlay_channel()).basic_cancel(tag)
            except AMQP_FAILURE as exc:
                log.debug("cancel of consumer on %s failed: %s", name, exc)
            self.metrics.consumers.labels(name).set(0)  # not ready any more: stopping
        self._tags.clear()

    # -- publishing --------------------------------------------------------------------
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        priority: int | None = None,
        expiration_s: float | None = None,
        message_id: str | None = None,
        persistent: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm (bounded by publish_timeout_s)."""
        channel = self._publish_channel
        if channel is None or not self.connected.is_set():
            raise DependencyUnavailable(SYSTEM, self.settings.display, "not connected")
        ex = self._exchanges.get(exchange)
        if ex is None:
            ex = self._exchanges[exchange] = await channel.get_exchange(exchange, ensure=False)
        message = aio_pika.Message(
            body,
            headers=headers,
            priority=priority,
            expiration=expiration_s,
            message_id=message_id,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        self.metrics.confirms_pending.inc()
        try:
            await ex.publish(
                message, routing_key, mandatory=True, timeout=self.settings.publish_timeout_s
            )
        except aiormq.exceptions.PublishError as exc:
            self.publish_failures += 1
            raise GatewayError(f"unroutable: no queue bound for {exchange}/{routing_key}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            self.publish_failures += 1
            raise GatewayError(f"broker refused publish to {exchange}/{routing_key}") from exc
        except TRANSIENT as exc:
            self.publish_failures += 1
            raise DependencyUnavailable(SYSTEM, self.settings.display, _describe(exc)) from None
        finally:
            self.metrics.confirms_pending.dec()
        self.metrics.published.labels(exchange).inc()


async def _quietly_close(closable: AbstractConnection | AbstractChannel) -> None:
    try:
        await asyncio.wait_for(closable.close(), timeout=5)
    except AMQP_FAILURE as exc:
        log.debug("close failed: %s", exc)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
