"""The presence table: last-seen per node, per-node thresholds, online/offline transitions.

A node is online from any message it sends; offline on its LWT (or an ``offline`` status)
or when nothing was heard for longer than its threshold. The threshold is
``max(OFFLINE_THRESHOLD_S, INTERVAL_MULTIPLE * observed interval)``, where the interval is
a moving average of the gaps between its messages, so a node that reports every 30 s gets
a 75 s threshold and never flaps. Until a node's interval is known (one message seen) the
threshold is at least ``NEW_NODE_THRESHOLD_S`` (60 s), so a slow reporter does not
flap on its first gap; one slower still is timed out once, and the gap that brings it
back is learned, so it does not flap again. A gap counts at most ``SAMPLE_CAP`` times the
interval known, gaps across this gateway's restart are not learned, and intervals are
stored in ``nodes.report_interval_s`` as they change, so they survive a restart.

Cost: only online nodes have an entry in the deadline heap (one, plus a stale one while
the interval is being learned); a message only updates ``last_seen`` (O(1)); a tick pops
the entries that are due and re-arms the ones heard from since. Silent nodes that are
already offline cost nothing. A large tick is taken in chunks (``presence.TICK_CHUNK``),
with the event loop free in between.

This is the table alone, in memory and without I/O (a clock is injected): ``presence``
ticks it, writes its transitions and restores it after a restart.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .metrics import Metrics
from .settings import PresenceSettings
from .store import Accepted

Status = Literal["online", "offline", "unknown"]
Reason = Literal["message", "timeout", "lwt", "status", "startup"]
INTERVAL_MULTIPLE = 2.5
MAX_THRESHOLD_S = 6 * 3600.0
EWMA_WEIGHT = 0.3
# one gap counts at most this many times the interval known so far: a pause of the
# gateway's own (a database outage, a backlog) never makes a node's threshold hours long
SAMPLE_CAP = 3.0
SAVE_CHANGE = 0.2  # a learned interval is saved once it moved this much from the stored one
Clock = Callable[[], float]  # wall-clock epoch seconds (injected in tests)


@dataclass(frozen=True, slots=True)
class Transition:
    node_id: str
    previous: Status
    status: Status
    reason: Reason
    at: float  # epoch seconds

    @property
    def at_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.at, UTC)


@dataclass(slots=True)
class NodeState:
    status: Status
    last_seen: float
    interval_s: float | None = None
    deadline: float | None = None  # of its live entry in the deadline heap, if any
    restored: bool = False  # loaded at start and not heard from since
    changed_at: float = 0.0  # of its last transition here
    timed_out: bool = False  # offline because it went silent (not by LWT or status)
    saved_interval_s: float | None = None  # as stored in nodes.report_interval_s


class PresenceTable:
    def __init__(
        self, settings: PresenceSettings, metrics: Metrics, clock: Clock = time.time
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        self._heap: list[tuple[float, str]] = []
        self._online = 0  # kept by _transition, load and forget: counts() is O(1)
        self._pending: list[Transition] = []  # transitions not written yet
        self._listeners: list[Callable[[Transition], None]] = []
        self._flush = asyncio.Event()  # set when there is something to write
        self._unsaved: set[str] = set()  # nodes whose learned interval is not stored yet

    # -- queries -----------------------------------------------------------------------
    def is_online(self, node_id: str) -> bool:
        state = self.nodes.get(node_id)
        return state is not None and state.status == "online"

    def status(self, node_id: str) -> Status:
        """The node's status as shown (API, snapshot). A node restored as online after a
        restart and silent past its threshold is ``unknown`` until it is judged (once the
        broker's backlog is ingested): neither shown online nor called offline early."""
        state = self.nodes.get(node_id)
        if state is None:
            return "unknown"
        overdue = self.clock() > state.last_seen + self.threshold(state)
        if state.restored and state.status == "online" and overdue:
            return "unknown"
        return state.status

    def threshold(self, state: NodeState) -> float:
        base = self.settings.offline_threshold_s
        if state.interval_s is None:
            return max(base, self.settings.new_node_threshold_s)
        return min(max(base, INTERVAL_MULTIPLE * state.interval_s), MAX_THRESHOLD_S)

    def counts(self) -> tuple[int, int]:
        return self._online, len(self.nodes) - self._online

    def forget(self, node_id: str) -> None:
        """A deleted node: its heap entry, if any, is skipped when it comes due."""
        state = self.nodes.pop(node_id, None)
        if state is not None and state.status == "online":
            self._online -= 1

    def add_listener(self, callback: Callable[[Transition], None]) -> None:
        self._listeners.append(callback)

    # -- input -------------------------------------------------------------------------
    def on_stored(self, rows: Sequence[Accepted]) -> None:
        """Ingest callback, after commit: every stored message is a sign of life (or LWT)."""
        for row in rows:
            m = row.message
            at = row.received_at.timestamp()
            if m.offline:
                lwt = m.data.get("reason") in (None, "lwt")
                self.went_offline(m.node_id, "lwt" if lwt else "status", at)
            else:
                self.heard(m.node_id, at, "status" if m.kind == "status" else "message")

    def heard(self, node_id: str, at: float, reason: Reason = "message") -> None:
        state = self.nodes.get(node_id)
        if state is None:
            state = self.nodes[node_id] = NodeState("unknown", at)
        elif at > state.last_seen:
            # a gap is the node's interval while it was online, or silent past a threshold
            # that was too short for it (so a slow reporter stops flapping after one
            # timeout); not across this gateway's restart, an LWT or an offline status
            gap = at - state.last_seen
            learn = state.status == "online" or (state.status == "offline" and state.timed_out)
            if learn and not state.restored and gap > 0.05:
                self._learn(node_id, state, gap)
            state.last_seen = at
        state.restored = False
        if state.status != "online":
            self._transition(node_id, state, "online", reason, at)
        target = state.last_seen + self.threshold(state)
        # a later deadline is found when the entry comes due; an earlier one (the interval
        # was just learned) needs an entry of its own, the old one then being stale
        if state.deadline is None or target < state.deadline:
            self._arm(node_id, state, target)

    def _learn(self, node_id: str, state: NodeState, gap: float) -> None:
        known = state.interval_s
        if known is None:
            state.interval_s = min(gap, MAX_THRESHOLD_S / INTERVAL_MULTIPLE)
        else:
            sample = min(gap, SAMPLE_CAP * known)
            state.interval_s = EWMA_WEIGHT * sample + (1 - EWMA_WEIGHT) * known
        saved = state.saved_interval_s
        if saved is None or abs(state.interval_s - saved) > SAVE_CHANGE * saved:
            self._unsaved.add(node_id)

    def _arm(self, node_id: str, state: NodeState, deadline: float) -> None:
        state.deadline = deadline
        heapq.heappush(self._heap, (deadline, node_id))

    def went_offline(self, node_id: str, reason: Reason, at: float) -> None:
        state = self.nodes.setdefault(node_id, NodeState("unknown", at))
        state.last_seen = max(state.last_seen, at)
        if state.status != "offline":
            self._transition(node_id, state, "offline", reason, at)

    # -- the ticker ----------------------------------------------------------------------
    def check(self, now: float | None = None, limit: int | None = None) -> list[Transition]:
        """One tick: every online node silent beyond its threshold goes offline.

        With ``limit``, at most that many due entries are looked at; ``due(now)`` then
        says whether the tick has more (the ticker yields to the loop in between).
        """
        now = self.clock() if now is None else now
        before = len(self._pending)
        self._expire(self._overdue(now, limit), now)
        return self._pending[before:]

    def _overdue(self, now: float, limit: int | None) -> list[str]:
        """Online nodes past their deadline (at most ``limit`` due entries looked at);
        those heard from since their entry was armed are re-armed instead."""
        out: list[str] = []
        budget = limit if limit is not None else -1
        while self._heap and self._heap[0][0] <= now and budget:
            budget -= 1
            due, node_id = heapq.heappop(self._heap)
            state = self.nodes.get(node_id)
            if state is None or state.deadline != due:
                continue  # deleted node, or a stale entry
            state.deadline = None
            if state.status == "online" and not self._rearmed(node_id, state, now):
                out.append(node_id)
        return out

    def _expire(self, node_ids: list[str], now: float) -> None:
        for node_id in node_ids:
            state = self.nodes.get(node_id)
            if state is None or state.status != "online" or state.deadline is not None:
                continue  # gone, offline already, or heard from meanwhile
            if not self._rearmed(node_id, state, now):  # (another gateway heard it?)
                reason: Reason = "startup" if state.restored else "timeout"
                self._transition(node_id, state, "offline", reason, now)

    def _rearmed(self, node_id: str, state: NodeState, now: float) -> bool:
        """Re-arm a node whose threshold has not run out since it was last heard of."""
        deadline = state.last_seen + self.threshold(state)
        if deadline <= now:
            return False
        self._arm(node_id, state, deadline)
        return True

    def due(self, now: float) -> bool:
        """Whether a node's deadline is at or before ``now``, still to be looked at."""
        return bool(self._heap) and self._heap[0][0] <= now

    def _transition(
        self, node_id: str, state: NodeState, status: Status, reason: Reason, at: float
    ) -> None:
        # a node's history runs forward: a message received just before a timeout but
        # committed after it brings the node back at the timeout's moment, not before it
        at = state.changed_at = max(at, state.changed_at)
        state.timed_out = status == "offline" and reason in ("timeout", "startup")
        event = Transition(node_id, state.status, status, reason, at)
        self._online += (status == "online") - (state.status == "online")
        state.status = status
        self._pending.append(event)
        self.metrics.presence_transitions.labels(status, reason).inc()
        self._flush.set()
        for listener in self._listeners:
            listener(event)
