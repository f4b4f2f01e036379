"""store.write_batch against the real PostgreSQL: duplicates and repeated failures."""

from __future__ import annotations

from datetime import UTC, datetime

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
