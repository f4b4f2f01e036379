"""Presence with several gateways on one vhost: each ingests only part of a node's
messages, so before calling a node silent a gateway asks the database (``nodes``), and a
transition another gateway stored already is not stored twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from rnr_gateway.gateway import Gateway
from rnr_gateway.metrics import Metrics
from rnr_gateway.presence import Presence, Transition
from rnr_gateway.settings import PresenceSettings, Settings
from tests.conftest import eventually, mqtt_client, running

FAST = PresenceSettings(
    offline_threshold_s=1.0, status_check_interval_s=0.2, new_node_threshold_s=1.0
)


async def stored_elsewhere(gateway: Gateway, node_id: str, status: str = "online") -> None:
    """What another gateway's batch statement does for a message it stored."""
    await gateway.db.pool.execute(
        "UPDATE nodes SET last_seen = now(), status = $2 WHERE node_id = $1", node_id, status
    )


async def events(gateway: Gateway, node_id: str) -> list[tuple[str, str]]:
    rows = await gateway.db.pool.fetch(
        "SELECT to_status, reason FROM node_events WHERE node_id = $1 ORDER BY at, id", node_id
    )
    return [(r["to_status"], r["reason"]) for r in rows]


async def test_a_node_heard_by_another_gateway_stays_online_and_its_lwt_comes_across(
    settings: Settings,
) -> None:
    pushed: list[Transition] = []
    async with running(Gateway(replace(settings, presence=FAST))) as gateway:
        gateway.presence.add_listener(pushed.append)
        async with mqtt_client(settings, "shared") as client:
            await client.publish("devices/SHARED/data", b'{"temperature":1}', qos=1)
        await eventually(lambda: gateway.presence.is_online("SHARED"), bool)
        # for three thresholds only another gateway hears the node
        for _ in range(10):
            await stored_elsewhere(gateway, "SHARED")
            await asyncio.sleep(0.3)
        assert gateway.presence.is_online("SHARED")
        assert await events(gateway, "SHARED") == [("online", "message")]

        # the other gateway stores the node's LWT and records the transition
        await stored_elsewhere(gateway, "SHARED", "offline")
        await gateway.db.pool.execute(
            "INSERT INTO node_events (node_id, from_status, to_status, reason, at)"
            " VALUES ('SHARED', 'online', 'offline', 'lwt', now())"
        )
        await eventually(lambda: gateway.presence.status("SHARED"), lambda s: s == "offline", 5)
        await gateway.presence.flush()
        assert await events(gateway, "SHARED") == [("online", "message"), ("offline", "lwt")]
    assert [(t.status, t.reason) for t in pushed] == [("online", "message"), ("offline", "lwt")]


async def test_a_transition_two_gateways_saw_is_stored_once(settings: Settings) -> None:
    async with running(Gateway(replace(settings, presence=FAST))) as gateway:
        async with mqtt_client(settings, "twice") as client:
            await client.publish("devices/TWICE/data", b'{"temperature":1}', qos=1)
        await eventually(lambda: gateway.presence.is_online("TWICE"), bool)
        await gateway.presence.flush()
        other = Presence(FAST, gateway.db, Metrics())  # a second gateway's presence
        await other.load()
        at = gateway.presence.clock()
        gateway.presence.went_offline("TWICE", "lwt", at)
        other.went_offline("TWICE", "lwt", at + 0.05)  # the same LWT, seen a moment later
        await asyncio.gather(gateway.presence.flush(), other.flush())
        assert await events(gateway, "TWICE") == [("online", "message"), ("offline", "lwt")]
        assert gateway.presence.status("TWICE") == other.status("TWICE") == "offline"


async def test_catch_up_takes_a_node_another_gateway_heard_lately(settings: Settings) -> None:
    async with running(Gateway(replace(settings, presence=FAST))) as gateway:
        async with mqtt_client(settings, "back") as client:
            for node in ("BACK", "STALE", "GONE"):
                await client.publish(f"devices/{node}/data", b'{"temperature":1}', qos=1)
                await client.publish(f"devices/{node}/status", b"offline", qos=1)
        presence = gateway.presence
        await eventually(
            lambda: [presence.status(n) for n in ("BACK", "STALE", "GONE")],
            lambda s: s == ["offline"] * 3,
        )
        await presence.flush()
        await asyncio.sleep(FAST.offline_threshold_s + 0.3)
        await stored_elsewhere(gateway, "BACK")  # a message another gateway stored
        await gateway.db.pool.execute(  # after the LWT, but longer ago than the threshold
            "UPDATE nodes SET last_seen = now() - make_interval(secs => $1),"
            " status = 'online' WHERE node_id = 'STALE'",
            FAST.offline_threshold_s + 0.2,
        )
        await presence.catch_up(["BACK", "STALE", "GONE", "NEVER-SEEN"])
        assert [presence.status(n) for n in ("BACK", "STALE", "GONE")] == [
            "online",
            "offline",
            "offline",
        ]
        assert presence.status("NEVER-SEEN") == "unknown"


async def test_a_learned_interval_is_stored_without_a_transition(settings: Settings) -> None:
    async with running(Gateway(replace(settings, presence=FAST))) as gateway:
        await gateway.db.pool.execute(
            "INSERT INTO nodes (node_id, last_seen, status) VALUES ('STEADY', now(), 'online')"
        )
        presence, start = gateway.presence, gateway.presence.clock()
        for i in range(5):  # a node that stays online: one transition, then none
            presence.heard("STEADY", start + 0.5 * i)
        await presence.flush()
        stored = await gateway.db.pool.fetchval(
            "SELECT report_interval_s FROM nodes WHERE node_id = 'STEADY'"
        )
        assert stored == presence.nodes["STEADY"].interval_s == 0.5
        for i in range(5, 15):  # it slows down to 2 s: the new interval is stored too
            presence.heard("STEADY", start + 2.0 + 2.0 * i)
        await presence.flush()
        stored = await gateway.db.pool.fetchval(
            "SELECT report_interval_s FROM nodes WHERE node_id = 'STEADY'"
        )
        assert stored == pytest.approx(presence.nodes["STEADY"].interval_s) and stored > 1.5
