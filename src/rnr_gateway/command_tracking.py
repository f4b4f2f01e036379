"""What happens to a command after it is handed to MQTT: the broker's PUBACK, the node's
acks (``device_acks``), ack timeouts, the retained copy on ``devices/{id}/commands/last``
and, for legacy nodes that never ack, inference from their status events.

A node's PUBACKs, acks and inferences go to one of ``ACK_WORKERS`` workers (chosen by
node, so their order is kept), which applies whatever has arrived set-based and acks the
deliveries to the broker only after the transitions are committed. An ack that moves
nothing (unknown id, another node's command, already past that state) is kept in
``command_acks_unmatched``; an ack that cannot be read is recorded in
``failed_messages``. Neither stops anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import orjson
from prometheus_client import Counter, Gauge

from . import outbox, topology
from .amqp_inbound import Inbound
from .command_codec import (
    TERMINAL,
    Ack,
    CommandRecord,
    Moved,
    Status,
    decode_ack,
    inferred_outcomes,
)
from .command_intake import failed_record
from .command_retained import Retained
from .command_steps import Inferred, Todo, apply, rounds, todo
from .dispatch import Pending
from .errors import BadMessage
from .metrics import Metrics
from .store import Accepted, Failed

if TYPE_CHECKING:
    from .commands import Commands
    from .db import Conn

log = logging.getLogger(__name__)
T = TypeVar("T")
ACK_WORKERS = 4  # a node's acks always go to the same worker: their order is kept
BATCH_MAX = 200
# how far back the outbox is read at start to tell which nodes never ack
UNACKING_MEMORY = timedelta(days=7)
Item = Inbound | Inferred | Pending  # Pending: a command the broker PUBACKed


class Tracker:
    def __init__(self, commands: Commands, metrics: Metrics) -> None:
        self.c = commands
        self.settings = commands.settings
        self._queues: list[asyncio.Queue[Item]] = [asyncio.Queue() for _ in range(ACK_WORKERS)]
        self._received: set[str] = set()  # in flight and acked 'received'
        self._silent: set[str] = set()  # nodes whose last command got no ack at all
        self._awaiting: dict[str, dict[str, tuple[dict[str, Status], float]]] = {}
        self.retained = Retained(commands)  # the copies on devices/{id}/commands/last
        # sensor_data ids: the newest row at the last sweep, and per awaiting node the
        # last of its events looked at (``infer_from_stored``)
        self._latest_event: int | None = None
        self._events_after: dict[str, int] = {}
        r = metrics.registry
        self.transitions = Counter(
            "rnr_command_transitions", "Command transitions by new status", ["status"], registry=r
        )
        self.unmatched = Counter(
            "rnr_command_acks_unmatched", "Acks that moved no command", ["reason"], registry=r
        )
        self.ack_timeouts = Counter(
            "rnr_command_ack_timeouts", "In-flight commands given up waiting for", registry=r
        )
        Gauge("rnr_commands_queued", "Commands waiting to be sent", registry=r).set_function(
            lambda: commands.scheduler.queued
        )
        Gauge("rnr_commands_in_flight", "Commands holding a node's slot", registry=r).set_function(
            lambda: commands.scheduler.in_flight
        )
        Gauge(
            "rnr_commands_dispatching",
            "1 while this gateway holds the command and ack queues and sends commands",
            registry=r,
        ).set_function(lambda: float(commands.active.is_set()))

    def count(self, moved: Moved) -> None:
        self.transitions.labels(moved.status).inc()

    # -- input (called from consumers / ingest; never blocks) -----------------------------
    def submit(self, message: Inbound) -> None:
        self._queue_of(message.routing_key or "").put_nowait(message)

    def _queue_of(self, routing_key: str) -> asyncio.Queue[Item]:
        return self._queues[zlib.crc32(routing_key.encode()) % len(self._queues)]

    def on_stored(self, rows: Sequence[Accepted]) -> None:
        if self.c.amqp.shared(topology.SENSOR_QUEUE):
            return  # this process sees only part of the events: ``infer_from_stored``
        for row in rows:
            m = row.message
            if m.kind == "event" and m.status is not None:
                self._infer(m.node_id, m.status)

    async def infer_from_stored(self, shared: bool) -> None:
        """With other gateways ingesting too (``shared``), a legacy node's status event may
        have been stored by any of them: the events stored since the last look, from the
        database. Each node's events are read from the newest row as of the sweep before
        its wait began (a legacy node answers within milliseconds of the command). Alone,
        ``on_stored`` sees every event and nothing is read."""
        if not shared:
            self._latest_event, self._events_after = None, {}
            return
        before, self._latest_event = (
            self._latest_event,
            await self._retrying(outbox.last_event_id),
        )
        nodes = [node for node, waiting in self._awaiting.items() if waiting]
        start = self._latest_event if before is None else before
        marks = {n: self._events_after.get(n, start) for n in nodes}
        self._events_after = marks
        if not nodes:
            return
        rows = await self._retrying(lambda c: outbox.events_after(c, nodes, min(marks.values())))
        for node_id, status, event_id in rows:
            if event_id > marks[node_id]:
                marks[node_id] = event_id
                self._infer(node_id, status)

    def _infer(self, node_id: str, status: str) -> None:
        """A legacy status event: the oldest command awaiting it gets its outcome."""
        waiting = self._awaiting.get(node_id)
        if not waiting:
            return
        for mid, (outcomes, _) in waiting.items():  # oldest command first
            outcome = outcomes.get(status)
            if outcome is not None:
                del waiting[mid]
                queue = self._queue_of(f"devices.{node_id}.ack")
                queue.put_nowait(Inferred(node_id, mid, outcome, status))
                return

    def published(self, cmd: Pending) -> None:
        """The broker PUBACKed the command: 'sent' is recorded in order with its acks. It
        awaits a legacy node's status event from now on, not once 'sent' is committed: the
        node answers within milliseconds, and an event stored before that commit would be
        missed (and taken for the next command's)."""
        outcomes = inferred_outcomes(orjson.loads(cmd.payload))
        if outcomes:
            until = time.monotonic() + self.settings.infer_window_s
            self._awaiting.setdefault(cmd.node_id, {})[cmd.message_id] = (outcomes, until)
        self._queue_of(f"devices.{cmd.node_id}.ack").put_nowait(cmd)

    # -- the workers ---------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i, queue in enumerate(self._queues):
                tg.create_task(self._work(queue), name=f"commands-acks-{i}")

    async def _work(self, queue: asyncio.Queue[Item]) -> None:
        """Take whatever has arrived (up to BATCH_MAX) and apply it in one transaction."""
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH_MAX and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._process(batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def drain(self) -> None:
        for queue in self._queues:
            await queue.join()

    async def _process(self, batch: list[Item]) -> None:
        todos: list[Todo] = []
        failed: list[Failed] = []
        messages: list[Inbound] = []
        for item in batch:
            if isinstance(item, Pending | Inferred):
                todos.append(todo(item))
                continue
            messages.append(item)
            try:
                todos.append(todo(decode_ack(item.routing_key or "", item.body)))
            except BadMessage as exc:
                failed.append(failed_record(topology.ACK_QUEUE, item, exc))
        split = rounds(todos)
        moved, unmatched = await self._retrying(lambda conn: apply(conn, split, failed))
        # committed: told at once, before anything else awaits, so whoever reads the row
        # has been sent its event too
        for m, source in moved:
            if isinstance(source, Pending):
                self._after_sent(m, source)
            else:
                self.c.emit(m)
        # only now that the transitions are committed; a lost channel redelivers (unmatched)
        await asyncio.gather(*(message.ack() for message in messages), return_exceptions=True)
        for record in failed:
            log.warning("ack on %s recorded as failed: %s", record.routing_key, record.detail)
        for ack, why in unmatched:
            self.unmatched.labels(why).inc()
            log.info(
                "ack %s for %s from %s is unmatched (%s)",
                ack.status,
                ack.message_id,
                ack.node_id,
                why,
            )
        for m, source in moved:
            if isinstance(source, Pending) or m.status == "sent":  # or implied by an ack
                continue
            if isinstance(source, Inferred):
                log.info("command %s %s, inferred from %r", m.message_id, m.status, source.event)
            else:
                self._silent.discard(m.node_id)  # it acks after all
            await self._after(m)
        self._release_unsent(batch, moved)

    def _release_unsent(
        self, batch: list[Item], moved: list[tuple[Moved, Ack | Inferred | Pending]]
    ) -> None:
        """A PUBACK that recorded nothing, with no ack having taken the command on either:
        it expired or was cancelled while its publish was under way. The node refuses it
        (``expires_at``); its slot is free (nothing else would ever free it)."""
        done = {m.message_id for m, source in moved if isinstance(source, Pending)}
        for item in batch:
            if not isinstance(item, Pending) or item.message_id in done:
                continue
            if self.c.scheduler.publishing(item.node_id, item.message_id):
                log.info(
                    "command %s to %s was confirmed by the broker after it was settled "
                    "(expired or cancelled meanwhile)",
                    item.message_id,
                    item.node_id,
                )
                self._settle(item.node_id, item.message_id)

    async def _after(self, moved: Moved) -> None:
        """Effects of a committed ack or inference (its event is out): the retained copy,
        then the node's slot."""
        node, mid = moved.node_id, moved.message_id
        self._awaiting.get(node, {}).pop(mid, None)
        if moved.retain:
            await self.retained.clear(node, mid)
        if moved.status == "received":
            self._received.add(mid)
            self.c.scheduler.set_deadline(
                node, mid, time.monotonic() + self.settings.exec_timeout_s
            )
        elif moved.status in TERMINAL:
            self._settle(node, mid)

    def _settle(self, node: str, mid: str) -> None:
        self._received.discard(mid)
        if self.c.scheduler.settle(node, mid):
            self.c.wake()

    def _after_sent(self, moved: Moved, cmd: Pending) -> None:
        """Sent: now wait for the node (bounded), or not at all for a node without acks."""
        self.c.emit(moved)
        if cmd.node_id in self._silent:
            self._settle(cmd.node_id, cmd.message_id)  # acks unlikely: do not hold the node
        elif cmd.message_id not in self._received:
            deadline = time.monotonic() + self.settings.ack_timeout_s
            self.c.scheduler.set_deadline(cmd.node_id, cmd.message_id, deadline)

    def check_timeouts(self, now: float) -> None:
        for node, mid in self.c.scheduler.overdue(now):
            if mid in self._received:
                self._received.discard(mid)
                log.info("command %s: no result from %s within the execution timeout", mid, node)
            else:
                self.ack_timeouts.inc()
                if node not in self._silent:
                    log.info(
                        "command %s: no ack from %s within %.1f s; its next commands go without"
                        " waiting until it acks one",
                        mid,
                        node,
                        self.settings.ack_timeout_s,
                    )
                self._silent.add(node)
            self.c.wake()
        for node, waiting in list(self._awaiting.items()):
            for mid in [m for m, (_, until) in waiting.items() if until <= now]:
                del waiting[mid]
            if not waiting:
                del self._awaiting[node]

    def forget(self) -> None:
        """Drop what is kept about commands in flight (another process tracks them now)."""
        self._received.clear()
        self._awaiting.clear()
        self._latest_event = None
        self._events_after = {}

    def restore(self, record: CommandRecord, at: datetime) -> int:
        """After a restart: a command sent or received recently holds its node's slot."""
        if record.status == "received" and record.received_at is not None:
            left = self.settings.exec_timeout_s - (at - record.received_at).total_seconds()
            self._received.add(record.message_id)
        else:
            since = record.sent_at or record.updated_at
            left = self.settings.ack_timeout_s - (at - since).total_seconds()
        if left <= 0:
            return 0
        self.c.scheduler.hold(record.node_id, record.message_id, time.monotonic() + left)
        return 1

    async def load_unacking(self, at: datetime) -> None:
        """After a restart: nodes known not to ack keep not being waited for."""
        sent_before = at - timedelta(seconds=self.settings.ack_timeout_s)
        nodes = await self._retrying(
            lambda conn: outbox.unacking_nodes(conn, sent_before, at - UNACKING_MEMORY)
        )
        self._silent.update(nodes)

    async def _retrying(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return await self.c.retrying(work)
