"""Probes, Prometheus metrics and the seed's JSON stats."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..db import TRANSIENT
from .common import gateway, json_response, require

if TYPE_CHECKING:
    from ..gateway import Gateway


def _open(request: Request) -> None:
    if not gateway(request).settings.http.open_probes:
        require(request, "read")


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def _database_ok(request: Request) -> bool:
    db = gateway(request).db
    try:
        async with asyncio.timeout(2):
            async with db.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except TRANSIENT:
        return False
    return True


def rabbitmq_state(request: Request) -> dict[str, Any]:
    return rabbitmq_state_of(gateway(request))


def rabbitmq_state_of(gw: Gateway) -> dict[str, Any]:
    m, amqp = gw.metrics, gw.amqp
    consumers = {q: int(m.value("rnr_amqp_consumers", {"queue": q})) for q in gw.consumed_queues}
    connected = amqp.connected.is_set()
    target = urlsplit(amqp.settings.url.value)
    # the shared (ingest) queues must have this process's consumers; the exclusive command
    # queues need not: a gateway standing by while another one holds them is still ready
    ingest = [c.queue for c in amqp.consumers if not c.exclusive]
    return {
        "connected": connected,
        "ingest_consuming": connected and all(consumers.get(q, 0) >= 1 for q in ingest),
        "holds_command_queues": amqp.exclusive,
        "reconnects": int(m.value("rnr_reconnects_total", {"system": "rabbitmq"})),
        "outages": int(m.value("rnr_outages_total", {"system": "rabbitmq"})),
        "consumers": consumers,
        "confirms_pending": int(m.value("rnr_amqp_confirms_pending")),
        # the seed's get_connection_stats() fields
        "is_connected": connected,
        "reconnect_attempts": amqp.reconnect_attempts,
        "messages_published": int(m.total(m.published)),
        "failed_messages_count": amqp.publish_failures,
        "consuming": connected and any(consumers.values()),
        "heartbeat_interval": amqp.settings.heartbeat_s,
        "socket_timeout": amqp.settings.socket_timeout_s,
        "connection_url": f"{target.hostname}:{target.port or 5672}{target.path or '/'}",
    }


def mqtt_state(request: Request) -> dict[str, Any]:
    """The MQTT command client's own stats (connection, attempts, publishes, pending)."""
    return gateway(request).mqtt.stats()


def worker_state(request: Request) -> dict[str, Any]:
    return worker_state_of(gateway(request))


def worker_state_of(gw: Gateway) -> dict[str, Any]:
    m = gw.metrics
    online, offline = gw.presence.counts()
    stored = int(
        sum(
            m.value("rnr_messages_stored_total", {"kind": k})
            for k in ("reading", "event", "heartbeat", "ping", "status")
        )
    )
    failed = int(gw.failed_total())
    return {
        "running": gw.started.is_set(),
        "uptime_seconds": round(time.monotonic() - gw.started_monotonic, 1),
        "messages_processed": int(m.value("rnr_messages_acked_total")),
        "messages_stored": stored,
        "messages_duplicate": int(m.value("rnr_messages_duplicate_total")),
        "messages_failed": failed,
        "backlog": gw.ingest.backlog,
        "database_up": gw.db.up,
        "nodes_online": online,
        "nodes_offline": offline,
        # the seed's get_worker_stats() fields
        "error_count": failed,
        "success_rate": round(100.0 * stored / (stored + failed), 2) if stored + failed else 100.0,
        "connected_to_rabbitmq": gw.amqp.connected.is_set(),
        "node_counts": {"online": online, "offline": offline, "total": online + offline},
        "offline_threshold_seconds": gw.settings.presence.offline_threshold_s,
        "worker_pid": os.getpid(),
    }


def _probe(ok: bool, **details: Any) -> Response:
    body = {"status": "healthy" if ok else "unhealthy", "timestamp": _now(), **details}
    return json_response(body, status=200 if ok else 503)


async def _checks(request: Request) -> tuple[dict[str, bool], dict[str, Any], dict[str, Any]]:
    """Whether each dependency is usable, with the RabbitMQ and MQTT states behind it."""
    amqp, mqtt = rabbitmq_state(request), mqtt_state(request)
    checks = {
        "database": await _database_ok(request),
        "rabbitmq": amqp["ingest_consuming"],
        "mqtt": mqtt["connected"],
    }
    return checks, amqp, mqtt


def _down(checks: dict[str, bool]) -> list[str]:
    return [name for name, ok in checks.items() if not ok]


async def health(request: Request) -> Response:
    """Legacy shape (the seed's ``status`` and ``platform``), one object per service."""
    _open(request)
    checks, amqp, mqtt = await _checks(request)
    return _probe(
        all(checks.values()),
        platform="enterprise_iot",
        down=_down(checks),
        services={
            "rabbitmq": amqp,
            "mqtt": mqtt,
            "database": {"connected": checks["database"]},
            "worker": worker_state(request),
        },
    )


async def live(request: Request) -> Response:
    _open(request)
    return json_response({"status": "alive", "timestamp": _now()})


async def ready(request: Request) -> Response:
    """200 when PostgreSQL answers, the ingest consumers exist and MQTT is connected."""
    _open(request)
    checks, _, _ = await _checks(request)
    return _probe(all(checks.values()), checks=checks, down=_down(checks))


async def health_rabbitmq(request: Request) -> Response:
    _open(request)
    state = rabbitmq_state(request)
    return _probe(state["ingest_consuming"], **state)


async def health_mqtt(request: Request) -> Response:
    _open(request)
    state = mqtt_state(request)
    return _probe(state["connected"], **state)


async def health_worker(request: Request) -> Response:
    _open(request)
    state = worker_state(request)
    return _probe(state["running"] and state["database_up"], **state)


async def metrics(request: Request) -> Response:
    _open(request)
    return Response(gateway(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def stats(request: Request) -> Response:
    require(request, "read")
    return json_response(gateway(request).stats())


routes = [
    Route("/health", health),
    Route("/health/live", live),
    Route("/health/ready", ready),
    Route("/health/rabbitmq", health_rabbitmq),
    Route("/health/mqtt", health_mqtt),
    Route("/health/worker", health_worker),
    Route("/metrics", metrics),
    Route("/api/stats", stats),
]
