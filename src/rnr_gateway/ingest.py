"""Deliveries → batch → store → ack.

Writers pull greedily: a writer takes whatever has arrived (up to ``batch_max``, lingering
at most ``linger_ms`` for more), commits it in one transaction and only then acks. At a
low rate every message is written at once; under load batches grow by themselves.
The ack/skip decision for every delivery is made here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from . import store, topology
from .ack_window import AckWindow, channel_of
from .amqp_inbound import Inbound
from .codec import decode
from .db import Database, refused
from .errors import BadMessage, DependencyUnavailable
from .metrics import Metrics
from .settings import IngestSettings
from .store import Accepted, Failed

if TYPE_CHECKING:
    from .db import Conn

log = logging.getLogger(__name__)
REFUSABLE = (asyncpg.PostgresError, ValueError)  # see db.refused
OnStored = Callable[[Sequence[Accepted]], None]


@dataclass(frozen=True, slots=True)
class Delivery:
    queue: str
    message: Inbound
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
        # deliveries not yet taken by a writer; `_arrived` is set while there are any,
        # `_full` while a whole batch waits (it ends a writer's linger early)
        self._pending: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._acks = AckWindow()
        # batches are taken one writer at a time, so each is a contiguous run of
        # deliveries; they commit concurrently but are acked and announced in order
        self._take_lock = asyncio.Lock()
        self._previous: asyncio.Future[None] | None = None
        self._consumed: dict[str, Any] = {}  # queue → its counter child (labels() per
        # message costs more than the rest of submit)

    # called by the AMQP consumer for each delivery; must not block
    def submit(self, queue: str, message: Inbound) -> None:
        consumed = self._consumed.get(queue)
        if consumed is None:
            consumed = self._consumed[queue] = self.metrics.consumed.labels(queue)
        consumed.inc()
        self.metrics.in_client.inc()
        self._idle.clear()
        self._acks.track(message)
        pending = self._pending
        pending.append(Delivery(queue, message, time.monotonic()))
        self._arrived.set()
        if len(pending) >= self.settings.batch_max:
            self._full.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.settings.writers):
                tg.create_task(self._writer(), name=f"ingest-writer-{i}")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every delivery taken so far is committed and acked (or timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._pending or self._busy:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def request_stop(self) -> None:
        """Lets a writer blocked on a database outage give up (deliveries stay unacked)."""
        self._stop.set()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._take_lock:
                batch = await self._take()
                previous, turn = self._previous, loop.create_future()
                self._previous = turn
            self._busy += 1
            try:
                await self._process(batch, previous)
            finally:
                turn.set_result(None)
                self._busy -= 1
                self.metrics.in_client.dec(len(batch))
                if not self._busy and not self._pending:
                    self._idle.set()

    async def _take(self) -> list[Delivery]:
        pending, most = self._pending, self.settings.batch_max
        while not pending:
            self._arrived.clear()
            await self._arrived.wait()
        if len(pending) < most and self.settings.linger_ms > 0:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.linger_ms / 1000):
                    await self._full.wait()
        batch = [pending.popleft() for _ in range(min(len(pending), most))]
        if len(pending) < most:
            self._full.clear()
        return batch

    async def _process(
        self, batch: list[Delivery], previous: asyncio.Future[None] | None = None
    ) -> None:
        # A delivery whose channel is gone will be redelivered by the broker: writing it
        # now would only make a duplicate.
        live = [d for d in batch if channel_of(d.message) is not None]
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
            # stopping while the database is down: leave unacked, the broker keeps them
            self._acks.skip([d.message for d in live])
            return
        done = time.monotonic()
        self.metrics.batch_seconds.observe(done - started)
        self.metrics.batch_size.observe(len(live))
        observe = self.metrics.ingest_latency.observe
        for delivery in live:
            observe(done - delivery.received)
        if previous is not None:
            await previous  # the batch taken before this one is acked and announced first
        acked, lost = await self._acks.ack([d.message for d in live])
        self.metrics.acked.inc(acked)
        self.metrics.ack_lost.inc(lost)
        self._count(accepted, failed, result)
        for callback in self.on_stored:
            callback(result.stored)  # a duplicate is news to nobody

    async def _write(
        self, conn: Conn, accepted: list[Accepted], failed: list[Failed]
    ) -> store.BatchResult:
        try:
            return await store.write_batch(conn, accepted, failed)
        except REFUSABLE as exc:
            if not refused(exc):  # e.g. a shutdown: the database, not the data
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
        stored: list[Accepted] = []
        for row in list(accepted):
            try:
                one = await store.write_batch(conn, [row], [])
            except REFUSABLE as exc:
                if not refused(exc):
                    raise
                accepted.remove(row)
                failed.append(_refused(row, exc))
            else:
                inserted += one.inserted
                duplicates += one.duplicates
                stored.extend(one.stored)
        await _record_failed(conn, failed)
        return store.BatchResult(inserted, duplicates, len(failed), stored)

    def _count(
        self, accepted: list[Accepted], failed: list[Failed], result: store.BatchResult
    ) -> None:
        # new rows only: a duplicate is counted as one, not as stored
        for kind, n in Counter(row.message.kind for row in result.stored).items():
            self.metrics.stored.labels(kind).inc(n)
        if result.duplicates:
            self.metrics.duplicates.inc(result.duplicates)
        if not failed:
            return
        reasons = Counter(bad.reason for bad in failed)
        for reason, n in reasons.items():
            self.metrics.failed.labels(reason).inc(n)
        first = failed[0]
        if len(failed) == 1:
            log.warning(
                "message on %s recorded as failed: %s (%s)",
                first.routing_key,
                first.reason,
                first.detail,
            )
        else:  # one line per batch, not one per message: a flood stays readable
            log.warning(
                "%d messages recorded as failed (%s); the first on %s: %s",
                len(failed),
                ", ".join(f"{reason} x{n}" for reason, n in reasons.most_common()),
                first.routing_key,
                first.detail,
            )


def classify(queue: str, message: Inbound, now: datetime) -> Accepted | Failed:
    """A delivery becomes a row to store, or a failed-message record with its reason."""
    routing_key = message.routing_key or ""
    if queue == topology.FAILED_QUEUE:
        return _dead_letter(message)
    try:
        return Accepted(decode(routing_key, message.body), now, bool(message.redelivered))
    except BadMessage as exc:
        return Failed(queue, routing_key, _headers(message), message.body, exc.reason, exc.detail)


def _dead_letter(message: Inbound) -> Failed:
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


async def _record_failed(conn: Conn, failed: list[Failed]) -> None:
    """The failed records; one the database refuses even alone is kept as its body, with
    the reason ``unrecordable`` (the body is bytes: always storable)."""
    try:
        await store.write_batch(conn, [], failed)
        return
    except REFUSABLE as exc:
        if not refused(exc):
            raise
    for bad in failed:
        try:
            await store.write_batch(conn, [], [bad])
        except REFUSABLE as exc:
            if not refused(exc):
                raise
            log.error("failed message on %r unrecordable as is: %s", bad.routing_key, exc)
            bare = Failed(bad.source, "", {}, bad.body, "unrecordable", str(exc)[:200])
            await store.write_batch(conn, [], [bare])


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


def _headers(message: Inbound) -> dict[str, Any]:
    return dict(message.headers or {})
