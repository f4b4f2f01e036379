"""store.write_batch against the real PostgreSQL: duplicates and repeated failures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from rnr_gateway import store
from rnr_gateway.codec import decode
from rnr_gateway.store import Accepted, Failed

NOW = datetime(2026, 11, 27, 14, 30, tzinfo=UTC)


def reading(node: str, seq: int | None) -> Accepted:
    body = {"temperature": 1} | ({"boot": 1, "seq": seq} if seq is not None else {})
    return Accepted(decode(f"devices.{node}.data", orjson.dumps(body)), NOW)


def bad(body: bytes) -> Failed:
    return Failed("sensor_data_enhanced", "devices.N1.data", {}, body, "bad_json", "not JSON")


async def test_redelivered_and_repeated_messages_are_stored_and_counted_once(
    db: asyncpg.Connection,
) -> None:
    first = await store.write_batch(db, [reading("N1", 1), reading("N1", 2)], [])
    again = [reading("N1", 2), reading("N1", 3), reading("N1", 3), reading("LEGACY1", None)]
    second = await store.write_batch(db, again, [])
    assert (first.inserted, first.duplicates) == (2, 0)
    assert (second.inserted, second.duplicates) == (2, 2)
    # only what is new goes on to presence, commands and WebSocket clients
    assert [(r.message.node_id, r.message.seq) for r in second.stored] == [
        ("N1", 3),
        ("LEGACY1", None),
    ]
    seqs = await db.fetch("SELECT seq FROM sensor_data WHERE node_id = 'N1' ORDER BY seq")
    assert [r["seq"] for r in seqs] == [1, 2, 3]
    counts = dict(await db.fetch("SELECT node_id, message_count FROM nodes"))
    assert counts == {"N1": 3, "LEGACY1": 1}
    # a batch of nothing but redeliveries changes no node
    await store.write_batch(db, [reading("N1", 1)], [])
    assert await db.fetchval("SELECT message_count FROM nodes WHERE node_id = 'N1'") == 3


async def test_a_failure_seen_again_counts_every_time_in_and_across_batches(
    db: asyncpg.Connection,
) -> None:
    result = await store.write_batch(db, [], [bad(b"{x"), bad(b"{x"), bad(b"[1]"), bad(b"{x")])
    assert result.failed == 4
    await store.write_batch(db, [], [bad(b"{x")])
    rows = await db.fetch("SELECT body, count FROM failed_messages ORDER BY id")
    assert [(bytes(r["body"]), r["count"]) for r in rows] == [(b"{x", 4), (b"[1]", 1)]


# -- nodes: the per-node aggregation the batch statement does ------------------------------
def at(
    node: str, body: dict[str, object] | bytes, seconds: float = 0, ch: str = "data"
) -> Accepted:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Accepted(decode(f"devices.{node}.{ch}", raw), NOW + timedelta(seconds=seconds))


async def node_rows(db: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        "SELECT node_id, mac_address, last_seen, message_count, status, firmware, last_boot"
        " FROM nodes ORDER BY node_id"
    )
    return [tuple(r) for r in rows]


async def test_one_node_row_per_node_with_its_aggregates(db: asyncpg.Connection) -> None:
    batch = [
        at("ZZ-9", {"temperature": 1}),
        at("AABBCCDDEEFF", {"temperature": 1}),
        at("MP-1", {"temperature": 1, "boot": 1, "seq": 1, "fw": "1.0"}),
        at("AABBCCDDEEFF", {"type": "heartbeat"}, 2),
        at("MP-1", {"temperature": 2, "boot": 2, "seq": 1}, 1),
        at("AABBCCDDEEFF", {"test": "ping"}, 1),
    ]
    result = await store.write_batch(db, batch, [])
    assert [id(r) for r in result.stored] == [id(r) for r in batch]
    assert await node_rows(db) == [
        # node, mac, last seen, count, status, firmware, last boot
        ("AABBCCDDEEFF", "AA:BB:CC:DD:EE:FF", NOW + timedelta(seconds=2), 3, "online", None, None),
        ("MP-1", None, NOW + timedelta(seconds=1), 2, "online", "1.0", 2),
        ("ZZ-9", None, NOW, 1, "online", None, None),
    ]
    # the raw payload is kept as sent, typed columns beside it
    stored = await db.fetch("SELECT data, kind FROM sensor_data WHERE node_id = 'MP-1'")
    assert {(orjson.loads(r["data"])["temperature"], r["kind"]) for r in stored} == {
        (1, "reading"),
        (2, "reading"),
    }


async def test_node_status_follows_the_latest_message(db: asyncpg.Connection) -> None:
    await store.write_batch(
        db, [at("N1", {"temperature": 1}), at("N1", b"offline", 1, "status")], []
    )
    assert (await node_rows(db))[0][2:5] == (NOW + timedelta(seconds=1), 2, "offline")
    await store.write_batch(db, [at("N2", b"offline", 0, "status"), at("N2", {"t": 1}, 1)], [])
    assert (await node_rows(db))[1][4] == "online"
    # an older LWT arriving late changes neither last_seen nor status
    await store.write_batch(
        db,
        [at("N3", {"t": 1}, 5), at("N3", {"status": "offline", "reason": "lwt"}, 0, "status")],
        [],
    )
    assert (await node_rows(db))[2][2:5] == (NOW + timedelta(seconds=5), 2, "online")
    # same instant: the later message in the batch wins
    await store.write_batch(db, [at("N4", {"t": 1}), at("N4", b"offline", 0, "status")], [])
    assert (await node_rows(db))[3][4] == "offline"


async def test_firmware_and_boot_keep_the_last_known_value(db: asyncpg.Connection) -> None:
    await store.write_batch(
        db, [at("N1", {"boot": 4, "seq": 1, "fw": "2.0"}), at("N1", {"t": 1})], []
    )
    assert (await node_rows(db))[0][5:] == ("2.0", 4)
    await store.write_batch(db, [at("N1", {"t": 2})], [])  # a later batch keeps them too
    assert (await node_rows(db))[0][5:] == ("2.0", 4)


async def test_repeats_in_one_batch_count_once_with_fresh_rows_in_batch_order(
    db: asyncpg.Connection,
) -> None:
    await store.write_batch(db, [reading("N1", 2)], [])
    legacy = reading("LEGACY1", None)
    batch = [reading("N1", 1), legacy, reading("N1", 1), reading("N1", 2), reading("N1", 3), legacy]
    result = await store.write_batch(db, batch, [bad(b"{y")])
    assert (result.inserted, result.duplicates, result.failed) == (4, 2, 1)
    assert [id(r) for r in result.stored] == [id(batch[i]) for i in (0, 1, 4, 5)]
    counts = dict(await db.fetch("SELECT node_id, message_count FROM nodes"))
    assert counts == {"N1": 3, "LEGACY1": 2}
    assert await db.fetchval("SELECT count(*) FROM failed_messages") == 1


async def test_a_redelivered_message_without_a_key_is_stored_once(
    db: asyncpg.Connection,
) -> None:
    def legacy(body: dict[str, object], *, redelivered: bool, seconds: float = 0) -> Accepted:
        at = NOW + timedelta(seconds=seconds)
        return Accepted(decode("devices.AABBCCDDEEFF.data", orjson.dumps(body)), at, redelivered)

    first = {"temperature": 21.5, "uptime": 1000}
    await store.write_batch(db, [legacy(first, redelivered=False)], [])
    # the broker hands it again after a crash between commit and ack: already stored
    again = await store.write_batch(
        db,
        [legacy(first, redelivered=True, seconds=30), legacy({"uptime": 2000}, redelivered=True)],
        [],
    )
    assert (again.inserted, again.duplicates) == (1, 1)
    assert [r.message.data for r in again.stored] == [{"uptime": 2000}]
    # the same payload again, not a redelivery: a message of its own (legacy nodes repeat)
    repeat = await store.write_batch(db, [legacy(first, redelivered=False, seconds=60)], [])
    assert (repeat.inserted, repeat.duplicates) == (1, 0)
    # a redelivery whose payload was stored more than the queue's TTL (1 h) ago is new
    late = await store.write_batch(db, [legacy(first, redelivered=True, seconds=7300)], [])
    assert late.inserted == 1
    assert await db.fetchval("SELECT count(*) FROM sensor_data") == 4
    assert await db.fetchval("SELECT message_count FROM nodes") == 4


async def test_payloads_that_repeat_for_real_are_never_taken_for_a_redelivery(
    db: asyncpg.Connection,
) -> None:
    def at(body: bytes, ch: str, seconds: float, redelivered: bool) -> Accepted:
        message = decode(f"devices.AABBCCDDEEFF.{ch}", body)
        return Accepted(message, NOW + timedelta(seconds=seconds), redelivered)

    repeating = [
        (b"offline", "status"),  # an LWT like the one before
        (b'{"test": "ping"}', "data"),
        (b'{"temperature": 20.5}', "data"),  # no uptime, no timestamp
        (b'{"status": "relay3_on", "timestamp": "unknown", "free_heap": 1}', "data"),
    ]
    for body, ch in repeating:
        await store.write_batch(db, [at(body, ch, 0, False)], [])
        # redelivered (its first delivery never committed): a message of its own
        again = await store.write_batch(db, [at(body, ch, 60, True)], [])
        assert (again.inserted, again.duplicates) == (1, 0), body
    assert await db.fetchval("SELECT count(*) FROM sensor_data") == 2 * len(repeating)
