"""The retained last command (PROTOCOL §3): a ``retain=true`` command is also published
retained on ``devices/{id}/commands/last``, for a node that reconnects with a clean
session, and cleared (an empty retained payload) once acked or expired, so that a node
never replays a stale command. The outbox records which command each copy is."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

from . import outbox
from .command_codec import utcnow
from .dispatch import Pending
from .mqtt import PublishUnconfirmed

if TYPE_CHECKING:
    from .commands import Commands

log = logging.getLogger(__name__)


def last_topic(node_id: str) -> str:
    return f"devices/{node_id}/commands/last"


class Retained:
    def __init__(self, commands: Commands) -> None:
        self.c = commands
        self._copies: dict[str, str] = {}  # node → the command on its commands/last

    async def load(self) -> None:
        self._copies = await self.c.retrying(outbox.retained_now)

    async def publish(self, cmd: Pending) -> None:
        """Before the command itself, so a clear after its ack can never come first."""
        await self.c.mqtt.publish(
            last_topic(cmd.node_id), cmd.payload, qos=1, retain=True, kind="retained"
        )
        previous = self._copies.get(cmd.node_id)
        self._copies[cmd.node_id] = cmd.message_id
        if previous != cmd.message_id:
            await self.c.retrying(
                lambda conn: outbox.replaced_retained(conn, cmd.node_id, cmd.message_id, utcnow())
            )

    async def clear(self, node: str, mid: str) -> None:
        if self._copies.get(node) == mid:
            try:
                await self.c.mqtt.publish(
                    last_topic(node), b"", qos=1, retain=True, kind="retained"
                )
            except PublishUnconfirmed as exc:
                log.info("retained copy of %s not cleared yet (%s); the sweep retries", mid, exc)
                return
            # the ack path and the sweep may clear the same copy at once; a newer retained
            # command published meanwhile stays
            if self._copies.get(node) == mid:
                del self._copies[node]
        await self.c.retrying(lambda conn: outbox.mark_retain_cleared(conn, [mid], utcnow()))

    async def clear_settled(self, at: datetime) -> None:
        """Copies of commands acked or expired (the sweep; the ack path may have missed)."""
        for node, mid in await self.c.retrying(lambda conn: outbox.retained_settled(conn, at)):
            await self.clear(node, mid)
