"""WebSocket fan-out: every event is encoded once and queued per client, bounded.

A client whose queue overflows has its backlog dropped and is sent one ``resync`` message
(it should re-read the snapshot); a client that overflows again and again within a short
window is closed. Either way it never stalls the others nor grows memory without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .metrics import Metrics

RESYNC = orjson.dumps({"type": "resync", "reason": "client too slow; events were dropped"}).decode()
CLOSE = ""  # sentinel: the sender closes the socket
MAX_OVERFLOWS = 3
OVERFLOW_WINDOW_S = 30.0


@dataclass(eq=False)
class Client:
    queue_size: int
    nodes: frozenset[str] | None = None  # None = all
    types: frozenset[str] | None = None
    queue: asyncio.Queue[str] = field(init=False)  # text frames, encoded once per event
    overflows: list[float] = field(default_factory=list)
    closing: bool = False
    close_reason: str = ""  # why the hub closes it: too_slow | shutdown

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.queue_size)

    def wants(self, event_type: str, node_id: str | None) -> bool:
        if self.types is not None and event_type not in self.types:
            return False
        return self.nodes is None or node_id is None or node_id in self.nodes

    def subscribe(self, nodes: Iterable[str] | None, types: Iterable[str] | None) -> None:
        self.nodes = frozenset(nodes) if nodes is not None else None
        self.types = frozenset(types) if types is not None else None


class Hub:
    def __init__(self, metrics: Metrics, queue_size: int = 1000) -> None:
        self.metrics = metrics
        self.queue_size = queue_size
        self.clients: set[Client] = set()

    def connect(self) -> Client:
        client = Client(self.queue_size)
        self.clients.add(client)
        self.metrics.ws_clients.set(len(self.clients))
        return client

    def disconnect(self, client: Client) -> None:
        self.clients.discard(client)
        self.metrics.ws_clients.set(len(self.clients))

    def publish(self, event: dict[str, Any]) -> None:
        """Queue an event for every interested client; never blocks."""
        if not self.clients:
            return
        event_type = str(event.get("type", ""))
        node_id = event.get("node_id")
        frame = orjson.dumps(event).decode()
        for client in list(self.clients):
            if client.closing or not client.wants(event_type, node_id):
                continue
            try:
                client.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self._overflow(client)

    def _overflow(self, client: Client) -> None:
        now = time.monotonic()
        client.overflows = [t for t in client.overflows if now - t < OVERFLOW_WINDOW_S]
        client.overflows.append(now)
        _clear(client.queue)
        if len(client.overflows) >= MAX_OVERFLOWS:
            client.closing, client.close_reason = True, "too_slow"
            client.queue.put_nowait(CLOSE)
            self.metrics.ws_closed_slow.inc()
        else:
            client.queue.put_nowait(RESYNC)
            self.metrics.ws_overflows.inc()

    def close_all(self) -> None:
        for client in list(self.clients):
            client.closing, client.close_reason = True, "shutdown"
            _clear(client.queue)
            client.queue.put_nowait(CLOSE)


def _clear(queue: asyncio.Queue[str]) -> None:
    while not queue.empty():
        queue.get_nowait()
