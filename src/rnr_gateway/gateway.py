"""The Gateway owns every resource and one TaskGroup; shutdown is staged with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from . import topology
from .amqp import AMQP_FAILURE, Amqp
from .amqp_exclusive import Consumer
from .broadcast import Hub
from .commands import Commands
from .db import TRANSIENT, Database, pending_migrations
from .errors import GatewayError
from .ingest import Ingest
from .metrics import Metrics
from .mqtt import Mqtt
from .presence import Presence, Transition
from .relay import Relay
from .retention import Retention
from .settings import Settings
from .store import Accepted
from .web.app import bind, build_app, make_server
from .web.auth import Authenticator
from .web.health import rabbitmq_state_of, worker_state_of

log = logging.getLogger(__name__)
INGEST_QUEUES = (topology.SENSOR_QUEUE, topology.STATUS_QUEUE, topology.FAILED_QUEUE)
STATS_INTERVAL_S = 5.0
EXTRAS_STOP_S = 5.0  # for the extras to end at a stop, then for what they sent to be ingested
PUSHED_KINDS = frozenset(("reading", "event"))
SNAPSHOT = (
    "SELECT n.node_id, n.name, n.last_seen, r.data::text AS data, r.received_at"
    " FROM nodes n LEFT JOIN LATERAL (SELECT data, received_at FROM sensor_data s"
    "  WHERE s.node_id = n.node_id AND s.kind = 'reading'"
    "  ORDER BY s.received_at DESC LIMIT 1) r ON true ORDER BY n.node_id"
)
Extra = Callable[["Gateway"], Awaitable[None]]


class MqttState(Protocol):
    connected: asyncio.Event


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        extras: Mapping[str, Extra] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.extras = dict(extras or {})
        self.db = Database(settings.db, self.metrics)
        self.hub = Hub(self.metrics)
        self.auth = Authenticator(settings.http)
        self.presence = Presence(settings.presence, self.db, self.metrics, clock)
        self.presence.add_listener(self._push_transition)
        self.presence.backlog = self._ingest_backlog
        self.ingest = Ingest(
            settings.ingest,
            self.db,
            self.metrics,
            on_stored=[self.presence.on_stored, self._push_messages],
        )
        self.consumed_queues: tuple[str, ...] = INGEST_QUEUES
        self.amqp = Amqp(
            settings.amqp,
            self.metrics,
            [Consumer(q, partial(self.ingest.submit, q)) for q in INGEST_QUEUES],
        )
        self.mqtt = Mqtt(settings.mqtt, self.metrics)
        if same_broker(settings):
            # one broker behind both (the MQTT plugin): when either protocol gets through
            # again, the other stops waiting out its backoff
            self.amqp.on_restored.append(self.mqtt.retry_now)
            self.mqtt.on_restored.append(self.amqp.retry_now)
        # with other gateways on the vhost, their stored readings and command transitions
        # reach this one's WebSocket clients too (and this one's theirs)
        self.relay = Relay(
            self.db,
            self.metrics,
            self.hub.publish,
            partial(self.amqp.shared, topology.SENSOR_QUEUE),
        )
        self.commands = Commands(
            settings, self.db, self.amqp, self.mqtt, self.metrics, self.presence, self._push
        )
        self.amqp.consumers += tuple(self.commands.consumers())
        self.consumed_queues += tuple(c.queue for c in self.commands.consumers())
        self.ingest.on_stored.append(self.commands.on_stored)
        self.retention = Retention(settings.retention, self.db, self.metrics)
        self.app = build_app(self)
        self._server = make_server(
            self.app, settings.shutdown_timeout_s * 0.2, settings.http.ws_compression
        )
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self.started_monotonic = time.monotonic()
        self.http_port: int | None = None

    def request_stop(self) -> None:
        """Ask for a staged shutdown (signals in ``__main__`` call this)."""
        self._stop.set()

    @property
    def stopping(self) -> asyncio.Event:
        """Set once a stop is requested: extras (the built-in simulator) end when it is."""
        return self._stop

    async def run(self) -> None:
        sock = bind(self.settings.http.host, self.settings.http.port)
        self.http_port = sock.getsockname()[1]
        with sock:
            async with self.db:
                await self._check_schema()
                await self.presence.load()
                async with self.amqp, self.mqtt, asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self.amqp.run(), name="amqp"),
                        tg.create_task(self.ingest.run(), name="ingest"),
                        tg.create_task(self.presence.run(), name="presence"),
                        tg.create_task(self.mqtt.run(), name="mqtt"),
                        tg.create_task(self.commands.run(), name="commands"),
                        tg.create_task(self._stats_loop(), name="stats"),
                        tg.create_task(self.relay.run(), name="relay"),
                        tg.create_task(self.retention.run(), name="retention"),
                    ]
                    http = tg.create_task(self._server.serve(sockets=[sock]), name="http")
                    extras = [
                        tg.create_task(_logged(name, extra(self)), name=name)
                        for name, extra in self.extras.items()
                    ]
                    self.started.set()
                    log.info(
                        "gateway running: consuming %s; HTTP on http://%s:%d/",
                        ", ".join(INGEST_QUEUES),
                        self.settings.http.host,
                        self.http_port,
                    )
                    await self._stop.wait()
                    await self._stop_extras(extras)
                    await self._shutdown(http)
                    for task in tasks:
                        task.cancel()
        log.info("gateway stopped")

    async def _check_schema(self) -> None:
        async with self.db.pool.acquire() as conn:
            pending = await pending_migrations(conn)
        if pending:
            raise GatewayError(
                f"database has {len(pending)} pending migration(s) ({', '.join(pending)}); "
                "run `rnr-gateway migrate` first"
            )

    async def _stop_extras(self, extras: list[asyncio.Task[None]]) -> None:
        """Extras end first: the built-in simulator is a source of what ingest consumes.
        What they sent last (simulated nodes saying they go offline) is ingested before
        the consumers stop, so nothing is left in the broker's queues. Bounded."""
        if not extras:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXTRAS_STOP_S
        log.info("stopping: %s first", ", ".join(task.get_name() for task in extras))
        _, pending = await asyncio.wait(extras, timeout=EXTRAS_STOP_S)
        for task in pending:
            task.cancel()
        while loop.time() < deadline:  # the broker's count: polled, there is no event for it
            if not await self._ingest_backlog():
                return
            await asyncio.sleep(0.05)

    async def _shutdown(self, http: asyncio.Task[None]) -> None:
        """Stop intake → flush batches and ack → close WebSockets → disconnect → close pool."""
        budget = self.settings.shutdown_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        log.info("stopping: cancelling consumers")
        self.retention.request_stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, budget * 0.2)):
                await self.amqp.stop_consuming()
        log.info("stopping: flushing %d buffered deliveries", self.ingest.backlog)
        if not await self.ingest.drain(max(0.1, deadline - loop.time() - budget * 0.2)):
            log.warning(
                "shutdown deadline passed with deliveries unacked; the broker redelivers them"
            )
        self.ingest.request_stop()
        if not await self.commands.drain(max(0.1, deadline - loop.time() - budget * 0.2)):
            log.warning("shutdown deadline passed with commands unsettled; the outbox keeps them")
        self.presence.request_stop()
        with contextlib.suppress(TimeoutError, GatewayError):
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await self.presence.flush()
        log.info(
            "stopping: closing %d WebSocket clients and the HTTP server", len(self.hub.clients)
        )
        self.hub.close_all()
        self._server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(http), timeout=max(0.5, deadline - loop.time()))
        self.mqtt.request_stop()
        self.amqp.request_stop()

    async def _ingest_backlog(self) -> int:
        """Messages the broker still holds for ingest (0 when it cannot tell now)."""
        try:
            async with asyncio.timeout(self.settings.amqp.socket_timeout_s):
                return await self.amqp.ready((topology.SENSOR_QUEUE, topology.STATUS_QUEUE))
        except AMQP_FAILURE as exc:  # (GatewayError among them)
            log.debug("ingest backlog unknown: %s", exc)
            return 0

    # -- events ------------------------------------------------------------------------
    def _push(self, event: dict[str, Any]) -> None:
        """A committed event: to this gateway's WebSocket clients and the other gateways'."""
        self.hub.publish(event)
        self.relay.share(event)

    def _push_messages(self, rows: Sequence[Accepted]) -> None:
        if not self.hub.clients and not self.relay.sharing():
            return
        for row in rows:
            m = row.message
            if m.kind in PUSHED_KINDS:
                self._push(
                    {
                        "type": "sensor_data",
                        "node_id": m.node_id,
                        "data": m.data,
                        "kind": m.kind,
                        "timestamp": row.received_at.isoformat(),
                    }
                )

    def _push_transition(self, t: Transition) -> None:
        self.hub.publish(
            {
                "type": "node_status",
                "node_id": t.node_id,
                "status": t.status,
                "reason": t.reason,
                "timestamp": t.at_datetime.isoformat(),
            }
        )

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            if self.hub.clients:
                self.hub.publish(
                    {
                        "type": "stats",
                        "stats": self.stats(),
                        "timestamp": datetime.now(UTC).isoformat(),
                    }
                )

    # -- views -------------------------------------------------------------------------
    def failed_total(self) -> float:
        total = 0.0
        for metric in self.metrics.failed.collect():
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total

    def stats(self) -> dict[str, Any]:
        """The seed's three stats objects (with its field names), from real counters."""
        return {
            "worker_service": worker_state_of(self),
            "mqtt_publisher": {
                **self.mqtt.stats(),
                # false on a gateway standing by while another one sends the commands
                "dispatching_commands": self.commands.active.is_set(),
            },
            "rabbitmq_client": rabbitmq_state_of(self),
        }

    async def snapshot(self) -> dict[str, Any]:
        """Every node with its status and latest reading, for a new WebSocket client.

        With PostgreSQL down it still answers, from presence alone (no names, no readings).
        """
        try:
            rows: Sequence[Mapping[str, Any]] = [
                dict(r) for r in await self.db.pool.fetch(SNAPSHOT, timeout=5)
            ]
        except TRANSIENT:
            rows = [
                {"node_id": n, "name": None, "last_seen": None, "data": None, "received_at": None}
                for n in sorted(self.presence.nodes)
            ]
        nodes = [
            {
                "node_id": r["node_id"],
                "name": r["name"],
                "status": self.presence.status(r["node_id"]),
                "last_seen": r["last_seen"].isoformat() if r["last_seen"] else None,
                "data": orjson.loads(r["data"]) if r["data"] else None,
                "data_received_at": r["received_at"].isoformat() if r["received_at"] else None,
            }
            for r in rows
        ]
        return {"type": "snapshot", "nodes": nodes, "timestamp": datetime.now(UTC).isoformat()}


async def _logged(name: str, work: Awaitable[None]) -> None:
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("task %s crashed", name)
        raise


LOOPBACK_NAMES = {"localhost": "127.0.0.1", "::1": "127.0.0.1"}


def same_broker(settings: Settings) -> bool:
    """Whether AMQP and MQTT go to the same host (RabbitMQ with its MQTT plugin)."""
    amqp_host = urlsplit(settings.amqp.url.value).hostname or "localhost"
    hosts = {LOOPBACK_NAMES.get(h, h) for h in (amqp_host, settings.mqtt.host)}
    return len(hosts) == 1
