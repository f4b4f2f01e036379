"""HTTP surface against a running gateway (real RabbitMQ, MQTT plugin, PostgreSQL): auth
matrix, error shapes, probes (healthy, and with a dependency really cut), metrics, stats
and the legacy node/data endpoints with their pagination."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Secret, Settings
from tests.conftest import TOKENS, env_for, eventually, mqtt_client, running
from tests.e2e.tcpproxy import TcpProxy

ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
READ = {"Authorization": f"Bearer {TOKENS['read']}"}
RANK = {"read": 1, "command": 2, "admin": 3}
PROBES = (
    "/health",
    "/health/live",
    "/health/ready",
    "/health/rabbitmq",
    "/health/mqtt",
    "/health/worker",
    "/metrics",
)
NODE = "/api/nodes/AABBCCDDEEFF"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    needed: str  # the scope the route needs
    ok: int  # its status with that scope or a higher one
    body: Any = None


@contextlib.asynccontextmanager
async def client(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gw.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        yield http


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with client(gateway) as http:
        yield http


async def seed(settings: Settings, gateway: Gateway, node: str = "AABBCCDDEEFF") -> None:
    async with mqtt_client(settings, f"ESP32-{node}") as mqtt:
        await mqtt.publish(
            f"devices/{node}/data",
            orjson.dumps({"temperature": 25.6, "humidity": 65.2, "status": "online"}),
            qos=1,
        )
        await mqtt.publish(
            "devices/MP-1/data", orjson.dumps({"temperature": 20.0, "boot": 1, "seq": 0}), qos=1
        )
        await mqtt.publish(
            "devices/MP-1/data", orjson.dumps({"temperature": 20.1, "boot": 1, "seq": 3}), qos=1
        )
    await eventually(lambda: gateway.metrics.value("rnr_messages_acked_total"), lambda n: n >= 3)


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    code: str = body["error"]["code"]
    return code


async def check_scopes(
    http: httpx.AsyncClient, cases: list[Case], tokens: dict[str, str] = TOKENS
) -> None:
    """Each route: 401 without a token and with a wrong one, 403 below the scope it needs,
    its success status from that scope up (a mutation once, with the weakest scope)."""
    for case in cases:
        kwargs: dict[str, Any] = {"json": case.body} if case.body is not None else {}
        none = await http.request(case.method, case.path, **kwargs)
        assert none.status_code == 401 and error_code(none) == "unauthorized", case
        bad = await http.request(
            case.method, case.path, headers={"Authorization": "Bearer nope-nope"}, **kwargs
        )
        assert bad.status_code == 401 and error_code(bad) == "unauthorized", case
        for scope, token in sorted(tokens.items(), key=lambda item: RANK[item[0]]):
            got = await http.request(
                case.method, case.path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
            if RANK[scope] < RANK[case.needed]:
                assert got.status_code == 403 and error_code(got) == "forbidden", (case, scope)
                continue
            assert got.status_code == case.ok, (case, scope, got.text)
            if case.method != "GET":
                break


async def failed_message(settings: Settings, http: httpx.AsyncClient) -> int:
    async with mqtt_client(settings, "breaker") as mqtt:
        await mqtt.publish("devices/R-1/data", b"{broken", qos=1)
    listed = await eventually(
        lambda: http.get("/api/failed-messages", headers=READ), lambda r: len(r.json()) == 1
    )
    failed_id: int = listed.json()[0]["id"]
    return failed_id


async def test_auth_matrix_for_every_route_class(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await seed(settings, gateway)
    failed_id = await failed_message(settings, http)
    for node_id in ("GONE-1", "WAIT-1"):
        await http.post("/api/nodes", json={"node_id": node_id}, headers=ADMIN)
    queued = await http.post("/api/nodes/WAIT-1/actions", json={"action": "PING"}, headers=ADMIN)
    mid = queued.json()["message_id"]  # WAIT-1 has never been online: the command waits
    ping = {"action": "PING"}
    await check_scopes(
        http,
        [
            Case("GET", "/api/nodes", "read", 200),
            Case("GET", "/api/nodes/online", "read", 200),
            Case("GET", "/api/nodes/count", "read", 200),
            Case("GET", NODE, "read", 200),
            Case("GET", f"{NODE}/events", "read", 200),
            Case("GET", f"{NODE}/sensor-data", "read", 200),
            Case("GET", f"{NODE}/completeness", "read", 200),
            Case("GET", f"{NODE}/commands", "read", 200),
            Case("GET", "/api/sensor-data", "read", 200),
            Case("GET", "/api/stats", "read", 200),
            Case("GET", "/api/failed-messages", "read", 200),
            Case("GET", f"/api/commands/{mid}", "read", 200),
            Case("POST", f"{NODE}/actions", "command", 202, ping),
            Case("POST", "/api/esp32/command/AABBCCDDEEFF", "command", 202, ping),
            Case("POST", "/api/esp32/esp32/command/AABBCCDDEEFF", "command", 202, ping),
            Case(
                "POST",
                "/api/commands/broadcast",
                "command",
                202,
                {"node_ids": ["AABBCCDDEEFF"], **ping},
            ),
            Case("POST", f"/api/commands/{mid}/cancel", "command", 200),
            Case("POST", "/api/nodes", "admin", 201, {"node_id": "NEW-1", "name": "new"}),
            Case("PUT", NODE, "admin", 200, {"name": "Greenhouse 1"}),
            Case("POST", f"/api/failed-messages/{failed_id}/replay", "admin", 200),
            Case("DELETE", "/api/nodes/GONE-1", "admin", 200),
        ],
    )
    for path in (*PROBES, "/"):  # open by default (HTTP_OPEN_PROBES), the dashboard always
        assert (await http.get(path)).status_code == 200, path


async def test_closed_probes_need_a_read_token(settings: Settings) -> None:
    closed = replace(settings, http=replace(settings.http, open_probes=False))
    async with running(Gateway(closed)) as gw, client(gw) as http:
        await check_scopes(http, [Case("GET", path, "read", 200) for path in PROBES])
        assert (await http.get("/")).status_code == 200  # the page itself holds no data


async def test_anonymous_scope_over_http_and_websocket(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    anonymous = replace(settings, http=replace(settings.http, anonymous_scope="read"))
    with caplog.at_level(logging.WARNING, logger="rnr_gateway.web.auth"):
        gw = Gateway(anonymous)
    assert "API_ANONYMOUS_SCOPE=read" in caplog.text
    async with running(gw), client(gw) as http:
        assert (await http.get("/api/nodes")).status_code == 200
        assert (await http.get("/api/sensor-data")).status_code == 200
        for method, path, body in (
            ("POST", "/api/nodes/X-1/actions", {"action": "PING"}),
            ("POST", "/api/commands/broadcast", {"action": "PING"}),
            ("POST", "/api/nodes", {"node_id": "A-1"}),
            ("DELETE", "/api/nodes/A-1", None),
        ):
            kwargs: dict[str, Any] = {"json": body} if body is not None else {}
            refused = await http.request(method, path, **kwargs)
            assert refused.status_code == 403 and error_code(refused) == "forbidden", path
        wrong = await http.get("/api/nodes", headers={"Authorization": "Bearer nope-nope"})
        assert wrong.status_code == 401  # a wrong token is refused, not made anonymous
        created = await http.post("/api/nodes", json={"node_id": "A-1"}, headers=ADMIN)
        assert created.status_code == 201  # a token still raises the scope
        async with connect(
            f"ws://127.0.0.1:{gw.http_port}/ws", proxy=None, open_timeout=5
        ) as socket:  # no header and no auth frame: the snapshot comes at once
            first = orjson.loads(await asyncio.wait_for(socket.recv(), 10))
            assert first["type"] == "snapshot"
            assert [n["node_id"] for n in first["nodes"]] == ["A-1"]


async def test_tokens_from_a_file(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# operators\nread:file-read-token\n\nadmin:file-admin-token\n")
    env = env_for(settings) | {"API_TOKENS": "", "API_TOKENS_FILE": str(path)}
    from_file = Settings.from_env(env).http
    assert [scope for scope, _ in from_file.tokens] == ["read", "admin"]
    async with running(Gateway(replace(settings, http=from_file))) as gw, client(gw) as http:
        await check_scopes(
            http,
            [
                Case("GET", "/api/nodes", "read", 200),
                Case("POST", "/api/nodes", "admin", 201, {"node_id": "F-1"}),
                Case("POST", "/api/nodes/F-1/actions", "command", 202, {"action": "PING"}),
            ],
            tokens={"read": "file-read-token", "admin": "file-admin-token"},
        )
        assert (await http.get("/api/nodes", headers=READ)).status_code == 401  # not listed


async def test_probes_metrics_and_stats(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    await seed(settings, gateway)
    for path in PROBES:
        response = await http.get(path)
        assert response.status_code == 200, (path, response.text)
    health = (await http.get("/health")).json()
    assert health["status"] == "healthy" and health["platform"] == "enterprise_iot"
    assert health["down"] == []
    amqp, mqtt = health["services"]["rabbitmq"], health["services"]["mqtt"]
    assert amqp["connected"] is True and amqp["ingest_consuming"] is True
    assert amqp["holds_command_queues"] is True
    assert amqp["consumers"]["sensor_data_enhanced"] >= 1
    assert health["services"]["database"]["connected"] is True
    assert "configured" not in mqtt
    assert mqtt["connected"] is True and mqtt["connection_attempts"] == 1
    assert (mqtt["commands_sent"], mqtt["commands_failed"], mqtt["pending_publishes"]) == (0, 0, 0)
    assert (await http.get("/health/mqtt")).json()["broker"] == mqtt["broker"]
    ready = (await http.get("/health/ready")).json()
    assert ready["checks"] == {"database": True, "rabbitmq": True, "mqtt": True}
    assert ready["down"] == []
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


def via(url: str, port: int) -> str:
    """The URL pointed at a loopback port (credentials and path kept)."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host))


async def cut(http: httpx.AsyncClient, proxy: TcpProxy, name: str) -> dict[str, Any]:
    """Cut one dependency's connections for real; the probes must name it. Returns the
    /health body seen meanwhile; the dependency is restored and the gateway ready again."""
    proxy.refuse = True
    proxy.drop_all()
    ready = await eventually(
        lambda: http.get("/health/ready"), lambda r: r.status_code == 503, within=15
    )
    assert ready.json()["status"] == "unhealthy" and ready.json()["down"] == [name]
    assert ready.json()["checks"][name] is False
    health = await http.get("/health")
    assert health.status_code == 503 and health.json()["down"] == [name]
    body: dict[str, Any] = health.json()
    proxy.refuse = False
    await eventually(lambda: http.get("/health/ready"), lambda r: r.status_code == 200, within=30)
    return body


async def test_probes_answer_503_naming_the_dependency_that_is_down(settings: Settings) -> None:
    amqp_url, db_url = urlsplit(settings.amqp.url.value), urlsplit(settings.db.url.value)
    async with (
        TcpProxy(amqp_url.hostname or "127.0.0.1", amqp_url.port or 5672) as amqp_proxy,
        TcpProxy(settings.mqtt.host, settings.mqtt.port) as mqtt_proxy,
        TcpProxy(db_url.hostname or "127.0.0.1", db_url.port or 5432) as db_proxy,
    ):
        cut_off = replace(
            settings,
            amqp=replace(settings.amqp, url=Secret(via(amqp_url.geturl(), amqp_proxy.listen_port))),
            mqtt=replace(settings.mqtt, host="127.0.0.1", port=mqtt_proxy.listen_port),
            db=replace(settings.db, url=Secret(via(db_url.geturl(), db_proxy.listen_port))),
        )
        async with running(Gateway(cut_off)) as gw, client(gw) as http:
            assert (await http.get("/health/ready")).status_code == 200
            mqtt = (await cut(http, mqtt_proxy, "mqtt"))["services"]["mqtt"]
            assert mqtt["connected"] is False and "configured" not in mqtt
            assert gw.metrics.value("rnr_mqtt_connection_attempts_total") >= 2
            database = (await cut(http, db_proxy, "database"))["services"]["database"]
            assert database == {"connected": False}
            amqp = (await cut(http, amqp_proxy, "rabbitmq"))["services"]["rabbitmq"]
            assert amqp["connected"] is False and amqp["ingest_consuming"] is False
            assert amqp["consumers"]["sensor_data_enhanced"] == 0
            probes = [(await http.get(p)).status_code for p in ("/health/mqtt", "/health/rabbitmq")]
            assert probes == [200, 200]  # both back


async def test_a_gateway_standing_by_for_the_command_queues_is_ready(settings: Settings) -> None:
    async with running(Gateway(settings)) as first, running(Gateway(settings)) as second:
        for gw, holds in ((first, True), (second, False)):
            async with client(gw) as http:
                ready = await http.get("/health/ready")
                assert ready.status_code == 200, ready.text
                amqp = (await http.get("/health/rabbitmq")).json()
                assert amqp["holds_command_queues"] is holds and amqp["ingest_consuming"] is True


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[Any]], float]:
    text = (await http.get("/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def good_bad_duplicate(
    settings: Settings, http: httpx.AsyncClient
) -> dict[tuple[str, frozenset[Any]], float]:
    """Two good readings, one of them sent twice, and one bad message: the samples after."""
    enhanced = orjson.dumps({"temperature": 20.0, "boot": 1, "seq": 0})
    async with mqtt_client(settings, "metrics-node") as mqtt:
        await mqtt.publish("devices/M-1/data", orjson.dumps({"temperature": 21.5}), qos=1)
        await mqtt.publish("devices/M-2/data", enhanced, qos=1)
        await mqtt.publish("devices/M-2/data", enhanced, qos=1)  # the same message again
        await mqtt.publish("devices/M-3/data", b"{broken", qos=1)
    return await eventually(
        lambda: scrape(http), lambda s: sample(s, "rnr_messages_acked_total") >= 4
    )


async def test_metrics_count_stored_failed_duplicate_and_http_requests(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    got = await good_bad_duplicate(settings, http)
    assert sample(got, "rnr_messages_acked_total") == 4
    assert sample(got, "rnr_messages_consumed_total", queue="sensor_data_enhanced") == 4
    assert sample(got, "rnr_messages_duplicate_total") == 1
    assert sample(got, "rnr_messages_failed_total", reason="bad_json") == 1
    failed = [v for (name, _), v in got.items() if name == "rnr_messages_failed_total"]
    assert sum(failed) == 1
    assert sample(got, "rnr_messages_stored_total", kind="reading") >= 2
    before = await scrape(http)
    for _ in range(2):
        assert (await http.get("/api/nodes/NOPE-1", headers=READ)).status_code == 404
    assert (await http.get("/api/nodes", headers=READ)).status_code == 200
    assert (await http.get("/api/nodes")).status_code == 401
    assert (await http.get("/no/such/path")).status_code == 404
    after = await scrape(http)

    def moved(route: str, status: str) -> float:
        labels = {"route": route, "status": status}
        return sample(after, "rnr_http_requests_total", **labels) - sample(
            before, "rnr_http_requests_total", **labels
        )

    assert moved("/api/nodes/{node_id}", "404") == 2
    assert moved("/api/nodes", "200") == 1 and moved("/api/nodes", "401") == 1
    assert moved("unmatched", "404") == 1
    assert moved("/metrics", "200") == 1  # the scrape before this one
    routes = {dict(labels)["route"] for (name, labels) in after if name.startswith("rnr_http")}
    assert not any("NOPE" in r or "such" in r for r in routes)  # templates only


async def test_stored_counter_counts_each_message_once(
    http: httpx.AsyncClient, settings: Settings, db: asyncpg.Connection
) -> None:
    got = await good_bad_duplicate(settings, http)
    rows = await db.fetchval("SELECT count(*) FROM sensor_data")
    assert rows == 2
    assert sample(got, "rnr_messages_stored_total", kind="reading") == rows


async def test_legacy_shapes_and_validation(
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
    future = await http.get("/api/sensor-data?since=2999-01-01T00:00:00Z", headers=READ)
    assert future.json() == [] and "link" not in future.headers
    for query in (
        "limit=100000",
        "since=yesterday",
        "since=2026-01-01T00:00:00",  # no zone
        "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
        "before_id=abc",
        "before_id=0",
        "before_id=999999999",  # names no row
        "kind=nope",
    ):
        bad = await http.get(f"/api/sensor-data?{query}", headers=READ)
        assert bad.status_code == 422 and error_code(bad) == "invalid_request", query
    completeness = (await http.get("/api/nodes/MP-1/completeness", headers=READ)).json()
    assert (completeness["expected"], completeness["received"], completeness["lost"]) == (4, 2, 2)
    missing = await http.get("/api/nodes/NOPE-1", headers=READ)
    assert missing.status_code == 404 and error_code(missing) == "not_found"


async def test_sensor_data_pages_with_a_keyset_cursor(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # n=2 and n=3 share a received_at: the id breaks the tie, in the list and the cursor
    for n, second in enumerate((0, 1, 2, 2, 3)):
        await db.execute(
            "INSERT INTO sensor_data (node_id, data, received_at) VALUES ('P-1', $1::jsonb, $2)",
            orjson.dumps({"n": n}).decode(),
            T0 + timedelta(seconds=second),
        )
    pages: list[list[int]] = []
    url: str | None = "/api/sensor-data?node_id=P-1&limit=2"
    while url is not None:
        page = await http.get(url, headers=READ)
        assert page.status_code == 200, page.text
        rows = page.json()
        pages.append([row["data"]["n"] for row in rows])
        url = None
        if "x-next-before-id" in page.headers:
            assert page.headers["x-next-before-id"] == str(rows[-1]["id"])
            link = page.headers["link"]
            assert link.startswith("</api/sensor-data?") and link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
    assert pages == [[4, 3], [2, 1], [0]]
    ranged = await http.get(
        "/api/nodes/P-1/sensor-data?since=2026-01-01T00:00:01Z&until=2026-01-01T00:00:03Z",
        headers=READ,
    )
    assert [row["data"]["n"] for row in ranged.json()] == [3, 2, 1]


async def test_node_events_by_time_range_and_online_nodes_bounded(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings, db: asyncpg.Connection
) -> None:
    for minute in range(5):
        await db.execute(
            "INSERT INTO node_events (node_id, from_status, to_status, reason, at)"
            " VALUES ('E-1', 'offline', 'online', 'message', $1)",
            T0 + timedelta(minutes=minute),
        )
    events = "/api/nodes/E-1/events"
    ranged = await http.get(
        f"{events}?since=2026-01-01T00:01:00Z&until=2026-01-01T00:04:00Z", headers=READ
    )
    assert [e["at"][11:16] for e in ranged.json()] == ["00:03", "00:02", "00:01"]
    newest = await http.get(f"{events}?limit=2", headers=READ)
    assert [e["at"][11:16] for e in newest.json()] == ["00:04", "00:03"]
    for query in ("limit=0", "limit=5000", "since=soon", "until=2026-01-01T00:00:00"):
        bad = await http.get(f"{events}?{query}", headers=READ)
        assert bad.status_code == 422 and error_code(bad) == "invalid_request", query
    await seed(settings, gateway)
    online = "/api/nodes/online"
    await eventually(lambda: http.get(online, headers=READ), lambda r: len(r.json()) == 2)
    first = (await http.get(f"{online}?limit=1", headers=READ)).json()
    second = (await http.get(f"{online}?limit=1&offset=1", headers=READ)).json()
    assert [n["node_id"] for n in first + second] == ["AABBCCDDEEFF", "MP-1"]
    for query in ("limit=0", "limit=10001", "limit=x", "offset=-1"):
        bad = await http.get(f"{online}?{query}", headers=READ)
        assert bad.status_code == 422 and error_code(bad) == "invalid_request", query


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
    failed_id = await failed_message(settings, http)
    item = (await http.get("/api/failed-messages", headers=READ)).json()[0]
    assert (item["id"], item["reason"], item["body"], item["routing_key"]) == (
        failed_id,
        "bad_json",
        "{broken",
        "devices.R-1.data",
    )
    replayed = await http.post(f"/api/failed-messages/{failed_id}/replay", headers=ADMIN)
    assert replayed.status_code == 200, replayed.text
    again = await eventually(
        lambda: http.get("/api/failed-messages", headers=READ),
        lambda r: r.json()[0]["count"] == 2,
    )
    assert again.json()[0]["replayed_at"] is not None
