"""Live events across gateways: what one instance stores, the others' WebSocket clients see.

With several gateways on one vhost each stores the readings it consumed and makes the
command transitions it owns, so its WebSocket clients would see only that share. While
another consumer shares the ingest queue (``Amqp.shared``), each instance sends its
``sensor_data`` and ``command_status`` events, after they committed, on the PostgreSQL
channel ``rnr_live`` (NOTIFY, a few dozen events per notification), and every instance
LISTENs on a connection of its own and hands the other instances' events to its hub. A
lone gateway sends nothing and its listening connection stays idle.

Best effort, like any live view: the database is the record (the snapshot and the REST
API read it). Events are not replayed when the channel was down; they are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from .db import CONNECT_FAILURE, TRANSIENT, Database
from .metrics import Metrics

if TYPE_CHECKING:
    from .db import Conn

log = logging.getLogger(__name__)
CHANNEL = "rnr_live"
MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
MAX_PENDING = 20_000  # events waiting to be sent; beyond, new ones are dropped (counted)
GATHER_S = 0.02  # events are sent this long after the first of a burst, together
KEEPALIVE_S = 10.0  # the listening connection is checked this often
NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"

Deliver = Callable[[dict[str, Any]], None]


class Relay:
    def __init__(
        self, db: Database, metrics: Metrics, deliver: Deliver, sharing: Callable[[], bool]
    ) -> None:
        self.db, self.metrics = db, metrics
        self.deliver = deliver  # the local hub's publish
        self.sharing = sharing  # whether other gateways ingest too
        self.origin = uuid.uuid4().hex[:16]  # this instance, to skip its own notifications
        self.listening = asyncio.Event()
        self._pending: list[bytes] = []
        self._ready = asyncio.Event()

    def share(self, event: dict[str, Any]) -> None:
        """Send a committed event to the other gateways (when there are any); never blocks."""
        if not self.sharing():
            return
        if len(self._pending) >= MAX_PENDING:
            self.metrics.relay_dropped.labels("backlog").inc()
            return
        self._pending.append(orjson.dumps(event))
        self._ready.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send_loop(), name="relay-send")
            tg.create_task(self._listen_loop(), name="relay-listen")

    # -- sending -------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            await asyncio.sleep(GATHER_S)
            self._ready.clear()
            events, self._pending = self._pending, []
            payloads, oversize = pack(self.origin, events)
            if oversize:
                self.metrics.relay_dropped.labels("oversize").inc(oversize)
            try:
                async with self.db.pool.acquire(timeout=self.db.settings.command_timeout_s) as c:
                    await c.execute(NOTIFY, CHANNEL, payloads)
            except TRANSIENT as exc:
                # the database is down: ingest is paused too, and the record is safe
                self.metrics.relay_dropped.labels("database").inc(len(events) - oversize)
                log.debug("live events not relayed: %s", exc)
                continue
            self.metrics.relayed.labels("sent").inc(len(events) - oversize)

    # -- listening -----------------------------------------------------------------------
    async def _listen_loop(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._listen()
                delay = 1.0
            except CONNECT_FAILURE as exc:
                log.debug("live event channel lost: %s", exc)
            finally:
                self.listening.clear()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)

    async def _listen(self) -> None:
        """One listening connection, kept until it fails (then the loop makes a new one)."""
        s = self.db.settings
        conn = await asyncpg.connect(s.url.value, timeout=s.command_timeout_s)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._received)
            self.listening.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), KEEPALIVE_S)
                if not lost.is_set():
                    await conn.execute("SELECT 1", timeout=s.command_timeout_s)
        finally:
            conn.terminate()

    def _received(self, _conn: Conn, _pid: int, _channel: str, payload: object) -> None:
        origin, _, body = str(payload).partition("\n")
        if origin == self.origin or not body:
            return
        count = 0
        for line in body.split("\n"):
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not ours: another program on the channel
            if isinstance(event, dict):
                self.deliver(event)
                count += 1
        self.metrics.relayed.labels("received").inc(count)


def pack(origin: str, events: list[bytes]) -> tuple[list[str], int]:
    """Notification payloads (``origin`` line, then one event per line), each under
    ``MAX_PAYLOAD`` bytes, and how many events were too large to send at all."""
    head = len(origin) + 1
    payloads: list[str] = []
    chunk: list[bytes] = []
    size = head
    oversize = 0
    for event in events:
        if head + len(event) > MAX_PAYLOAD:
            oversize += 1
            continue
        if size + len(event) + 1 > MAX_PAYLOAD:
            payloads.append(_payload(origin, chunk))
            chunk, size = [], head
        chunk.append(event)
        size += len(event) + 1
    if chunk:
        payloads.append(_payload(origin, chunk))
    return payloads, oversize


def _payload(origin: str, chunk: list[bytes]) -> str:
    return origin + "\n" + b"\n".join(chunk).decode()
