"""Commands end to end: API → outbox → device_commands_enhanced → MQTT → a real node →
acks → PostgreSQL, through the real broker and database. Timeouts are injected short."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from rnr_gateway import command_tracking
from rnr_gateway.command_steps import apply
from rnr_gateway.errors import (
    CommandConflict,
    CommandNotFound,
    CommandTooLarge,
    InvalidCommand,
    NodeNotFound,
)
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from tests.conftest import TOKENS, eventually, mqtt_client, running
from tests.e2e.command_node import TestNode, fast, settled, statuses


@pytest.fixture
def cmd_settings(settings: Settings) -> Settings:
    return fast(settings)


@pytest.fixture
async def gw(cmd_settings: Settings) -> AsyncIterator[Gateway]:
    async with running(Gateway(cmd_settings)) as gateway:
        yield gateway


async def test_command_executed_every_transition_recorded_and_pushed(
    gw: Gateway, cmd_settings: Settings
) -> None:
    pushed: list[dict[str, Any]] = []
    gw.commands.add_listener(pushed.append)
    node = TestNode(cmd_settings, "NODE-OK")
    async with node.connected(gw):
        body = {"action": "RELAY_CONTROL", "relay": 3, "state": True, "note": "kept"}
        record = await gw.commands.submit("NODE-OK", body, priority=7)
        assert record.status == "queued" and record.params == body
        done = await settled(gw, record.message_id)

    assert done.status == "executed"
    assert statuses(done) == ["queued", "sent", "received", "executed"]
    assert done.reason == "test node: executed"
    assert done.sent_at and done.received_at and done.finished_at
    assert done.attempts == 1 and done.priority == 7
    [got] = node.log.received
    assert {k: got[k] for k in body} == body  # flat params exactly as given
    assert got["message_id"] == record.message_id and got["priority"] == 7
    assert got["expires_at"] >= got["cmd_timestamp"] + 299
    mine = [e for e in pushed if e["message_id"] == record.message_id]
    assert [e["status"] for e in mine] == statuses(done)
    assert {e["type"] for e in mine} == {"command_status"}
    assert all(e["node_id"] == "NODE-OK" and e["timestamp"] for e in mine)
    stats = gw.commands.stats()
    assert stats["commands_sent"] >= 1 and stats["connected"] is True
    assert gw.metrics.value("rnr_command_transitions_total", {"status": "executed"}) == 1


@pytest.mark.parametrize("outcome", ["failed", "rejected"])
async def test_failure_and_rejection_from_the_node(
    gw: Gateway, cmd_settings: Settings, outcome: str
) -> None:
    node = TestNode(cmd_settings, "NODE-NO", outcome=outcome)
    async with node.connected(gw):
        record = await gw.commands.submit(
            "NODE-NO", {"action": "FIRMWARE_UPDATE", "url": "http://x/f.bin"}
        )
        done = await settled(gw, record.message_id)
    assert done.status == outcome
    assert done.reason == f"test node: {outcome}"
    assert statuses(done)[-1] == outcome and done.finished_at is not None


async def test_backlog_for_offline_node_goes_out_by_priority_one_at_a_time(
    gw: Gateway, cmd_settings: Settings
) -> None:
    node = TestNode(cmd_settings, "NODE-BACK")
    async with node.connected(gw):
        pass  # known to the gateway, then gone (offline status)
    await eventually(lambda: gw.presence.is_online("NODE-BACK"), lambda online: not online)

    ids = {}
    for priority, label in [(1, "low"), (5, "mid-a"), (9, "high"), (5, "mid-b"), (3, "lower")]:
        rec = await gw.commands.submit(
            "NODE-BACK", {"action": "PING", "label": label}, priority=priority
        )
        ids[rec.message_id] = label
    await asyncio.sleep(0.5)  # the dispatcher had every chance to send to an offline node
    for mid in ids:
        assert (await gw.commands.get(mid)).status == "queued"

    async with node.connected(gw):
        for mid in ids:
            await settled(gw, mid)
    assert [c["label"] for c in node.log.received] == ["high", "mid-a", "mid-b", "lower", "low"]
    assert node.log.max_outstanding == 1
    assert all(n == 1 for n in node.log.executed.values()) and len(node.log.executed) == 5


async def test_one_in_flight_per_node_and_other_nodes_do_not_wait(
    gw: Gateway, cmd_settings: Settings
) -> None:
    slow = TestNode(cmd_settings, "NODE-SLOW")
    other = TestNode(cmd_settings, "NODE-OTHER")
    slow.hold.clear()  # it receives but does not ack until released
    async with slow.connected(gw), other.connected(gw):
        first = await gw.commands.submit("NODE-SLOW", {"action": "PING", "n": 1})
        second = await gw.commands.submit("NODE-SLOW", {"action": "PING", "n": 2})
        await eventually(lambda: len(slow.log.received), lambda n: n >= 1)
        elsewhere = await gw.commands.submit("NODE-OTHER", {"action": "PING"})
        assert (await settled(gw, elsewhere.message_id)).status == "executed"
        await asyncio.sleep(0.5)  # well under the 1.5 s ack timeout
        assert slow.log.ids == [first.message_id]
        assert (await gw.commands.get(second.message_id)).status == "queued"
        slow.hold.set()
        assert (await settled(gw, second.message_id)).status == "executed"
    assert slow.log.ids == [first.message_id, second.message_id]
    assert slow.log.max_outstanding == 1


async def test_expired_while_offline_is_never_delivered(
    gw: Gateway, cmd_settings: Settings
) -> None:
    node = TestNode(cmd_settings, "NODE-EXP")
    async with node.connected(gw):
        pass
    await eventually(lambda: gw.presence.is_online("NODE-EXP"), lambda online: not online)
    record = await gw.commands.submit("NODE-EXP", {"action": "REBOOT"}, ttl_s=0.5)
    keep = await gw.commands.submit("NODE-EXP", {"action": "PING"}, ttl_s=60)
    done = await settled(gw, record.message_id, within=5)
    assert done.status == "expired" and done.sent_at is None and done.attempts == 0
    assert done.reason == "not delivered before expires_at"
    assert statuses(done) == ["queued", "expired"]
    async with node.connected(gw):
        await settled(gw, keep.message_id)
    assert node.log.ids == [keep.message_id]


async def test_retained_copy_is_cleared_after_the_ack(
    gw: Gateway, cmd_settings: Settings, db: asyncpg.Connection
) -> None:
    node = TestNode(cmd_settings, "NODE-RET")
    node.hold.clear()
    async with node.connected(gw):
        record = await gw.commands.submit(
            "NODE-RET", {"action": "LIGHT_CONTROL", "state": True}, retain=True
        )
        await eventually(lambda: node.log.ids, lambda ids: ids == [record.message_id])
        retained = await retained_on(cmd_settings, "NODE-RET")
        assert retained is not None and orjson.loads(retained)["message_id"] == record.message_id
        node.hold.set()
        assert (await settled(gw, record.message_id)).status == "executed"
        await eventually(
            lambda: db.fetchval(
                "SELECT retain_cleared_at FROM commands WHERE message_id = $1", record.message_id
            ),
            lambda at: at is not None,
        )
    assert await retained_on(cmd_settings, "NODE-RET") is None


async def retained_on(settings: Settings, node_id: str) -> bytes | None:
    """What a node reconnecting with a clean session finds on commands/last (None: nothing,
    not even an empty message)."""
    async with mqtt_client(settings, f"late-{node_id}") as client:
        await client.subscribe(f"devices/{node_id}/commands/last", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    assert message.retain
                    payload = message.payload
                    assert isinstance(payload, bytes)
                    return payload
    return None


async def retain_cleared_at(db: asyncpg.Connection, message_id: str) -> datetime:
    return await eventually(
        lambda: db.fetchval(
            "SELECT retain_cleared_at FROM commands WHERE message_id = $1", message_id
        ),
        lambda at: at is not None,
        within=10,
    )


async def test_retained_copy_serves_a_node_back_with_a_clean_session(
    gw: Gateway, cmd_settings: Settings, db: asyncpg.Connection
) -> None:
    """What the copy is for: the node is gone but presence does not know yet (a clean
    disconnect: no offline status, no will), so the command goes out while nobody listens.
    The node comes back with a clean session, subscribed literally to commands/last only,
    and finds it there, retained."""
    away = TestNode(cmd_settings, "NODE-LAST")
    async with away.connected(gw, goodbye=False):
        pass
    assert gw.presence.is_online("NODE-LAST")  # until its offline threshold (15 s and more)
    record = await gw.commands.submit(
        "NODE-LAST", {"action": "RELAY_CONTROL", "relay": 2, "state": True}, retain=True
    )
    mid = record.message_id
    await settled(gw, mid, frozenset(("sent",)))  # the broker took it; no subscriber had it

    back = TestNode(cmd_settings, "NODE-LAST", topics=("commands/last",))
    async with back.connected(gw):
        done = await settled(gw, mid)
        cleared_at = await retain_cleared_at(db, mid)
    assert done.status == "executed"
    assert statuses(done) == ["queued", "sent", "received", "executed"]
    assert done.attempts == 1  # the retained copy, not a resend
    assert back.log.ids == [mid]
    assert back.log.via == [("commands/last", True)]  # found retained, not a live delivery
    assert back.log.received[0]["relay"] == 2 and back.log.received[0]["state"] is True
    assert done.received_at is not None and cleared_at >= done.received_at  # at the ack
    assert await retained_on(cmd_settings, "NODE-LAST") is None


async def test_retained_command_for_an_offline_node_has_no_copy_until_it_is_back(
    gw: Gateway, cmd_settings: Settings, db: asyncpg.Connection
) -> None:
    """Presence knows the node is offline: the command waits in the outbox, and its copy is
    published on commands/last only when it is dispatched, once the node is online again.
    Meanwhile there is nothing retained to find."""
    node = TestNode(cmd_settings, "NODE-AWAY", topics=("commands/last",))
    async with node.connected(gw):
        pass
    await eventually(lambda: gw.presence.is_online("NODE-AWAY"), lambda online: not online)
    record = await gw.commands.submit(
        "NODE-AWAY", {"action": "LIGHT_CONTROL", "state": True}, retain=True
    )
    mid = record.message_id
    assert await retained_on(cmd_settings, "NODE-AWAY") is None  # waited 1 s for a copy
    assert (await gw.commands.get(mid)).status == "queued"

    async with node.connected(gw):  # subscribed to commands/last before it says online
        done = await settled(gw, mid)
        await retain_cleared_at(db, mid)
        await eventually(lambda: node.log.empty, lambda n: n >= 1)  # the clear, live
    assert done.status == "executed"
    assert statuses(done) == ["queued", "sent", "received", "executed"]
    assert node.log.ids == [mid] and node.log.via[0][0] == "commands/last"
    assert await retained_on(cmd_settings, "NODE-AWAY") is None


async def test_retained_copy_of_a_command_never_acked_is_cleared_at_expiry(
    gw: Gateway, cmd_settings: Settings, db: asyncpg.Connection
) -> None:
    """The node receives the command and stays silent. The ack timeout frees its slot but
    leaves the copy; the command stays `sent` (only queued commands expire: it may have
    been carried out) and once past expires_at the sweep clears the copy."""
    node = TestNode(cmd_settings, "NODE-MUTE", acks=False)
    async with node.connected(gw):
        record = await gw.commands.submit("NODE-MUTE", {"action": "PING"}, retain=True, ttl_s=4)
        mid = record.message_id
        await eventually(lambda: node.log.ids, lambda ids: ids == [mid])
        await eventually(lambda: gw.metrics.value("rnr_command_ack_timeouts_total"), bool, within=5)
        kept = await retained_on(cmd_settings, "NODE-MUTE")
        assert datetime.now(UTC) < record.expires_at  # so the copy was seen before expiry
        assert kept is not None and orjson.loads(kept)["message_id"] == mid
        cleared_at = await retain_cleared_at(db, mid)
        assert await retained_on(cmd_settings, "NODE-MUTE") is None
    done = await gw.commands.get(mid)
    assert cleared_at >= done.expires_at
    assert done.status == "sent" and statuses(done) == ["queued", "sent"]
    assert done.finished_at is None and done.sent_at is not None
    assert node.log.ids == [mid]


async def test_invalid_action_over_http_is_422_naming_the_action(
    gw: Gateway, cmd_settings: Settings
) -> None:
    node = TestNode(cmd_settings, "NODE-BADACT")
    headers = {"Authorization": f"Bearer {TOKENS['command']}"}
    transport = httpx.ASGITransport(app=gw.app)
    async with (
        node.connected(gw),
        httpx.AsyncClient(transport=transport, base_url="http://gw") as http,
    ):
        for action, words in [
            ("relay control", "must be upper case"),
            ("relay_control", "did you mean 'RELAY_CONTROL'?"),
            ("RELAY-CONTROL", "must be upper case"),
            ("", "is required"),
            (3, "is required"),
        ]:
            sent = await http.post(
                "/api/nodes/NODE-BADACT/actions",
                json={"action": action, "relay": 3, "state": True},
                headers=headers,
            )
            assert sent.status_code == 422, (action, sent.text)
            error = sent.json()
            assert set(error) == {"error"} and set(error["error"]) == {"code", "message"}
            assert error["error"]["code"] == "invalid_command"
            assert error["error"]["message"].startswith("action: ")
            assert words in error["error"]["message"]
        assert await gw.commands.for_node("NODE-BADACT") == []
    assert node.log.received == []


async def test_legacy_node_ends_at_sent_and_a_status_event_infers_executed(
    gw: Gateway, cmd_settings: Settings
) -> None:
    node = TestNode(cmd_settings, "AABBCCDDEE01", acks=False)
    async with node.connected(gw):
        fan = await gw.commands.submit("AABBCCDDEE01", {"action": "FAN_CONTROL", "state": False})
        relay = await gw.commands.submit(
            "AABBCCDDEE01", {"action": "RELAY_CONTROL", "relay": 3, "state": True}
        )
        # no ack: the second goes once the ack timeout frees the node's slot
        await eventually(lambda: node.log.ids, lambda ids: relay.message_id in ids, within=5)
        await node.send(
            "data",
            {
                "timestamp": "unknown",
                "status": "relay3_on",
                "free_heap": 198000,
                "wifi_rssi": -52,
                "signal_strength": 69,
            },
        )
        done = await settled(gw, relay.message_id, frozenset(("executed",)))
        # a node without acks is not held for the ack timeout (1.5 s) once that is known,
        # and an inferred result does not change that
        started = time.monotonic()
        more = [await gw.commands.submit("AABBCCDDEE01", {"action": "PING"}) for _ in range(2)]
        await eventually(lambda: node.log.ids, lambda ids: more[-1].message_id in ids, within=1.2)
        assert time.monotonic() - started < 1.2
    assert done.reason == "inferred" and statuses(done) == ["queued", "sent", "executed"]
    assert (await gw.commands.get(fan.message_id)).status == "sent"
    assert gw.metrics.value("rnr_command_ack_timeouts_total") == 1  # only the first waited


async def test_a_status_event_stored_before_sent_is_committed_still_infers_its_command(
    gw: Gateway, cmd_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A legacy node answers within milliseconds: its event can be stored before the
    command's 'sent' is. Here 'sent' commits 0.5 s late, every time."""
    slow = asyncio.Event()

    async def late_sent(conn: Any, rounds: Any, failed: Any) -> Any:
        if any(t.step.status == "sent" for todos in rounds for t in todos):
            slow.set()
            await asyncio.sleep(0.5)
        return await apply(conn, rounds, failed)

    monkeypatch.setattr(command_tracking, "apply", late_sent)
    node = TestNode(cmd_settings, "AABBCCDDEE03", acks=False)
    async with node.connected(gw):
        relay = await gw.commands.submit(
            "AABBCCDDEE03", {"action": "RELAY_CONTROL", "relay": 2, "state": True}
        )
        await eventually(lambda: node.log.ids, lambda ids: relay.message_id in ids, within=5)
        assert slow.is_set()
        event = {"timestamp": "unknown", "status": "relay2_on", "free_heap": 198000}
        await node.send("data", event)
        done = await settled(gw, relay.message_id, frozenset(("executed",)))
    assert done.reason == "inferred" and statuses(done) == ["queued", "sent", "executed"]


async def test_a_node_known_not_to_ack_is_still_known_after_a_restart(
    cmd_settings: Settings,
) -> None:
    node = TestNode(cmd_settings, "AABBCCDDEE02", acks=False)
    async with running(Gateway(cmd_settings)) as first, node.connected(first):
        waited = await first.commands.submit("AABBCCDDEE02", {"action": "PING"})
        await eventually(lambda: node.log.ids, lambda ids: waited.message_id in ids, within=5)
        # the ack timeout (1.5 s) passes without an ack: the node is taken for legacy
        await eventually(
            lambda: first.metrics.value("rnr_command_ack_timeouts_total"), bool, within=5
        )
    async with running(Gateway(cmd_settings)) as second, node.connected(second):
        started = time.monotonic()
        more = [await second.commands.submit("AABBCCDDEE02", {"action": "PING"}) for _ in range(2)]
        await eventually(lambda: node.log.ids, lambda ids: more[-1].message_id in ids, within=1.2)
        assert time.monotonic() - started < 1.2  # the first did not hold the node 1.5 s
        assert second.metrics.value("rnr_command_ack_timeouts_total") == 0


async def test_unknown_late_and_malformed_acks_are_recorded_and_harmless(
    gw: Gateway, cmd_settings: Settings, db: asyncpg.Connection
) -> None:
    node = TestNode(cmd_settings, "NODE-ACKS")
    async with node.connected(gw):
        await node.send("ack", {"message_id": "no-such-command", "status": "executed"})
        await node.send("ack", b"{not json")
        # a NUL character (which PostgreSQL's text refuses) in the detail: the ack counts
        await node.send(
            "ack", b'{"message_id":"nul-detail","status":"failed","detail":"a\\u0000b"}'
        )
        record = await gw.commands.submit("NODE-ACKS", {"action": "PING"})
        await settled(gw, record.message_id)
        await node.send("ack", {"message_id": record.message_id, "status": "executed"})
        unmatched = await eventually(
            lambda: db.fetch(
                "SELECT message_id, reason, detail FROM command_acks_unmatched ORDER BY id"
            ),
            lambda rows: len(rows) >= 3,
        )
    assert [(r["message_id"], r["reason"]) for r in unmatched] == [
        ("no-such-command", "unknown_command"),
        ("nul-detail", "unknown_command"),
        (record.message_id, "already_executed"),
    ]
    assert unmatched[1]["detail"] == "a\ufffdb"
    failed = await db.fetch("SELECT routing_key, reason FROM failed_messages")
    assert [(r["routing_key"], r["reason"]) for r in failed] == [
        ("devices.NODE-ACKS.ack", "bad_json")
    ]
    assert (await gw.commands.get(record.message_id)).status == "executed"


async def test_cancel_and_api_errors(gw: Gateway, cmd_settings: Settings) -> None:
    node = TestNode(cmd_settings, "NODE-API")
    async with node.connected(gw):
        pass
    await eventually(lambda: gw.presence.is_online("NODE-API"), lambda online: not online)
    record = await gw.commands.submit("NODE-API", {"action": "PING"})
    cancelled = await gw.commands.cancel(record.message_id)
    assert cancelled.status == "cancelled" and statuses(cancelled) == ["queued", "cancelled"]
    with pytest.raises(CommandConflict) as conflict:
        await gw.commands.cancel(record.message_id)
    assert conflict.value.status == "cancelled"
    with pytest.raises(CommandNotFound):
        await gw.commands.get("nope")
    with pytest.raises(NodeNotFound) as missing:
        await gw.commands.submit("NOBODY", {"action": "PING"})
    assert missing.value.node_ids == ["NOBODY"]
    with pytest.raises(InvalidCommand) as bad:
        await gw.commands.submit("NODE-API", {"action": "RELAY_CONTROL", "relay": 9, "state": True})
    assert bad.value.field == "relay"
    with pytest.raises(CommandTooLarge):
        await gw.commands.submit("NODE-API", {"action": "PING", "blob": "x" * 11_000})
    same = {"action": "PING", "message_id": "client-key-1"}
    first = await gw.commands.submit("NODE-API", same)
    assert (await gw.commands.submit("NODE-API", same)).message_id == first.message_id
    with pytest.raises(CommandConflict):
        await gw.commands.submit("NODE-API", {**same, "extra": 1})
    async with node.connected(gw):
        await settled(gw, "client-key-1")
    assert node.log.ids == ["client-key-1"]  # the cancelled one never went out
    assert [r.message_id for r in await gw.commands.for_node("NODE-API", 10)] == [
        "client-key-1",
        record.message_id,
    ]


async def test_broadcast_to_50_nodes_tracks_each(gw: Gateway, cmd_settings: Settings) -> None:
    nodes = [TestNode(cmd_settings, f"FLEET-{i:02d}") for i in range(50)]
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(n.connected()) for n in nodes))
        await eventually(
            lambda: sum(gw.presence.is_online(n.node_id) for n in nodes), lambda k: k == 50
        )
        group, records = await gw.commands.broadcast(None, {"action": "STATUS_REQUEST"})
        assert sorted(r.node_id for r in records) == sorted(n.node_id for n in nodes)
        assert {r.broadcast_id for r in records} == {group}
        done = await asyncio.gather(*(settled(gw, r.message_id, within=20) for r in records))
    assert {d.status for d in done} == {"executed"}
    for node, record in zip(nodes, sorted(records, key=lambda r: r.node_id), strict=True):
        assert node.log.ids == [record.message_id]
