"""Failed messages over HTTP, the edges (the happy path is in test_http.py): a body that
is not text is listed as hex, the list filters by reason, and a replay that cannot be
done says why instead of publishing anything."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from rnr_gateway import topology
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from rnr_gateway.store import MAX_FAILED_BODY
from tests.conftest import eventually, mqtt_client
from tests.e2e.test_http import ADMIN, READ, client, error_code

BINARY = b"\xff\xfe\x00binary"
HUGE = b'{"temperature": 1, "pad": "' + b"x" * 70_000 + b'"}'  # over the 64 KiB payload cap


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with client(gateway) as http:
        yield http


async def recorded(settings: Settings, http: httpx.AsyncClient) -> dict[str, dict[str, object]]:
    """Publish a binary and an oversize payload; their records by reason once both exist."""
    async with mqtt_client(settings, "failing-node") as mqtt:
        await mqtt.publish("devices/F-1/data", BINARY, qos=1)
        await mqtt.publish("devices/F-2/data", HUGE, qos=1)
    listed = await eventually(
        lambda: http.get("/api/failed-messages", headers=READ), lambda r: len(r.json()) == 2
    )
    return {item["routing_key"]: item for item in listed.json()}


async def test_a_binary_body_is_listed_as_hex_and_the_list_filters_by_reason(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    items = await recorded(settings, http)
    binary, huge = items["devices.F-1.data"], items["devices.F-2.data"]
    assert (binary["body_encoding"], binary["body"]) == ("hex", BINARY.hex())
    assert huge["reason"] == "oversize" and huge["body_truncated"] is True
    assert len(str(huge["body"])) == MAX_FAILED_BODY  # the bounded copy, as text
    only = await http.get("/api/failed-messages?reason=oversize", headers=READ)
    assert [item["routing_key"] for item in only.json()] == ["devices.F-2.data"]
    none = await http.get("/api/failed-messages?reason=no_such_reason", headers=READ)
    assert none.status_code == 200 and none.json() == []


async def test_a_replay_that_cannot_be_done_says_why(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings
) -> None:
    items = await recorded(settings, http)
    truncated = await http.post(
        f"/api/failed-messages/{items['devices.F-2.data']['id']}/replay", headers=ADMIN
    )
    assert truncated.status_code == 422 and error_code(truncated) == "truncated"
    not_a_number = await http.post("/api/failed-messages/abc/replay", headers=ADMIN)
    assert not_a_number.status_code == 422
    missing = await http.post("/api/failed-messages/999999/replay", headers=ADMIN)
    assert missing.status_code == 404 and error_code(missing) == "not_found"
    published = gateway.metrics.registry.get_sample_value(
        "rnr_amqp_published_total", {"exchange": topology.DEVICE_EXCHANGE}
    )
    assert not published  # none of the three went to the broker
    listed = (await http.get("/api/failed-messages", headers=READ)).json()
    assert all(item["replayed_at"] is None for item in listed)
