"""HTTP surface against a running gateway (real RabbitMQ, PostgreSQL): auth matrix, error
shapes, probes, metrics, stats and the legacy node/data endpoints."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from tests.conftest import TOKENS, eventually, mqtt_client

ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
READ = {"Authorization": f"Bearer {TOKENS['read']}"}

# (method, path, scope needed, body)
ROUTES: list[tuple[str, str, str, Any]] = [
    ("GET", "/api/nodes", "read", None),
    ("GET", "/api/nodes/online", "read", None),
    ("GET", "/api/nodes/count", "read", None),
    ("GET", "/api/nodes/AABBCCDDEEFF", "read", None),
    ("GET", "/api/nodes/AABBCCDDEEFF/events", "read", None),
    ("GET", "/api/nodes/AABBCCDDEEFF/sensor-data", "read", None),
    ("GET", "/api/nodes/AABBCCDDEEFF/completeness", "read", None),
    ("GET", "/api/sensor-data", "read", None),
    ("GET", "/api/stats", "read", None),
    ("GET", "/api/failed-messages", "read", None),
    ("POST", "/api/nodes", "admin", {"node_id": "NEW-1", "name": "new"}),
    ("PUT", "/api/nodes/AABBCCDDEEFF", "admin", {"name": "Greenhouse 1"}),
    ("POST", "/api/failed-messages/999999/replay", "admin", None),
    ("DELETE", "/api/nodes/GONE-1", "admin", None),
]


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client


async def seed(settings: Settings, gateway: Gateway, node: str = "AABBCCDDEEFF") -> None:
    async with mqtt_client(settings, f"ESP32-{node}") as client:
        await client.publish(
            f"devices/{node}/data",
            orjson.dumps({"temperature": 25.6, "humidity": 65.2, "status": "online"}),
            qos=1,
        )
        await client.publish(
            "devices/MP-1/data", orjson.dumps({"temperature": 20.0, "boot": 1, "seq": 0}), qos=1
        )
        await client.publish(
            "devices/MP-1/data", orjson.dumps({"temperature": 20.1, "boot": 1, "seq": 3}), qos=1
        )
    await eventually(lambda: gateway.metrics.value("rnr_messages_acked_total"), lambda n: n >= 3)


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    code: str = body["error"]["code"]
    return code


async def test_auth_matrix_for_every_route_class(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await seed(settings, gateway)
    await http.post("/api/nodes", json={"node_id": "GONE-1"}, headers=ADMIN)
    rank = {"read": 1, "command": 2, "admin": 3}
    for method, path, needed, body in ROUTES:
        kwargs: dict[str, Any] = {"json": body} if body is not None else {}
        none = await http.request(method, path, **kwargs)
        assert none.status_code == 401 and error_code(none) == "unauthorized", (method, path)
        bad = await http.request(
            method, path, headers={"Authorization": "Bearer nope-nope"}, **kwargs
        )
        assert bad.status_code == 401, (method, path)
        for scope, token in TOKENS.items():
            response = await http.request(
                method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
            if rank[scope] < rank[needed]:
                assert response.status_code == 403, (method, path, scope)
                assert error_code(response) == "forbidden"
            else:
                assert response.status_code not in (401, 403), (method, path, scope, response.text)
                if method != "GET":
                    break  # mutations: once with the weakest scope that is allowed


async def test_probes_metrics_and_stats(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await seed(settings, gateway)
    for path in (
        "/health",
        "/health/live",
        "/health/ready",
        "/health/rabbitmq",
        "/health/mqtt",
        "/health/worker",
    ):
        response = await http.get(path)
        assert response.status_code == 200, (path, response.text)
    health = (await http.get("/health")).json()
    assert health["status"] == "healthy" and health["platform"] == "enterprise_iot"
    assert health["services"]["rabbitmq"]["connected"] is True
    assert health["services"]["rabbitmq"]["consumers"]["sensor_data_enhanced"] >= 1
    assert health["services"]["database"]["connected"] is True
    metrics = (await http.get("/metrics")).text
    for name in (
        "rnr_messages_consumed_total",
        "rnr_messages_stored_total",
        "rnr_ingest_batch_size_bucket",
        "rnr_ingest_latency_seconds_bucket",
        "rnr_dependency_up",
        "rnr_nodes",
        "rnr_ws_clients",
    ):
        assert name in metrics, name
    stats = (await http.get("/api/stats", headers=READ)).json()
    assert set(stats) == {"worker_service", "mqtt_publisher", "rabbitmq_client"}
    assert stats["worker_service"]["messages_processed"] >= 3
    # the seed's field names, each filled from the running gateway
    worker, mqtt, amqp = stats["worker_service"], stats["mqtt_publisher"], stats["rabbitmq_client"]
    assert worker["connected_to_rabbitmq"] is True and worker["worker_pid"] == os.getpid()
    assert worker["node_counts"]["online"] >= 1 and worker["node_counts"]["total"] >= 1
    assert worker["offline_threshold_seconds"] == settings.presence.offline_threshold_s
    assert worker["error_count"] == worker["messages_failed"] and worker["success_rate"] == 100.0
    assert worker["uptime_seconds"] >= 0
    assert mqtt["is_connected"] is True and mqtt["qos_level"] == 1
    assert mqtt["broker"] == f"{settings.mqtt.host}:{settings.mqtt.port}"
    assert mqtt["last_connection"] is not None and mqtt["uptime_seconds"] >= 0
    for key in ("commands_sent", "commands_failed", "failed_commands_count", "pending_publishes"):
        assert mqtt[key] == 0, key
    assert mqtt["success_rate_percent"] == 100.0 and mqtt["connection_attempts"] >= 1
    assert amqp["is_connected"] is True and amqp["consuming"] is True
    assert amqp["reconnect_attempts"] == 0 and amqp["failed_messages_count"] == 0
    assert amqp["heartbeat_interval"] == settings.amqp.heartbeat_s
    assert amqp["socket_timeout"] == settings.amqp.socket_timeout_s
    assert amqp["connection_url"].endswith("/" + settings.amqp.vhost)
    assert "@" not in amqp["connection_url"]  # no credentials
    assert amqp["messages_published"] >= 0


async def test_legacy_shapes_pagination_and_time_ranges(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await seed(settings, gateway)
    nodes = (await http.get("/api/nodes", headers=READ)).json()
    legacy = next(n for n in nodes if n["node_id"] == "AABBCCDDEEFF")
    for key in (
        "id",
        "node_id",
        "name",
        "mac_address",
        "last_seen",
        "message_count",
        "is_active",
        "status",
        "created_at",
    ):
        assert key in legacy
    assert legacy["mac_address"] == "AA:BB:CC:DD:EE:FF"
    assert legacy["is_active"] == "true" and legacy["status"] == "online"
    assert (await http.get("/api/nodes/count", headers=READ)).json() == {"count": 2}
    assert len((await http.get("/api/nodes?limit=1", headers=READ)).json()) == 1
    data = (await http.get("/api/sensor-data?node_id=AABBCCDDEEFF", headers=READ)).json()
    assert data[0]["data"]["temperature"] == 25.6 and set(data[0]) >= {"node_id", "received_at"}
    future = (await http.get("/api/sensor-data?since=2999-01-01T00:00:00Z", headers=READ)).json()
    assert future == []
    bad = await http.get("/api/sensor-data?limit=100000", headers=READ)
    assert bad.status_code == 422 and error_code(bad) == "invalid_request"
    bad_time = await http.get("/api/sensor-data?since=yesterday", headers=READ)
    assert bad_time.status_code == 422
    completeness = (await http.get("/api/nodes/MP-1/completeness", headers=READ)).json()
    assert (completeness["expected"], completeness["received"], completeness["lost"]) == (4, 2, 2)
    missing = await http.get("/api/nodes/NOPE-1", headers=READ)
    assert missing.status_code == 404 and error_code(missing) == "not_found"


async def test_oversize_and_invalid_bodies(http: httpx.AsyncClient) -> None:
    big = await http.post("/api/nodes", content=b"{" + b" " * 20_000 + b"}", headers=ADMIN)
    assert big.status_code == 413 and error_code(big) == "payload_too_large"
    broken = await http.post("/api/nodes", content=b"{nope", headers=ADMIN)
    assert broken.status_code == 422 and error_code(broken) == "invalid_json"
    bad_id = await http.post("/api/nodes", json={"node_id": "bad id!"}, headers=ADMIN)
    assert bad_id.status_code == 422 and error_code(bad_id) == "invalid_node_id"
    created = await http.post("/api/nodes", json={"node_id": "N-2", "name": "two"}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["name"] == "two"
    wrong_type = await http.put("/api/nodes/N-2", json={"is_active": "maybe"}, headers=ADMIN)
    assert wrong_type.status_code == 422


async def test_failed_message_listed_and_replayed(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    async with mqtt_client(settings, "replayer") as client:
        await client.publish("devices/R-1/data", b"{broken", qos=1)
    listed = await eventually(
        lambda: http.get("/api/failed-messages", headers=READ),
        lambda r: len(r.json()) == 1,
    )
    item = listed.json()[0]
    assert (item["reason"], item["body"], item["routing_key"]) == (
        "bad_json",
        "{broken",
        "devices.R-1.data",
    )
    replayed = await http.post(f"/api/failed-messages/{item['id']}/replay", headers=ADMIN)
    assert replayed.status_code == 200, replayed.text
    again = await eventually(
        lambda: http.get("/api/failed-messages", headers=READ),
        lambda r: r.json()[0]["count"] == 2,
    )
    assert again.json()[0]["replayed_at"] is not None
