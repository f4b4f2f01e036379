"""MQTT in → rows out, through the real MQTT plugin, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from tests.conftest import eventually, mqtt_client

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "legacy-payloads.json"
LEGACY: dict[str, Any] = json.loads(FIXTURES.read_text()) if FIXTURES.exists() else {}

# Forms of PROTOCOL §3.1 (also in ../shared/fixtures/legacy-payloads.json)
FORMS: dict[str, tuple[dict[str, Any], str]] = {
    "A_full_reading": (
        {
            "timestamp": "14:30:25",
            "temperature": 25.6,
            "humidity": 65.2,
            "gas_sensor": 1234,
            "status": "online",
            "servo_angle": 90,
            "light_state": False,
            "uptime": 123456,
            "wifi_rssi": -45,
        },
        "reading",
    ),
    "B_minimal_reading": (
        {
            "timestamp": "2026-11-27 14:30:25",
            "temperature": 22.4,
            "humidity": 48.9,
            "status": "online",
            "uptime": 3600123,
            "free_heap": 201344,
            "wifi_rssi": -61,
        },
        "reading",
    ),
    "C_heartbeat": ({"type": "heartbeat", "status": "online", "uptime": 99000}, "heartbeat"),
    "D_status_event": (
        {
            "timestamp": "unknown",
            "status": "relay3_on",
            "free_heap": 198000,
            "wifi_rssi": -52,
            "signal_strength": 69,
        },
        "event",
    ),
    "E_test_ping": ({"test": "ping"}, "ping"),
    "F_temperature_only": ({"temperature": 23.9, "timestamp": 8123456}, "reading"),
}


async def test_every_legacy_form_and_enhanced_become_rows(
    gateway: Gateway, settings: Settings, db: asyncpg.Connection
) -> None:
    node = "AABBCCDDEEFF"
    forms = dict(FORMS)
    for name, body in LEGACY.get("forms", {}).items():  # the shared fixture file, verbatim
        forms[f"fixture_{name}"] = (body, "")
    async with mqtt_client(settings, f"ESP32-{node}") as client:
        for body, _ in forms.values():
            await client.publish(f"devices/{node}/data", orjson.dumps(body), qos=1)
        await client.publish(f"devices/{node}/status", b"offline", qos=1)  # G: bare LWT
        enhanced = {"temperature": 20.5, "boot": 3, "seq": 7, "ts": 1764280000.5, "fw": "1.2.0"}
        await client.publish("devices/MP-0001/data", orjson.dumps(enhanced), qos=1)

    expected = len(forms) + 2
    rows = await eventually(
        lambda: db.fetch("SELECT node_id, kind, data, boot, seq, ts FROM sensor_data ORDER BY id"),
        lambda r: len(r) >= expected,
    )
    assert len(rows) == expected
    by_data = {json.dumps(json.loads(r["data"]), sort_keys=True): r for r in rows}
    for name, (body, kind) in FORMS.items():
        row = by_data[json.dumps(body, sort_keys=True)]
        assert row["kind"] == kind, name
        assert row["node_id"] == node
    status = [r for r in rows if r["kind"] == "status"]
    assert [json.loads(r["data"]) for r in status] == [{"status": "offline"}]
    mp = [r for r in rows if r["node_id"] == "MP-0001"]
    assert [(r["boot"], r["seq"], r["ts"]) for r in mp] == [(3, 7, 1764280000.5)]
    nodes = {r["node_id"]: r for r in await db.fetch("SELECT * FROM nodes")}
    assert nodes[node]["mac_address"] == "AA:BB:CC:DD:EE:FF"
    assert nodes[node]["message_count"] == expected - 1
    assert nodes[node]["status"] == "offline"  # the LWT came last
    assert nodes["MP-0001"]["firmware"] == "1.2.0"
    assert await db.fetchval("SELECT count(*) FROM failed_messages") == 0


async def test_duplicate_enhanced_messages_are_stored_once(
    gateway: Gateway, settings: Settings, db: asyncpg.Connection
) -> None:
    body = orjson.dumps({"temperature": 21.0, "boot": 1, "seq": 42})
    async with mqtt_client(settings, "dup-node") as client:
        for _ in range(3):
            await client.publish("devices/DUP-1/data", body, qos=1)
        await client.publish(
            "devices/DUP-1/data", orjson.dumps({"temperature": 1, "boot": 1, "seq": 43}), qos=1
        )
    await eventually(lambda: gateway.metrics.value("rnr_messages_acked_total"), lambda n: n >= 4)
    rows = await db.fetch("SELECT seq FROM sensor_data WHERE node_id = 'DUP-1' ORDER BY seq")
    assert [r["seq"] for r in rows] == [42, 43]
    assert gateway.metrics.value("rnr_messages_duplicate_total") == 2


async def test_malformed_message_between_valid_ones_is_recorded_and_does_not_block(
    gateway: Gateway, settings: Settings, db: asyncpg.Connection
) -> None:
    bad = [
        ("devices/BAD-1/data", b"{not json"),
        ("devices/BAD-1/data", b"[1, 2, 3]"),
        ("devices/BAD-1/data", orjson.dumps({"temperature": 1, "seq": "x", "boot": 1})),
        ("devices/BAD-1/data", orjson.dumps({"temperature": 1, "node_id": "OTHER"})),
        ("devices/BAD-1/data", b'{"temperature": "\\u0000"}'),
        ("devices/bad node!/data", orjson.dumps({"temperature": 1})),
        ("devices/bad.node/data", orjson.dumps({"temperature": 2})),
    ]
    async with mqtt_client(settings, "mixed") as client:
        for i, (topic, body) in enumerate(bad):
            await client.publish("devices/OK-1/data", orjson.dumps({"temperature": i}), qos=1)
            await client.publish(topic, body, qos=1)
        await client.publish("devices/OK-1/data", orjson.dumps({"temperature": 99}), qos=1)

    failed = await eventually(
        lambda: db.fetch("SELECT routing_key, reason, body FROM failed_messages ORDER BY id"),
        lambda r: len(r) >= len(bad),
    )
    reasons = sorted(r["reason"] for r in failed)
    assert reasons == sorted(
        [
            "bad_json",
            "wrong_type",
            "wrong_type",
            "node_id_mismatch",
            "bad_json",
            "bad_node_id",
            "unroutable",
        ]
    )
    assert {bytes(r["body"]) for r in failed} == {body for _, body in bad}
    ok = await eventually(
        lambda: db.fetchval("SELECT count(*) FROM sensor_data WHERE node_id = 'OK-1'"),
        lambda n: n >= len(bad) + 1,
    )
    assert ok == len(bad) + 1
    assert await db.fetchval("SELECT count(*) FROM sensor_data WHERE node_id <> 'OK-1'") == 0


async def test_nul_characters_in_routing_key_and_headers_are_recorded_not_fatal(
    gateway: Gateway, settings: Settings, db: asyncpg.Connection
) -> None:
    """PostgreSQL's text and jsonb refuse NUL: another AMQP producer's message with one in
    its routing key or headers is still recorded with its reason, and ingest goes on."""
    connection = await aio_pika.connect(settings.amqp.url.value, timeout=5)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("iot_data")
        bad_key = aio_pika.Message(b'{"temperature": 1}', delivery_mode=2)
        await exchange.publish(bad_key, "devices.A\x00B.data")
        bad_header = aio_pika.Message(b"{nope", headers={"note": "x\x00y"}, delivery_mode=2)
        await exchange.publish(bad_header, "devices.NUL-OK.data")
        await exchange.publish(aio_pika.Message(b'{"temperature": 2}'), "devices.NUL-OK.data")
    failed = await eventually(
        lambda: db.fetch("SELECT routing_key, headers, reason FROM failed_messages ORDER BY id"),
        lambda rows: len(rows) >= 2,
    )
    assert sorted((r["routing_key"], r["reason"]) for r in failed) == [
        ("devices.A\ufffdB.data", "bad_node_id"),
        ("devices.NUL-OK.data", "bad_json"),
    ]
    assert any(orjson.loads(r["headers"]).get("note") == "x\ufffdy" for r in failed)
    stored = await eventually(
        lambda: db.fetchval("SELECT count(*) FROM sensor_data WHERE node_id = 'NUL-OK'"), bool
    )
    assert stored == 1 and gateway.started.is_set()


async def test_a_burst_of_bad_messages_is_counted_and_logged_once_per_batch(
    gateway: Gateway,
    settings: Settings,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rnr_gateway.ingest")
    burst = 200
    async with mqtt_client(settings, "flood") as client:
        for i in range(burst):
            await client.publish(f"devices/FLOOD-{i % 5}/data", b"{not json %d" % i, qos=0)
    await eventually(
        lambda: db.fetchval("SELECT coalesce(sum(count), 0) FROM failed_messages"),
        lambda n: n >= burst,
    )
    await eventually(
        lambda: gateway.metrics.value("rnr_messages_failed_total", {"reason": "bad_json"}),
        lambda n: n >= burst,
    )
    lines = [r.getMessage() for r in caplog.records if "recorded as failed" in r.getMessage()]
    # every failed message is in exactly one line: "N messages ..." or "message on ..."
    logged = sum(int(line.split()[0]) if line[0].isdigit() else 1 for line in lines)
    assert logged == burst
    assert len(lines) < burst  # batches of them share a line
    assert all("bad_json" in line for line in lines)
