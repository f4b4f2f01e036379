"""Deliveries → batch → store → ack.

Writers pull greedily: a writer takes whatever has arrived (up to ``batch_max``, lingering
at most ``linger_ms`` for more), commits it in one transaction and only then acks. At a
low rate every message is written at once; under load batches grow by themselves.
The ack/skip decision for every delivery is made here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from . import store, topology
from .codec import decode
from .db import TRANSIENT, Database
from .errors import BadMessage, DependencyUnavailable
from .metrics import Metrics
from .settings import IngestSettings
from .store import Accepted, Failed

if TYPE_CHECKING:
    from .db import Conn

log = logging.getLogger(__name__)
OnStored = Callable[[Sequence[Accepted]], None]


@dataclass(frozen=True, slots=True)
class Delivery:
    queue: str
    message: AbstractIncomingMessage
    received: float  # monotonic


class Ingest:
    def __init__(
        self,
        settings: IngestSettings,
        db: Database,
        metrics: Metrics,
        on_stored: Sequence[OnStored] = (),
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.on_stored = list(on_stored)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()

    # called by the AMQP consumer for each delivery; must not block
    def submit(self, queue: str, message: AbstractIncomingMessage) -> None:
        self.metrics.consumed.labels(queue).inc()
        self.metrics.in_client.inc()
        self._idle.clear()
        self._queue.put_nowait(Delivery(queue, message, time.monotonic()))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.settings.writers):
                tg.create_task(self._writer(), name=f"ingest-writer-{i}")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every delivery taken so far is committed and acked (or timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._queue.qsize() or self._busy:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def request_stop(self) -> None:
        """Lets a writer blocked on a database outage give up (deliveries stay unacked)."""
        self._stop.set()

    async def _writer(self) -> None:
        while True:
            batch = await self._take()
            self._busy += 1
            try:
                await self._process(batch)
            finally:
                self._busy -= 1
                self.metrics.in_client.dec(len(batch))
                if not self._busy and not self._queue.qsize():
                    self._idle.set()

    async def _take(self) -> list[Delivery]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.settings.linger_ms / 1000
        while len(batch) < self.settings.batch_max:
            if self._queue.qsize():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _process(self, batch: list[Delivery]) -> None:
        # A delivery whose channel is gone will be redelivered by the broker: writing it
        # now would only make a duplicate.
        live = [d for d in batch if not d.message.channel.is_closed]
        if not live:
            return
        now = datetime.now(UTC)
        accepted: list[Accepted] = []
        failed: list[Failed] = []
        for delivery in live:
            outcome = classify(delivery.queue, delivery.message, now)
            if isinstance(outcome, Accepted):
                accepted.append(outcome)
            else:
                failed.append(outcome)
        started = time.monotonic()
        try:
            result = await self.db.retrying(
                lambda conn: self._write(conn, accepted, failed), self._stop
            )
        except DependencyUnavailable:
            return  # stopping while the database is down: leave unacked, the broker keeps them
        done = time.monotonic()
        self.metrics.batch_seconds.observe(done - started)
        self.metrics.batch_size.observe(len(live))
        for delivery in live:
            self.metrics.ingest_latency.observe(done - delivery.received)
            try:
                await delivery.message.ack()
            except Exception as exc:
                self.metrics.ack_lost.inc()
                log.debug("ack lost for delivery %s: %s", delivery.message.delivery_tag, exc)
            else:
                self.metrics.acked.inc()
        self._count(accepted, failed, result)
        for callback in self.on_stored:
            callback(accepted)

    async def _write(
        self, conn: Conn, accepted: list[Accepted], failed: list[Failed]
    ) -> store.BatchResult:
        try:
            return await store.write_batch(conn, accepted, failed)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, TRANSIENT):  # e.g. a shutdown: the database, not the data
                raise
            # data the database refuses: find the culprits one by one, keep the rest
            log.warning(
                "batch of %d refused (%s); isolating the bad messages",
                len(accepted) + len(failed),
                exc,
            )
            return await self._write_singly(conn, accepted, failed)

    async def _write_singly(
        self, conn: Conn, accepted: list[Accepted], failed: list[Failed]
    ) -> store.BatchResult:
        inserted = duplicates = 0
        for row in list(accepted):
            try:
                one = await store.write_batch(conn, [row], [])
            except asyncpg.PostgresError as exc:
                if isinstance(exc, TRANSIENT):
                    raise
                accepted.remove(row)
                failed.append(_refused(row, exc))
            else:
                inserted += one.inserted
                duplicates += one.duplicates
        await store.write_batch(conn, [], failed)
        return store.BatchResult(inserted, duplicates, len(failed))

    def _count(
        self, accepted: list[Accepted], failed: list[Failed], result: store.BatchResult
    ) -> None:
        for row in accepted:
            self.metrics.stored.labels(row.message.kind).inc()
        if result.duplicates:
            self.metrics.duplicates.inc(result.duplicates)
        for bad in failed:
            self.metrics.failed.labels(bad.reason).inc()
            log.warning(
                "message on %s recorded as failed: %s (%s)", bad.routing_key, bad.reason, bad.detail
            )


def classify(queue: str, message: AbstractIncomingMessage, now: datetime) -> Accepted | Failed:
    """A delivery becomes a row to store, or a failed-message record with its reason."""
    routing_key = message.routing_key or ""
    if queue == topology.FAILED_QUEUE:
        return _dead_letter(message)
    try:
        return Accepted(decode(routing_key, message.body), now)
    except BadMessage as exc:
        return Failed(queue, routing_key, _headers(message), message.body, exc.reason, exc.detail)


def _dead_letter(message: AbstractIncomingMessage) -> Failed:
    headers = _headers(message)
    deaths = headers.get("x-death")
    reason, source, routing_key = "dead_letter", "dlx", message.routing_key or ""
    # an alternate-exchange delivery keeps its original exchange (amq.topic) and has no x-death
    if not deaths and message.exchange in (topology.DEVICE_EXCHANGE, topology.UNROUTED_EXCHANGE):
        return Failed(
            "amq.topic",
            routing_key,
            headers,
            message.body,
            "unroutable",
            "no queue is bound for this topic (is the node id valid?)",
        )
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        first = deaths[0]
        reason = f"dead_letter_{first.get('reason', 'unknown')}"
        source = str(first.get("queue", source))
        keys = first.get("routing-keys")
        if isinstance(keys, list) and keys:
            routing_key = str(keys[0])
    return Failed(
        source, routing_key, headers, message.body, reason, f"dead-lettered from {source}"
    )


def _refused(row: Accepted, exc: BaseException) -> Failed:
    m = row.message
    return Failed(
        topology.SENSOR_QUEUE,
        f"devices.{m.node_id}.{m.channel}",
        {},
        orjson.dumps(m.data),
        "store_refused",
        str(exc)[:500],
    )


def _headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    return dict(message.headers or {})
