"""Per-node dispatch order, in memory: a cache of the outbox's open commands.

Each node has a heap of queued commands (higher priority first, then first come) and a
set of commands in flight (at most ``max_in_flight``). ``take`` hands out what may go now:
for nodes that are online and have a free slot. A slot is freed by ``settle`` (a final
ack, or the dispatcher giving up waiting) or by ``requeue`` (a publish whose outcome is
unknown goes back to the head of its node's queue, to be sent again with the same id).

Only nodes marked dirty (new command, freed slot, came online) are looked at, so a large
backlog for offline nodes costs nothing per wake-up. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True)
class Pending:
    message_id: str
    node_id: str
    priority: int
    expires_at: float  # epoch seconds
    payload: bytes
    retain: bool = False
    order: int = field(default=-1, compare=False)  # first-come tie-breaker, set by offer


class Scheduler:
    def __init__(self, max_in_flight: int = 1) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self._heaps: dict[str, list[tuple[int, int, str]]] = {}
        self._queued: dict[str, Pending] = {}
        self._per_node: dict[str, int] = {}
        self._in_flight: dict[str, dict[str, float]] = {}
        self._flying: set[str] = set()  # every in-flight message id, for ``knows``
        self._dirty: set[str] = set()
        self._order = itertools.count()

    # -- views -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    def knows(self, message_id: str) -> bool:
        return message_id in self._queued or message_id in self._flying

    def queued_for(self, node_id: str) -> list[str]:
        """The node's queued commands in the order they would go."""
        heap = sorted(self._heaps.get(node_id, []))
        return [mid for _, _, mid in heap if mid in self._queued]

    def waiting_nodes(self) -> list[str]:
        """Nodes with commands queued."""
        return list(self._per_node)

    @property
    def has_work(self) -> bool:
        return bool(self._dirty)

    def clear(self) -> None:
        """Forget everything (another process sends these commands now)."""
        self._heaps.clear()
        self._queued.clear()
        self._per_node.clear()
        self._in_flight.clear()
        self._flying.clear()
        self._dirty.clear()

    # -- input -------------------------------------------------------------------------
    def offer(self, cmd: Pending) -> bool:
        """Queue a command (idempotent: a known message id is ignored)."""
        if self.knows(cmd.message_id):
            return False
        if cmd.order < 0:
            cmd.order = next(self._order)
        self._push(cmd)
        return True

    def _push(self, cmd: Pending) -> None:
        self._queued[cmd.message_id] = cmd
        self._per_node[cmd.node_id] = self._per_node.get(cmd.node_id, 0) + 1
        heap = self._heaps.setdefault(cmd.node_id, [])
        heapq.heappush(heap, (-cmd.priority, cmd.order, cmd.message_id))
        self._dirty.add(cmd.node_id)

    def remove(self, message_id: str) -> Pending | None:
        """Drop a queued command (expired or cancelled); in-flight ones are not touched."""
        cmd = self._queued.pop(message_id, None)
        if cmd is not None:
            left = self._per_node[cmd.node_id] - 1
            if left:
                self._per_node[cmd.node_id] = left
            else:  # the heap holds only dropped entries now
                del self._per_node[cmd.node_id]
                self._heaps.pop(cmd.node_id, None)
        return cmd

    def wake(self, node_id: str) -> None:
        """Look at this node again (it came online)."""
        if node_id in self._heaps:
            self._dirty.add(node_id)

    # -- dispatch ----------------------------------------------------------------------
    def take(self, is_online: Callable[[str], bool]) -> list[Pending]:
        """Commands that may be published now; each holds an in-flight slot until settled."""
        out: list[Pending] = []
        dirty, self._dirty = self._dirty, set()
        for node_id in dirty:
            heap = self._heaps.get(node_id)
            if not heap or not is_online(node_id):
                continue
            flying = self._in_flight.setdefault(node_id, {})
            while heap and len(flying) < self.max_in_flight:
                _, _, mid = heapq.heappop(heap)
                cmd = self._queued.pop(mid, None)
                if cmd is None:
                    continue  # removed while queued
                self._per_node[node_id] -= 1
                flying[mid] = math.inf  # publishing: no deadline until the broker confirms
                self._flying.add(mid)
                out.append(cmd)
            if not self._per_node.get(node_id):
                self._per_node.pop(node_id, None)
                self._heaps.pop(node_id, None)
        return out

    def hold(self, node_id: str, message_id: str, deadline: float) -> None:
        """Count a command restored as in flight (sent before a restart) against its node."""
        self._in_flight.setdefault(node_id, {})[message_id] = deadline
        self._flying.add(message_id)

    def set_deadline(self, node_id: str, message_id: str, deadline: float) -> None:
        flying = self._in_flight.get(node_id)
        if flying is not None and message_id in flying:
            flying[message_id] = deadline

    def publishing(self, node_id: str, message_id: str) -> bool:
        """In flight with no deadline yet: taken for a publish that no PUBACK has settled."""
        return self._in_flight.get(node_id, {}).get(message_id) == math.inf

    def settle(self, node_id: str, message_id: str) -> bool:
        """Free the slot (final ack or ack timeout). False if it was not in flight."""
        flying = self._in_flight.get(node_id)
        if flying is None or flying.pop(message_id, None) is None:
            return False
        self._flying.discard(message_id)
        if not flying:
            del self._in_flight[node_id]
        self._dirty.add(node_id)
        return True

    def requeue(self, cmd: Pending) -> None:
        """Outcome unknown: back to its place in the queue, to be sent again (same id)."""
        self.settle(cmd.node_id, cmd.message_id)
        if cmd.message_id not in self._queued:
            self._push(cmd)

    def overdue(self, now: float) -> Iterator[tuple[str, str]]:
        """(node, message id) of in-flight commands past their deadline; settles them."""
        due = [
            (node_id, mid)
            for node_id, flying in self._in_flight.items()
            for mid, deadline in flying.items()
            if deadline <= now
        ]
        for node_id, mid in due:
            self.settle(node_id, mid)
        return iter(due)
