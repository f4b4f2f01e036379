"""Commands: API → outbox → ``device_commands_enhanced`` → dispatcher → MQTT → node → acks.

The outbox (PostgreSQL ``commands``) is the record of truth; the broker queue is the
intake: every command, ours or another producer's, passes through it with its priority
and TTL, and a delivery is acked once its command is in the outbox and offered to the
in-memory per-node scheduler (``dispatch.Scheduler``), from which the dispatcher
(``command_dispatch``) publishes. See docs/commands.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import outbox, topology
from .amqp import Amqp
from .amqp_exclusive import Consumer
from .command_codec import (
    CommandRecord,
    Moved,
    NewCommand,
    Options,
    new_message_id,
    pending_of,
    utcnow,
    validate,
    validate_options,
)
from .command_dispatch import Dispatcher
from .command_intake import Intake
from .command_sweep import Sweeper
from .command_tracking import Tracker
from .db import TRANSIENT, Database
from .dispatch import Pending, Scheduler
from .errors import (
    CommandConflict,
    CommandNotFound,
    DependencyUnavailable,
    InvalidCommand,
    NodeNotFound,
)
from .metrics import Metrics
from .mqtt import Mqtt
from .outbox import Step
from .settings import Settings
from .topics import valid_node_id

if TYPE_CHECKING:
    from .db import Conn

log = logging.getLogger(__name__)
T = TypeVar("T")
# receives {"type": "command_status", message_id, node_id, status, reason, timestamp}
OnStatus = Callable[[dict[str, Any]], None]


class PresenceChange(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def status(self) -> str: ...


class PresenceView(Protocol):
    """What commands need from presence (``presence.Presence`` provides it)."""

    def is_online(self, node_id: str) -> bool: ...

    def add_listener(self, callback: Callable[[PresenceChange], None]) -> None: ...

    async def catch_up(self, node_ids: list[str]) -> None: ...


class Commands:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        amqp: Amqp,
        mqtt: Mqtt,
        metrics: Metrics,
        presence: PresenceView,
        on_status: OnStatus | None = None,
    ) -> None:
        self.settings = settings.commands
        self.retry_delay_s = settings.mqtt.retry_delay_s
        self.db, self.amqp, self.mqtt, self.presence = db, amqp, mqtt, presence
        self.listeners: list[OnStatus] = [on_status] if on_status else []
        self.scheduler = Scheduler(self.settings.max_in_flight)
        self.dispatcher = Dispatcher(self)
        self.tracker = Tracker(self, metrics)
        self.intake = Intake(self)
        self.sweeper = Sweeper(self)
        self._stop = asyncio.Event()
        # set while this gateway holds the command and ack queues (the broker's exclusive
        # consumers): only then does it dispatch; another gateway on the vhost stands by
        self.active = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()
        amqp.on_exclusive.append(self._on_exclusive)
        presence.add_listener(self._on_presence)

    # -- API -----------------------------------------------------------------------------
    async def submit(
        self,
        node_id: str,
        body: Mapping[str, Any],
        *,
        priority: int = 5,
        ttl_s: float | None = None,
        retain: bool = False,
    ) -> CommandRecord:
        """Queue one command; returns its record (status ``queued``).

        A ``message_id`` in the body makes the call idempotent: the same id again returns
        the existing command. Raises NodeNotFound, InvalidCommand, CommandTooLarge,
        CommandConflict (id reused for another command) or DependencyUnavailable.
        """
        options = self._options(priority, ttl_s, retain)
        validate(body)
        if not valid_node_id(node_id):
            raise NodeNotFound([node_id[:80]])
        new = NewCommand.create(node_id, body, options, message_id=body.get("message_id"))
        payload = new.encode(self.settings.max_bytes)

        async def store(conn: Conn) -> CommandRecord | None:
            if new.message_id in await outbox.insert(
                conn, [new], "accepted", known_nodes_only=True
            ):
                return None
            existing = await outbox.fetch(conn, new.message_id)
            if existing is None:  # not inserted and not there: the node is unknown
                raise NodeNotFound([node_id])
            return existing

        existing = await self._query(store)
        if existing is not None:
            if existing.node_id == node_id and existing.params == dict(body):
                return existing
            raise CommandConflict(
                new.message_id, existing.status, "this message_id is taken by another command"
            )
        self.emit(Moved(new.message_id, node_id, "queued", "accepted", new.created_at, retain, 0))
        await self.intake.route([new.pending(payload)])
        return new.record()

    async def broadcast(
        self,
        node_ids: Sequence[str] | None,
        body: Mapping[str, Any],
        *,
        priority: int = 5,
        ttl_s: float | None = None,
        retain: bool = False,
    ) -> tuple[str, list[CommandRecord]]:
        """One command per node (every known node when ``node_ids`` is None), one group id."""
        options = self._options(priority, ttl_s, retain)
        validate(body)
        if "message_id" in body:
            raise InvalidCommand("message_id", "a broadcast makes one command (and id) per node")
        wanted = None if node_ids is None else sorted(set(node_ids))
        bad = [n[:80] for n in wanted or () if not valid_node_id(n)]
        if bad:
            raise NodeNotFound(bad)
        targets = await self._query(lambda conn: outbox.existing_nodes(conn, wanted))
        missing = sorted(set(wanted or ()) - set(targets))
        if missing:
            raise NodeNotFound(missing)
        if not targets:
            raise InvalidCommand("node_ids", "there are no nodes to send to")
        group = "b" + new_message_id()
        news = [NewCommand.create(n, body, options, broadcast_id=group) for n in targets]
        payloads = [n.encode(self.settings.max_bytes) for n in news]
        await self._query(lambda conn: outbox.insert(conn, news, "accepted"))
        for n in news:
            self.emit(Moved(n.message_id, n.node_id, "queued", "accepted", n.created_at, retain, 0))
        await self.intake.route([n.pending(p) for n, p in zip(news, payloads, strict=True)])
        return group, [n.record() for n in news]

    async def get(self, message_id: str) -> CommandRecord:
        """The command with its transitions (``events``); CommandNotFound if unknown."""
        record = await self._query(lambda conn: outbox.fetch(conn, message_id, events=True))
        if record is None:
            raise CommandNotFound(message_id[:80])
        return record

    async def for_node(self, node_id: str, limit: int = 50) -> list[CommandRecord]:
        """The node's latest commands, newest first (an unknown node has none)."""
        return await self._query(lambda conn: outbox.for_node(conn, node_id, max(1, limit)))

    async def cancel(self, message_id: str) -> CommandRecord:
        """Cancel a command never handed to MQTT; CommandConflict once it may have been."""
        at = utcnow()

        step = Step(
            message_id, "cancelled", "cancelled by request", ("queued",), never_attempted=True
        )

        async def work(conn: Conn) -> tuple[list[Moved], CommandRecord | None]:
            moved, _ = await outbox.move_many(conn, [step], at)
            return moved, await outbox.fetch(conn, message_id, events=True)

        moved, record = await self._query(work)
        if record is None:
            raise CommandNotFound(message_id[:80])
        if not moved:
            detail = (
                "a delivery attempt was made (outcome unknown); it can no longer be cancelled"
                if record.status == "queued"
                else "only a queued command can be cancelled"
            )
            raise CommandConflict(message_id, record.status, detail)
        self.scheduler.remove(message_id)
        self.emit(moved[0])
        return record

    def stats(self) -> dict[str, Any]:
        """MQTT publisher stats (seed shape) plus the outbox as this process sees it."""
        out = self.mqtt.stats()
        out.update(
            queued=self.scheduler.queued,
            in_flight=self.scheduler.in_flight,
            dispatching_commands=self.active.is_set(),
        )
        return out

    @property
    def stopped(self) -> asyncio.Event:
        """Set once the gateway stops: background work ends."""
        return self._stop

    def add_listener(self, callback: OnStatus) -> None:
        self.listeners.append(callback)

    def wake(self) -> None:
        self.dispatcher.wake()

    def offer(self, pending: Pending) -> None:
        # standing by, a command is the holder's to send: it gets it from the command
        # queue, or from the outbox (``_adopt_orphans``)
        if self.active.is_set() and self.scheduler.offer(pending):
            self.wake()

    # -- wiring --------------------------------------------------------------------------
    def consumers(self) -> list[Consumer]:
        return [
            Consumer(topology.COMMAND_QUEUE, self.intake.submit, exclusive=True),
            Consumer(topology.ACK_QUEUE, self.tracker.submit, exclusive=True),
        ]

    def on_stored(self, rows: Sequence[Any]) -> None:
        """Ingest callback: legacy status events may confirm a command (inferred)."""
        self.tracker.on_stored(rows)

    def _on_exclusive(self, held: bool) -> None:
        if held:
            self._released.clear()
            self.active.set()
        else:
            self.active.clear()
            self._released.set()

    def _on_presence(self, change: PresenceChange) -> None:
        if change.status == "online":
            self.scheduler.wake(change.node_id)
            self.wake()

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._hold_loop(), name="commands-hold")
            tg.create_task(self.dispatcher.run(), name="commands-dispatch")
            tg.create_task(self.intake.run(), name="commands-intake")
            tg.create_task(self.tracker.run(), name="commands-acks")
            tg.create_task(self.sweeper.run(), name="commands-sweep")

    async def drain(self, timeout_s: float) -> bool:
        """Stop dispatching; let publishes in progress and buffered acks settle (bounded)."""
        self.dispatcher.draining = True
        try:
            async with asyncio.timeout(timeout_s):
                await self.dispatcher.drain()
                await self.tracker.drain()
                await self.intake.drain()
        except TimeoutError:
            return False
        finally:
            self._stop.set()
        return True

    async def _hold_loop(self) -> None:
        """Holding the command queues: load the outbox and dispatch. Losing them (another
        gateway took over while this one was cut off): forget, the holder has it all."""
        while True:
            await self.active.wait()
            await self._load()
            self.sweeper.orphans_at = time.monotonic()
            await self._released.wait()
            self.scheduler.clear()
            self.tracker.forget()
            log.warning("commands: standing by; the gateway holding the command queues sends")

    async def _load(self) -> None:
        """Rebuild the scheduler from the outbox: queued commands, and those still in flight."""
        at = utcnow()
        window = timedelta(seconds=max(self.settings.ack_timeout_s, self.settings.exec_timeout_s))
        rows = await self.db.retrying(lambda c: outbox.open_commands(c, at - window), self._stop)
        held = 0
        for r in rows:
            if r.status == "queued":
                self.scheduler.offer(pending_of(r))
            else:
                held += self.tracker.restore(r, at)
        await self.tracker.retained.load()
        await self.tracker.load_unacking(at)
        log.info("commands: %d queued, %d in flight restored", len(rows) - held, held)
        self.wake()

    # -- helpers -------------------------------------------------------------------------
    def emit(self, moved: Moved) -> None:
        self.tracker.count(moved)
        event: dict[str, Any] = {
            "type": "command_status",
            "message_id": moved.message_id,
            "node_id": moved.node_id,
            "status": moved.status,
            "reason": moved.reason,
            "timestamp": moved.at.isoformat(),
        }
        for callback in self.listeners:
            try:
                callback(event)
            except Exception:
                log.exception("command status listener failed")

    def _options(self, priority: Any, ttl_s: Any, retain: Any) -> Options:
        return validate_options(
            priority, self.settings.default_ttl_s if ttl_s is None else ttl_s, retain
        )

    async def _query(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """An API call's database work: one attempt, an outage is DependencyUnavailable."""
        try:
            async with self.db.pool.acquire(timeout=self.db.settings.command_timeout_s) as conn:
                return await work(conn)
        except TRANSIENT as exc:
            raise DependencyUnavailable("postgresql", self.db.settings.display, str(exc)) from None

    async def retrying(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Background database work: rides out an outage until stopped."""
        return await self.db.retrying(work, self._stop)
