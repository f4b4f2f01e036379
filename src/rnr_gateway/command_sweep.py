"""The commands' periodic sweep (every ``COMMAND_SWEEP_INTERVAL_S``): expiry in the outbox,
commands routed but not back from the command queue, and, on the gateway holding the
command queues, ack timeouts, retained copies to clear, orphaned commands to adopt,
nodes other gateways heard from, and legacy outcomes inferred from stored events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from . import outbox, topology
from .command_codec import pending_of, utcnow
from .errors import DependencyUnavailable

if TYPE_CHECKING:
    from .commands import Commands

log = logging.getLogger(__name__)
ORPHAN_SCAN_S = 30.0  # queued commands no scheduler holds, looked for this often


class Sweeper:
    def __init__(self, commands: Commands) -> None:
        self.c = commands
        self.orphans_at = 0.0  # when the outbox was last searched for orphans

    async def run(self) -> None:
        interval, stop = self.c.settings.sweep_interval_s, self.c.stopped
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self.sweep()
            except DependencyUnavailable as exc:
                log.debug("command sweep skipped: %s", exc)

    async def sweep(self) -> None:
        c, at = self.c, utcnow()
        for moved in await c.retrying(lambda conn: outbox.expire_due(conn, at)):
            c.scheduler.remove(moved.message_id)
            c.emit(moved)
        c.intake.offer_late(time.monotonic())
        if not c.active.is_set():
            return  # the rest is the holder's: it has the commands in flight and their copies
        c.tracker.check_timeouts(time.monotonic())
        await c.tracker.retained.clear_settled(at)
        if time.monotonic() - self.orphans_at > ORPHAN_SCAN_S:
            self.orphans_at = time.monotonic()
            await self._adopt_orphans()
        shared = c.amqp.shared(topology.SENSOR_QUEUE)
        if shared:
            # other gateways ingest part of every node's messages: a node this one has
            # commands for may be back although none of them came here yet
            waiting = [n for n in c.scheduler.waiting_nodes() if not c.presence.is_online(n)]
            if waiting:
                await c.presence.catch_up(waiting)
        await c.tracker.infer_from_stored(shared)
        if c.scheduler.has_work:
            c.wake()

    async def _adopt_orphans(self) -> None:
        """Queued commands no scheduler holds: a gateway standing by accepted them but could
        not route them through the command queue."""
        c = self.c
        before = utcnow() - timedelta(seconds=ORPHAN_SCAN_S)
        ids = await c.retrying(lambda conn: outbox.queued_before(conn, before))
        unknown = [mid for mid in ids if not c.scheduler.knows(mid)]
        if not unknown:
            return
        rows = await c.retrying(lambda conn: outbox.fetch_many(conn, unknown))
        orphans = [pending_of(row) for row in rows if row.status == "queued"]
        for pending in orphans:
            c.offer(pending)
        if orphans:
            log.info(
                "commands: %d queued in the outbox and held by no one, now offered", len(orphans)
            )
