"""Presence, the service: the table of ``presence_table`` ticked every
STATUS_CHECK_INTERVAL_S, its transitions written to ``node_events`` and ``nodes`` as they
happen, restored after a restart (nodes that kept reporting meanwhile judged only once
the broker's backlog is ingested), and checked against what other gateways on the vhost
stored (``nodes.last_seen``) before a node is called silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import presence_store
from .db import CONNECT_FAILURE, Database
from .metrics import Metrics
from .presence_table import Clock, NodeState, PresenceTable, Reason, Status, Transition
from .settings import PresenceSettings

if TYPE_CHECKING:
    from asyncpg import Record

__all__ = ["Presence", "Status", "Transition"]

log = logging.getLogger(__name__)
# due heap entries looked at before the ticker lets the event loop run others: at 100 000
# online nodes a whole tick is some 30 000 entries and 0.1-0.2 s (docs/benchmarks.md)
TICK_CHUNK = 2000
# after a restart, nodes restored as online are judged only once the backlog the broker
# kept is ingested (messages still waiting in the ingest queues), at most this long
MAX_STARTUP_GRACE_S = 300.0
Backlog = Callable[[], Awaitable[int]]
OFFLINE_REASONS: dict[str, Reason] = {"lwt": "lwt", "status": "status", "timeout": "timeout"}


class Presence(PresenceTable):
    def __init__(
        self,
        settings: PresenceSettings,
        db: Database,
        metrics: Metrics,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(settings, metrics, clock)
        self.db = db
        self._stop = asyncio.Event()
        self.started_at = clock()
        # messages still waiting in the ingest queues (set by the gateway); None: no wait
        self.backlog: Backlog | None = None

    # -- a second opinion: the database ----------------------------------------------
    async def _second_opinion(self, node_ids: list[str]) -> list[Record] | None:
        """What ``nodes`` says of these nodes; None while the database is out of reach."""
        try:
            return await presence_store.second_opinion(self.db.pool, node_ids)
        except CONNECT_FAILURE as exc:
            log.debug("presence: no second opinion from the database (%s)", exc)
            return None

    async def catch_up(self, node_ids: list[str]) -> None:
        """Nodes this process has as offline that another gateway has heard from lately
        (``nodes``: online, ``last_seen`` within the threshold) are online here too."""
        rows = await self._second_opinion(node_ids) or []
        now = self.clock()
        new_node = max(self.settings.offline_threshold_s, self.settings.new_node_threshold_s)
        for row in rows:
            state = self.nodes.get(row["node_id"])
            if row["status"] != "online" or row["seen"] is None:
                continue
            if state is not None and state.status == "online":
                continue
            seen = float(row["seen"])
            last, limit = (state.last_seen, self.threshold(state)) if state else (0.0, new_node)
            if seen > last and now - seen < limit:
                self.heard(row["node_id"], seen)

    async def _heard_elsewhere(self, node_ids: list[str]) -> None:
        """Ask the database before calling nodes silent: with several gateways on the
        vhost each ingests part of a node's messages, and ``nodes.last_seen`` is the
        latest any of them stored. Database down: ask again at the next check."""
        rows = await self._second_opinion(node_ids)
        if rows is None:
            # ingest commits nothing while the database is down, so nothing is heard
            # here either: the silence is ours, not the nodes'. Judge them once it is back.
            now = self.clock()
            for node_id in node_ids:
                state = self.nodes.get(node_id)
                if state is not None and state.deadline is None:
                    self._arm(node_id, state, now + self.settings.status_check_interval_s)
            return
        for row in rows:
            state = self.nodes.get(row["node_id"])
            if state is None or row["seen"] is None or float(row["seen"]) <= state.last_seen:
                continue
            state.last_seen = float(row["seen"])
            state.restored = False
            if row["status"] == "offline":  # another gateway stored its LWT (or timed it out)
                why: Reason = OFFLINE_REASONS.get(row["reason"], "status")
                self._transition(row["node_id"], state, "offline", why, state.last_seen)

    async def _after_backlog(self, node_ids: list[str], now: float) -> list[str]:
        """Nodes restored as online wait while the broker still holds messages for the
        ingest (theirs may be among them): judged a check interval later, so a node that
        kept reporting while this gateway was down never shows an offline/online pair."""
        restored = [n for n in node_ids if n in self.nodes and self.nodes[n].restored]
        if not restored or self.backlog is None or now - self.started_at > MAX_STARTUP_GRACE_S:
            return node_ids
        waiting = await self.backlog()
        if not waiting:
            return node_ids
        later = now + self.settings.status_check_interval_s
        for node_id in restored:
            state = self.nodes[node_id]
            if state.deadline is None:
                self._arm(node_id, state, later)
        log.info(
            "presence: %d restored nodes judged once the %d messages waiting are ingested",
            len(restored),
            waiting,
        )
        held = set(restored)
        return [n for n in node_ids if n not in held]

    # -- persistence -------------------------------------------------------------------
    async def load(self) -> None:
        """Restore state after a restart; nodes silent beyond threshold go offline (startup).

        A node that was online gets one check interval of grace from the start, so the
        backlog the broker kept for it is ingested before it is judged; a node that kept
        reporting therefore never shows a spurious offline/online pair.
        """
        rows = await self.db.retrying(presence_store.load, self._stop)
        grace_until = self.clock() + self.settings.status_check_interval_s
        for row in rows:
            status: Status = "online" if row["status"] == "online" else "offline"
            interval = row["report_interval_s"]
            state = NodeState(
                status, float(row["last_seen"]), interval, restored=True, saved_interval_s=interval
            )
            self.nodes[row["node_id"]] = state
            if status == "online":
                deadline = max(state.last_seen + self.threshold(state), grace_until)
                self._arm(row["node_id"], state, deadline)
        self._online = sum(1 for s in self.nodes.values() if s.status == "online")
        log.info("presence restored for %d nodes", len(rows))

    async def run(self) -> None:
        """Tick every STATUS_CHECK_INTERVAL_S; write transitions as they happen."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ticker(), name="presence-ticker")
            tg.create_task(self._writer(), name="presence-writer")

    def request_stop(self) -> None:
        self._stop.set()
        self._flush.set()

    async def _ticker(self) -> None:
        interval = self.settings.status_check_interval_s
        while not self._stop.is_set():
            now, busy = self.clock(), 0.0
            while True:
                started = time.perf_counter()
                silent = self._overdue(now, TICK_CHUNK)
                busy += time.perf_counter() - started
                if silent:
                    await self._heard_elsewhere(silent)
                    silent = await self._after_backlog(silent, now)
                    started = time.perf_counter()
                    self._expire(silent, now)
                    busy += time.perf_counter() - started
                if not self.due(now):
                    break
                await asyncio.sleep(0)  # ingest and WebSocket senders run between chunks
            if self._unsaved:
                self._flush.set()  # learned intervals, stored so they survive a restart
            self.metrics.presence_tick_seconds.observe(busy)
            online, offline = self.counts()
            self.metrics.nodes.labels("online").set(online)
            self.metrics.nodes.labels("offline").set(offline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def _writer(self) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            await self.flush()
            if self._stop.is_set():
                return

    async def flush(self) -> None:
        """Persist pending transitions (one transaction) and learned intervals (node by
        node, in node order: ``presence_store.write``)."""
        if not self._pending and not self._unsaved:
            return
        batch, self._pending = self._pending, []
        unsaved, self._unsaved = self._unsaved, set()
        intervals = {
            n: state.interval_s
            for n in unsaved | {t.node_id for t in batch}
            if (state := self.nodes.get(n)) is not None
        }
        try:
            await self.db.retrying(
                lambda conn: presence_store.write(conn, batch, intervals), self._stop
            )
        except Exception:
            self._pending[:0] = batch  # keep them for the next attempt
            self._unsaved |= unsaved
            raise
        for node_id, interval in intervals.items():
            if (state := self.nodes.get(node_id)) is not None:
                state.saved_interval_s = interval
