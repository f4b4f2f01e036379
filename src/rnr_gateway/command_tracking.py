"""What happens to a command after it is handed to MQTT: the broker's PUBACK, the node's
acks (``device_acks``), ack timeouts, the retained copy on ``devices/{id}/commands/last``
and, for legacy nodes that never ack, inference from their status events.

Acks are processed in arrival order by one task and acked to the broker only after
their transition is committed. An ack that moves nothing (unknown id, another node's
command, already past that state) is kept in ``command_acks_unmatched``; an ack that
cannot be read is recorded in ``failed_messages``. Neither stops anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import orjson
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter, Gauge

from . import outbox, store, topology
from .command_codec import (
    TERMINAL,
    Ack,
    Options,
    Status,
    decode_ack,
    encode,
    inferred_outcomes,
    new_message_id,
    validate,
)
from .dispatch import Pending
from .errors import BadMessage, GatewayError
from .metrics import Metrics
from .mqtt import PublishUnconfirmed
from .outbox import CommandRecord, Moved, NewCommand, utcnow
from .store import Accepted, Failed
from .topics import valid_node_id

if TYPE_CHECKING:
    from .commands import Commands
    from .db import Conn

log = logging.getLogger(__name__)
T = TypeVar("T")
ALLOWED_FROM: dict[Status, tuple[Status, ...]] = {
    "received": ("queued", "sent"),
    "executed": ("queued", "sent", "received"),
    "failed": ("queued", "sent", "received"),
    "rejected": ("queued", "sent", "received"),
    "expired": ("queued", "sent", "received"),
}


@dataclass(frozen=True, slots=True)
class Inferred:
    node_id: str
    message_id: str
    outcome: Status
    event: str


def last_topic(node_id: str) -> str:
    return f"devices/{node_id}/commands/last"


class Tracker:
    def __init__(self, commands: Commands, metrics: Metrics) -> None:
        self.c = commands
        self.settings = commands.settings
        self._queue: asyncio.Queue[AbstractIncomingMessage | Inferred] = asyncio.Queue()
        self._received: set[str] = set()  # in flight and acked 'received'
        self._silent: set[str] = set()  # nodes whose last command got no ack at all
        self._awaiting: dict[str, dict[str, tuple[dict[str, Status], float]]] = {}
        self._retained: dict[str, str] = {}  # node → command on commands/last
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

    def count(self, moved: Moved) -> None:
        self.transitions.labels(moved.status).inc()

    # -- input (called from consumers / ingest; never blocks) -----------------------------
    def submit(self, message: AbstractIncomingMessage) -> None:
        self._queue.put_nowait(message)

    def on_stored(self, rows: Sequence[Accepted]) -> None:
        for row in rows:
            m = row.message
            waiting = self._awaiting.get(m.node_id)
            if m.kind != "event" or not waiting or m.status is None:
                continue
            for mid, (outcomes, _) in waiting.items():  # oldest command first
                outcome = outcomes.get(m.status)
                if outcome is not None:
                    del waiting[mid]
                    self._queue.put_nowait(Inferred(m.node_id, mid, outcome, m.status))
                    break

    # -- the ack task --------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, Inferred):
                    await self._infer(item)
                else:
                    await self._ack(item)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        await self._queue.join()

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            ack = decode_ack(message.routing_key or "", message.body)
        except BadMessage as exc:
            await self._record_failed(topology.ACK_QUEUE, message, exc)
        else:
            moved = await self._retrying(lambda conn: self._apply(conn, ack))
            if moved is not None:
                await self._after(moved)
        with contextlib.suppress(Exception):  # channel gone: redelivered, then unmatched
            await message.ack()

    async def _apply(self, conn: Conn, ack: Ack) -> Moved | None:
        target: Status = "executed" if ack.status == "duplicate" else ack.status
        reason = ack.detail or (
            "node had already executed it (duplicate)"
            if ack.status == "duplicate"
            else f"node acked {ack.status}"
        )
        async with conn.transaction():
            moved = await outbox.move(
                conn,
                ack.message_id,
                target,
                reason,
                utcnow(),
                allowed_from=ALLOWED_FROM[target],
                delivered=True,
                reopen_expired=target != "expired",
                node_id=ack.node_id,
            )
            if moved is None:
                row = await conn.fetchrow(
                    "SELECT node_id, status FROM commands WHERE message_id = $1", ack.message_id
                )
                why = (
                    "unknown_command"
                    if row is None
                    else "wrong_node"
                    if row["node_id"] != ack.node_id
                    else f"already_{row['status']}"
                )
                await outbox.record_unmatched(conn, ack, why)
                self.unmatched.labels(why).inc()
                log.info(
                    "ack %s for %s from %s recorded as unmatched (%s)",
                    ack.status,
                    ack.message_id,
                    ack.node_id,
                    why,
                )
        return moved

    async def _infer(self, item: Inferred) -> None:
        moved = await self._retrying(
            lambda conn: outbox.move(
                conn,
                item.message_id,
                item.outcome,
                "inferred",
                utcnow(),
                allowed_from=("sent",),
                node_id=item.node_id,
            )
        )
        if moved is not None:
            log.info("command %s %s, inferred from %r", item.message_id, item.outcome, item.event)
            await self._after(moved)

    async def _after(self, moved: Moved) -> None:
        """Effects of a committed ack: event, node's slot, retained copy, inference."""
        self.c.emit(moved)
        node, mid = moved.node_id, moved.message_id
        self._silent.discard(node)
        self._awaiting.get(node, {}).pop(mid, None)
        if moved.retain:
            await self._clear_retained(node, mid)
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

    # -- the send side -------------------------------------------------------------------
    async def on_published(self, cmd: Pending) -> None:
        """The broker PUBACKed the command: it is sent; now wait for the node (bounded)."""
        moved = await self._retrying(
            lambda conn: outbox.move(
                conn,
                cmd.message_id,
                "sent",
                "broker PUBACK",
                utcnow(),
                allowed_from=("queued",),
                delivered=True,
            )
        )
        if moved is None:
            return  # an ack overtook the PUBACK: the command is past 'sent' already
        self.c.emit(moved)
        outcomes = inferred_outcomes(orjson.loads(cmd.payload))
        if outcomes:
            until = time.monotonic() + self.settings.infer_window_s
            self._awaiting.setdefault(cmd.node_id, {})[cmd.message_id] = (outcomes, until)
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

    # -- retained copies -----------------------------------------------------------------
    async def load_retained(self) -> None:
        self._retained = await self._retrying(outbox.retained_now)

    async def publish_retained(self, cmd: Pending) -> None:
        """Before the command itself, so a clear after its ack can never come first."""
        await self.c.mqtt.publish(
            last_topic(cmd.node_id), cmd.payload, qos=1, retain=True, kind="retained"
        )
        previous = self._retained.get(cmd.node_id)
        self._retained[cmd.node_id] = cmd.message_id
        if previous != cmd.message_id:
            await self._retrying(
                lambda conn: outbox.replaced_retained(conn, cmd.node_id, cmd.message_id, utcnow())
            )

    async def _clear_retained(self, node: str, mid: str) -> None:
        if self._retained.get(node) == mid:
            try:
                await self.c.mqtt.publish(
                    last_topic(node), b"", qos=1, retain=True, kind="retained"
                )
            except PublishUnconfirmed as exc:
                log.info("retained copy of %s not cleared yet (%s); the sweep retries", mid, exc)
                return
            del self._retained[node]
        await self._retrying(lambda conn: outbox.mark_retain_cleared(conn, [mid], utcnow()))

    async def clear_settled_retained(self, at: datetime) -> None:
        for node, mid in await self._retrying(lambda conn: outbox.retained_settled(conn, at)):
            await self._clear_retained(node, mid)

    # -- commands from other producers on device_commands_enhanced -----------------------
    async def adopt_external(self, message: AbstractIncomingMessage) -> Pending | None:
        """A command not routed by this process: into the outbox (once), then dispatch."""
        try:
            new = self._external(message)
        except (BadMessage, GatewayError) as exc:
            await self._record_failed(topology.COMMAND_QUEUE, message, exc)
            return None

        async def store_and_read(conn: Conn) -> tuple[bool, CommandRecord | None]:
            fresh = bool(await outbox.insert(conn, [new], "accepted from the command queue"))
            return fresh, await outbox.fetch(conn, new.message_id)

        fresh, row = await self._retrying(store_and_read)
        if fresh:
            self.c.emit(
                Moved(new.message_id, new.node_id, "queued", "accepted", new.created_at, False, 0)
            )
        if row is None or row.status != "queued":
            return None
        payload = encode(row.params, row.message_id, row.created_at, row.expires_at, row.priority)
        return Pending(
            row.message_id,
            row.node_id,
            row.priority,
            row.expires_at.timestamp(),
            payload,
            row.retain,
        )

    def _external(self, message: AbstractIncomingMessage) -> NewCommand:
        prefix, _, node_id = (message.routing_key or "").partition(".")
        if prefix != "commands" or not valid_node_id(node_id):
            raise BadMessage(
                "bad_routing_key", f"{message.routing_key!r:.120} is not commands.<id>"
            )
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError as exc:
            raise BadMessage("bad_json", f"command is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadMessage("wrong_type", "a command must be a JSON object")
        action = validate(body)
        mid = message.message_id or body.get("message_id") or new_message_id()
        created = utcnow()
        expires = body.get("expires_at")
        ttl = (
            float(expires) - created.timestamp()
            if isinstance(expires, int | float) and not isinstance(expires, bool)
            else self.settings.default_ttl_s
        )
        priority = message.priority if message.priority is not None else 5
        retain = bool((message.headers or {}).get("retain", False))
        options = Options(min(max(priority, 0), 10), max(ttl, 0.001), retain)
        expires_at = created + timedelta(seconds=options.ttl_s)
        return NewCommand(mid, node_id, action, body, options, created, expires_at, source="amqp")

    async def _record_failed(
        self, queue: str, message: AbstractIncomingMessage, exc: GatewayError
    ) -> None:
        reason = exc.reason if isinstance(exc, BadMessage) else getattr(exc, "code", "invalid")
        failed = Failed(
            queue,
            message.routing_key or "",
            dict(message.headers or {}),
            message.body,
            reason,
            str(exc)[:1000],
        )
        await self._retrying(lambda conn: store.write_batch(conn, [], [failed]))
        log.warning("message on %s recorded as failed: %s", message.routing_key, exc)

    async def _retrying(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return await self.c.retrying(work)
