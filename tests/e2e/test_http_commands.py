"""Command endpoints over HTTP with a real node (MQTT) behind the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from tests.conftest import TOKENS, eventually, running
from tests.e2e.command_node import TestNode, fast

COMMAND = {"Authorization": f"Bearer {TOKENS['command']}"}
READ = {"Authorization": f"Bearer {TOKENS['read']}"}


@pytest.fixture
async def gw(settings: Settings) -> AsyncIterator[Gateway]:
    async with running(Gateway(fast(settings))) as gateway:
        yield gateway


@pytest.fixture
async def http(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gw.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield client


async def test_legacy_action_body_to_executed_over_http(
    gw: Gateway, http: httpx.AsyncClient
) -> None:
    node = TestNode(gw.settings, "AABBCCDDEEFF")
    async with node.connected(gw):
        sent = await http.post(
            "/api/nodes/AABBCCDDEEFF/actions",
            json={
                "action": "RELAY_CONTROL",
                "relay": 3,
                "state": True,
                "extra": "kept",
                "priority": 7,
            },
            headers=COMMAND,
        )
        assert sent.status_code == 202, sent.text
        body = sent.json()
        assert body["message"] == "Action RELAY_CONTROL sent to node AABBCCDDEEFF"
        mid = body["message_id"]
        done = await eventually(
            lambda: http.get(f"/api/commands/{mid}", headers=READ),
            lambda r: r.json()["status"] == "executed",
        )
        record = done.json()
        assert [e["status"] for e in record["events"]][-3:] == ["sent", "received", "executed"]
        got = node.log.received[0]
        assert (got["action"], got["relay"], got["state"], got["extra"], got["priority"]) == (
            "RELAY_CONTROL",
            3,
            True,
            "kept",
            7,
        )
        legacy = await http.post(
            "/api/esp32/command/AABBCCDDEEFF", json={"action": "REBOOT"}, headers=COMMAND
        )
        assert legacy.status_code == 202
        seed_path = await http.post(
            "/api/esp32/esp32/command/AABBCCDDEEFF", json={"action": "PING"}, headers=COMMAND
        )
        assert seed_path.status_code == 202
        listed = (await http.get("/api/nodes/AABBCCDDEEFF/commands", headers=READ)).json()
        assert {c["message_id"] for c in listed} >= {
            mid,
            legacy.json()["message_id"],
            seed_path.json()["message_id"],
        }
        # the MQTT probe reports the command client's own counters
        probe = await eventually(
            lambda: http.get("/health/mqtt"), lambda r: r.json()["commands_sent"] >= 3
        )
        mqtt = probe.json()
        assert probe.status_code == 200 and mqtt["connected"] is True
        assert (mqtt["commands_failed"], mqtt["pending_publishes"]) == (0, 0)


async def test_command_errors_and_scopes(http: httpx.AsyncClient, gw: Gateway) -> None:
    readonly = await http.post("/api/nodes/X-1/actions", json={"action": "REBOOT"}, headers=READ)
    assert readonly.status_code == 403
    unknown = await http.post(
        "/api/nodes/NOPE-1/actions", json={"action": "REBOOT"}, headers=COMMAND
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "node_not_found"
    await http.post(
        "/api/nodes",
        json={"node_id": "N-1"},
        headers={"Authorization": f"Bearer {TOKENS['admin']}"},
    )
    invalid = await http.post(
        "/api/nodes/N-1/actions",
        json={"action": "RELAY_CONTROL", "relay": 9, "state": True},
        headers=COMMAND,
    )
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_command"
    assert "relay" in invalid.json()["error"]["message"]
    big = await http.post(
        "/api/nodes/N-1/actions", json={"action": "PING", "pad": "x" * 11_000}, headers=COMMAND
    )
    assert big.status_code == 413
    missing = await http.get("/api/commands/nope", headers=READ)
    assert missing.status_code == 404
    queued = await http.post(
        "/api/nodes/N-1/actions", json={"action": "PING"}, headers=COMMAND
    )  # N-1 is offline: it waits
    mid = queued.json()["message_id"]
    cancelled = await http.post(f"/api/commands/{mid}/cancel", headers=COMMAND)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = await http.post(f"/api/commands/{mid}/cancel", headers=COMMAND)
    assert again.status_code == 409


async def test_broadcast_over_http(http: httpx.AsyncClient) -> None:
    admin = {"Authorization": f"Bearer {TOKENS['admin']}"}
    for i in range(3):
        await http.post("/api/nodes", json={"node_id": f"B-{i}"}, headers=admin)
    sent = await http.post(
        "/api/commands/broadcast",
        json={"node_ids": "all", "action": "STATUS_REQUEST", "ttl_s": 60},
        headers=COMMAND,
    )
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert body["count"] == 3 and {c["node_id"] for c in body["commands"]} == {"B-0", "B-1", "B-2"}
    some = await http.post(
        "/api/commands/broadcast",
        json={"node_ids": ["B-1"], "command": {"action": "PING"}},
        headers=COMMAND,
    )
    assert some.json()["count"] == 1
    unsaid = await http.post("/api/commands/broadcast", json={"action": "REBOOT"}, headers=COMMAND)
    assert unsaid.status_code == 422 and "node_ids" in unsaid.json()["error"]["message"]
    for i in range(3):  # refused before anything was created
        listed = await http.get(f"/api/nodes/B-{i}/commands", headers=COMMAND)
        actions = {c["action"] for c in listed.json()}
        assert "STATUS_REQUEST" in actions and "REBOOT" not in actions
