"""The dispatcher: what the per-node scheduler gives for online nodes is claimed in the
outbox (one statement), then each claimed command is published to its node over MQTT
(QoS 1, retained copy first when asked) and its PUBACK handed to the tracker. A publish
whose outcome is unknown is queued again with the same id; an expired command is never
handed to MQTT."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from . import outbox
from .command_codec import utcnow
from .dispatch import Pending
from .errors import DependencyUnavailable
from .mqtt import PublishUnconfirmed
from .topics import command_topic

if TYPE_CHECKING:
    from .commands import Commands

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, commands: Commands) -> None:
        self.c = commands
        self.draining = False  # set by the staged shutdown: nothing new goes out
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None

    def wake(self) -> None:
        """Something may be sendable: a command queued or settled, a node back online."""
        self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while True:
                await self._wake.wait()
                self._wake.clear()
                c = self.c
                if self.draining or not c.active.is_set():
                    continue
                if not c.mqtt.connected.is_set():
                    await c.mqtt.connected.wait()
                batch = c.scheduler.take(c.presence.is_online)
                if batch:
                    await self._dispatch(batch)

    async def drain(self) -> None:
        """Wait for the publishes in progress (the caller bounds the wait)."""
        while self._sending:
            await asyncio.wait(set(self._sending))

    async def _dispatch(self, batch: list[Pending]) -> None:
        """Claim what was taken in one statement, then publish each claimed command."""
        ids = [cmd.message_id for cmd in batch]
        try:
            claimed = await self.c.retrying(lambda c: outbox.claim_many(c, ids, utcnow()))
        except DependencyUnavailable:  # stopping while the database is down
            claimed = set()
        assert self._tg is not None
        for cmd in batch:
            if cmd.message_id not in claimed:  # cancelled, expired or sent meanwhile
                self.c.scheduler.settle(cmd.node_id, cmd.message_id)
                self._wake.set()
                continue
            task = self._tg.create_task(self._send(cmd), name=f"command-{cmd.message_id}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, cmd: Pending) -> None:
        tracker = self.c.tracker
        try:
            if not self._unexpired(cmd):
                return
            if cmd.retain:
                await tracker.retained.publish(cmd)
                if not self._unexpired(cmd):
                    return
            await self.c.mqtt.publish(command_topic(cmd.node_id), cmd.payload, qos=1)
        except PublishUnconfirmed as exc:
            log.warning(
                "command %s to %s: %s; resending with the same id",
                cmd.message_id,
                cmd.node_id,
                exc.cause,
            )
            await asyncio.sleep(self.c.retry_delay_s)
            self.c.scheduler.requeue(cmd)
            self._wake.set()
            return
        except DependencyUnavailable as exc:  # the database, while stopping
            log.warning("command %s left for the next start: %s", cmd.message_id, exc)
            self.c.scheduler.settle(cmd.node_id, cmd.message_id)
            return
        tracker.published(cmd)

    def _unexpired(self, cmd: Pending) -> bool:
        """Checked right before each publish (the claim checked too, but a publish before
        this one may have taken long): an expired command is never handed to MQTT; the
        sweep records it ``expired``."""
        if time.time() < cmd.expires_at:
            return True
        log.info(
            "command %s to %s expired before its publish; not sent", cmd.message_id, cmd.node_id
        )
        self.c.scheduler.settle(cmd.node_id, cmd.message_id)
        self._wake.set()
        return False
