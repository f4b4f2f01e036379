"""The command queue (``device_commands_enhanced``) as the way in to the dispatcher.

Every command passes through it: the API's (published with priority, TTL and publisher
confirms right after the outbox insert) and any other producer's (adopted into the outbox
once, by message id). A delivery is acked once its command is in the outbox and offered
to the scheduler. Should the broker refuse or lose one of our own publishes, or not hand
it back within ``INTAKE_GRACE_S``, the command goes to the scheduler directly: the outbox,
not the broker, decides what exists. That is also why our own copies are published
transient: the outbox row is the durable copy, and a persistent message makes the queue
write and sync it, which under steady load delays its deliveries and confirms by
hundreds of milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from typing import TYPE_CHECKING

import orjson

from . import outbox, store, topology
from .amqp_inbound import Inbound
from .command_codec import (
    CommandRecord,
    Moved,
    NewCommand,
    Options,
    pending_of,
    validate,
)
from .dispatch import Pending
from .errors import BadMessage, GatewayError
from .store import Failed
from .topics import valid_node_id

if TYPE_CHECKING:
    from .commands import Commands
    from .db import Conn

log = logging.getLogger(__name__)
INTAKE_GRACE_S = 2.0


class Intake:
    def __init__(self, commands: Commands) -> None:
        self.c = commands
        self._queue: asyncio.Queue[Inbound] = asyncio.Queue()
        self._ours: dict[str, tuple[Pending, float]] = {}  # published, not yet delivered back

    def submit(self, message: Inbound) -> None:
        """The consumer callback of the command queue; never blocks."""
        self._queue.put_nowait(message)

    async def route(self, pending: list[Pending]) -> None:
        """Publish to the command queue (confirmed); on failure offer directly."""
        started = time.monotonic()
        for p in pending:
            self._ours[p.message_id] = (p, started)
        results = await asyncio.gather(*(self._publish(p) for p in pending), return_exceptions=True)
        for p, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, GatewayError):
                    raise result
                log.warning(
                    "command %s not routed through %s (%s); %s",
                    p.message_id,
                    topology.COMMAND_QUEUE,
                    result,
                    "dispatching from the outbox"
                    if self.c.active.is_set()
                    else "left in the outbox for the gateway holding the command queues",
                )
                self._offer_ours(p.message_id)

    async def _publish(self, p: Pending) -> None:
        await self.c.amqp.publish(
            topology.COMMAND_EXCHANGE,
            f"commands.{p.node_id}",
            p.payload,
            priority=p.priority,
            expiration_s=max(0.001, p.expires_at - time.time()),
            message_id=p.message_id,
            headers={"retain": True} if p.retain else None,
            persistent=False,  # the outbox row is the durable copy (see the module doc)
        )

    def _offer_ours(self, message_id: str) -> None:
        entry = self._ours.pop(message_id, None)
        if entry is not None:
            self.c.offer(entry[0])

    def offer_late(self, now: float) -> None:
        """Own commands the queue has not handed back in time go to the scheduler directly
        (standing by, they never come back: the holder of the queue takes them)."""
        for mid in [m for m, (_, t) in self._ours.items() if now - t > INTAKE_GRACE_S]:
            if self.c.active.is_set():
                log.warning("command %s not back from the command queue; dispatching direct", mid)
            self._offer_ours(mid)

    async def run(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self._take(message)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        await self._queue.join()

    async def _take(self, message: Inbound) -> None:
        mid = message.message_id or ""
        if mid in self._ours:
            self._offer_ours(mid)
        else:
            pending = await self._adopt(message)
            if pending is not None:
                self.c.offer(pending)
        with contextlib.suppress(Exception):  # a lost channel redelivers; offers are idempotent
            await message.ack()

    async def _adopt(self, message: Inbound) -> Pending | None:
        """A command this process did not route: into the outbox (once), then dispatch."""
        try:
            new = self._parse(message)
        except GatewayError as exc:
            await record_failed(self.c, topology.COMMAND_QUEUE, message, exc)
            return None

        async def store_and_read(conn: Conn) -> tuple[bool, CommandRecord | None]:
            fresh = bool(await outbox.insert(conn, [new], "accepted from the command queue"))
            return fresh, await outbox.fetch(conn, new.message_id)

        fresh, row = await self.c.retrying(store_and_read)
        if fresh:
            self.c.emit(
                Moved(new.message_id, new.node_id, "queued", "accepted", new.created_at, False, 0)
            )
        if row is None or row.status != "queued":
            return None  # already sent or finished (a redelivery, a replayed dead letter)
        return pending_of(row)

    def _parse(self, message: Inbound) -> NewCommand:
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
        validate(body)
        expires = body.get("expires_at")
        ttl = (
            float(expires) - time.time()
            if isinstance(expires, int | float) and not isinstance(expires, bool)
            else self.c.settings.default_ttl_s
        )
        priority = message.priority if message.priority is not None else 5
        retain = bool((message.headers or {}).get("retain", False))
        options = Options(min(max(priority, 0), 10), max(ttl, 0.001), retain)
        mid = message.message_id or body.get("message_id") or derived_id(message)
        return NewCommand.create(node_id, body, options, message_id=mid, source="amqp")


def derived_id(message: Inbound) -> str:
    """The id of a command another producer sent without one: named by what a redelivery
    repeats (routing key, body, AMQP timestamp and headers), so that a redelivery is the
    same command, never a second one. Two identical commands without an id or timestamp
    are one command."""
    digest = hashlib.sha256()
    for part in (
        message.routing_key.encode(),
        message.body,
        str(message.timestamp).encode(),
        orjson.dumps(message.headers, default=str, option=orjson.OPT_SORT_KEYS),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    return "amqp-" + base64.urlsafe_b64encode(digest.digest()[:16]).decode().rstrip("=")


def failed_record(queue: str, message: Inbound, exc: GatewayError) -> Failed:
    """A failed_messages row (PROTOCOL §6) for a message that cannot be processed."""
    reason = exc.reason if isinstance(exc, BadMessage) else getattr(exc, "code", "invalid")
    return Failed(
        queue,
        message.routing_key or "",
        dict(message.headers or {}),
        message.body,
        reason,
        str(exc)[:1000],
    )


async def record_failed(
    commands: Commands, queue: str, message: Inbound, exc: GatewayError
) -> None:
    """Into failed_messages with its reason, then it is acked."""
    failed = failed_record(queue, message, exc)
    await commands.retrying(lambda conn: store.write_batch(conn, [], [failed]))
    log.warning("message on %s recorded as failed: %s", message.routing_key, exc)
