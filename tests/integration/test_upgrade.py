"""`migrate` on a database of the original RNR IoT Platform: its nodes and sensor_data are
brought up to the gateway's schema, every row and original column kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from bench.services import drop_database, with_path

from rnr_gateway import store
from rnr_gateway.codec import decode
from rnr_gateway.db import migrate, migration_files, pending_migrations
from rnr_gateway.settings import Settings
from rnr_gateway.store import Accepted

# The original platform's tables, as its backend created them. Its server ran with a local
# TimeZone, so now() wrote local wall-clock time into the TIMESTAMP columns.
ORIGINAL_SCHEMA = """
CREATE TABLE nodes (
    id            SERIAL PRIMARY KEY,
    node_id       VARCHAR(50) {unique} NOT NULL,
    name          VARCHAR(100),
    mac_address   VARCHAR(17),
    created_at    TIMESTAMP DEFAULT NOW(),
    last_seen     TIMESTAMP,
    is_active     BOOLEAN DEFAULT TRUE,
    status        VARCHAR(20) DEFAULT 'offline',
    message_count INTEGER DEFAULT 0
);
CREATE TABLE sensor_data (
    id          SERIAL PRIMARY KEY,
    node_id     VARCHAR(50) {references},
    data        {data_type} NOT NULL,
    received_at TIMESTAMP DEFAULT NOW()
);
"""
ZONE = "Europe/Berlin"  # UTC+1 in November
NODES = [
    # id, node_id, name, mac, created_at and last_seen (Berlin wall clock), active, status, count
    (1, "AABBCCDDEEFF", "Greenhouse 1", "AA:BB:CC:DD:EE:FF", "2026-11-20 09:00:00",
     "2026-11-27 15:30:25.512", True, "online", 15420),
    (2, "112233445566", "Shed", "11:22:33:44:55:66", "2026-11-21 10:00:00", None, False,
     "offline", 0),
]  # fmt: skip
READING = {"temperature": 25.6, "humidity": 65.2, "light_state": False, "uptime": 123456}
SENSOR_DATA = [
    (987653, "AABBCCDDEEFF", {"temperature": 25.5, "uptime": 123446}, "2026-11-27 15:30:15.5"),
    (987654, "AABBCCDDEEFF", READING, "2026-11-27 15:30:25.512"),
]
AFTER = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
LEGACY_COLUMNS = (
    "id, node_id, name, mac_address, created_at, last_seen, is_active, status, message_count"
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
async def original(base_settings: Settings, unique: str) -> AsyncIterator[str]:
    """An empty database, never migrated, whose sessions run in a local time zone."""
    name = f"rnr_test_original_{unique}"
    admin = await asyncpg.connect(base_settings.db.url.value)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{ZONE}'")
    finally:
        await admin.close()
    yield with_path(base_settings.db.url.value, name)
    await drop_database(base_settings.db.url.value, name)


async def create_original(conn: asyncpg.Connection, data_type: str, *, unique: bool = True) -> None:
    references = "REFERENCES nodes(node_id)" if unique else ""
    await conn.execute(
        ORIGINAL_SCHEMA.format(
            unique="UNIQUE" if unique else "", references=references, data_type=data_type
        )
    )
    await conn.executemany(
        "INSERT INTO nodes (id, node_id, name, mac_address, created_at, last_seen, is_active,"
        " status, message_count) VALUES ($1, $2, $3, $4, $5::text::timestamp,"
        " $6::text::timestamp, $7, $8, $9)",
        NODES,
    )
    await conn.executemany(
        "INSERT INTO sensor_data (id, node_id, data, received_at)"
        f" VALUES ($1, $2, $3::text::{data_type}, $4::text::timestamp)",
        [(i, n, orjson.dumps(d).decode(), at) for i, n, d, at in SENSOR_DATA],
    )
    await conn.execute("SELECT setval('nodes_id_seq', 2), setval('sensor_data_id_seq', 987654)")


def message(node: str, body: dict[str, object], at: datetime) -> Accepted:
    return Accepted(decode(f"devices.{node}.data", orjson.dumps(body)), at)


async def column_types(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        table,
    )
    return {r["attname"]: r["type"] for r in rows}


@pytest.mark.parametrize("data_type", ["JSON", "TEXT", "JSONB"])
async def test_migrate_upgrades_an_original_database_keeping_its_rows(
    original: str, data_type: str
) -> None:
    conn = await asyncpg.connect(original)
    try:
        await create_original(conn, data_type)
        names = [name for _, name, _ in migration_files()]
        assert await migrate(conn) == names
        assert await migrate(conn) == []
        assert await pending_migrations(conn) == []
        # every statement of every migration finds nothing left to do on the upgraded tables
        before = (await column_types(conn, "nodes"), await column_types(conn, "sensor_data"))
        for _, _, sql in migration_files():
            await conn.execute(sql)
        after = (await column_types(conn, "nodes"), await column_types(conn, "sensor_data"))
        assert after == before

        nodes, sensor_data = before
        assert nodes["last_seen"] == nodes["created_at"] == "timestamp with time zone"
        assert sensor_data["data"] == "jsonb"
        assert sensor_data["received_at"] == "timestamp with time zone"
        assert nodes["node_id"] == sensor_data["node_id"] == "character varying"

        # the original rows, read as the original dashboard reads them: same values, and
        # the wall-clock times it wrote are the instants they meant
        rows = await conn.fetch(f"SELECT {LEGACY_COLUMNS} FROM nodes ORDER BY id")
        assert [tuple(r) for r in rows] == [
            (1, "AABBCCDDEEFF", "Greenhouse 1", "AA:BB:CC:DD:EE:FF", utc(2026, 11, 20, 8),
             utc(2026, 11, 27, 14, 30, 25, 512000), True, "online", 15420),
            (2, "112233445566", "Shed", "11:22:33:44:55:66", utc(2026, 11, 21, 9), None, False,
             "offline", 0),
        ]  # fmt: skip
        rows = await conn.fetch(
            "SELECT id, node_id, data::text AS data, received_at FROM sensor_data ORDER BY id"
        )
        got = [(r["id"], r["node_id"], orjson.loads(r["data"]), r["received_at"]) for r in rows]
        assert got == [
            (987653, "AABBCCDDEEFF", SENSOR_DATA[0][2], utc(2026, 11, 27, 14, 30, 15, 500000)),
            (987654, "AABBCCDDEEFF", READING, utc(2026, 11, 27, 14, 30, 25, 512000)),
        ]  # fmt: skip
        # presence reads last_seen as epoch seconds
        epoch = await conn.fetchval(
            "SELECT extract(epoch FROM last_seen) FROM nodes WHERE node_id = 'AABBCCDDEEFF'"
        )
        assert float(epoch) == utc(2026, 11, 27, 14, 30, 25, 512000).timestamp()

        # the gateway's write path: a known legacy node and a new enhanced one
        batch = [
            message("AABBCCDDEEFF", {"temperature": 26.0, "uptime": 123500}, AFTER),
            message("MP-1", {"temperature": 1, "boot": 1, "seq": 1, "fw": "1.0"}, AFTER),
        ]
        first = await store.write_batch(conn, batch, [])
        again = await store.write_batch(conn, batch[1:], [])
        assert (first.inserted, first.duplicates) == (2, 0)
        assert (again.inserted, again.duplicates) == (0, 1)
        rows = await conn.fetch(
            "SELECT node_id, last_seen, status, message_count, firmware, last_boot"
            " FROM nodes ORDER BY node_id"
        )
        assert [tuple(r) for r in rows] == [
            ("112233445566", None, "offline", 0, None, None),
            ("AABBCCDDEEFF", AFTER, "online", 15421, None, None),
            ("MP-1", AFTER, "online", 1, "1.0", 1),
        ]
        rows = await conn.fetch(
            "SELECT node_id, kind, boot, seq, received_at FROM sensor_data"
            " WHERE id > 987654 ORDER BY node_id"
        )
        assert [tuple(r) for r in rows] == [
            ("AABBCCDDEEFF", "reading", None, None, AFTER),
            ("MP-1", "reading", 1, 1, AFTER),
        ]

        # and the original platform's own writes still work beside it
        await conn.execute(
            "INSERT INTO nodes (node_id, name, mac_address) VALUES ('0A0B0C0D0E0F', 'New',"
            " '0A:0B:0C:0D:0E:0F')"
        )
        await conn.execute(
            "INSERT INTO sensor_data (node_id, data) VALUES ('0A0B0C0D0E0F', '{\"uptime\": 1}')"
        )
        row = await conn.fetchrow(
            "SELECT kind, data::text AS data FROM sensor_data WHERE node_id = '0A0B0C0D0E0F'"
        )
        assert (row["kind"], orjson.loads(row["data"])) == ("reading", {"uptime": 1})
    finally:
        await conn.close()


async def test_migrate_refuses_duplicate_node_ids_and_changes_nothing(original: str) -> None:
    conn = await asyncpg.connect(original)
    try:
        await create_original(conn, "JSON", unique=False)
        await conn.execute(
            "INSERT INTO nodes (node_id, name, last_seen, message_count)"
            " VALUES ('AABBCCDDEEFF', 'Greenhouse 1 (again)', now(), 3)"
        )
        with pytest.raises(asyncpg.RaiseError) as caught:
            await migrate(conn)
        error = caught.value
        assert error.message == "nodes.node_id is not unique: AABBCCDDEEFF (2 rows)"
        assert "GROUP BY node_id HAVING count(*) > 1" in (error.hint or "")
        assert "Upgrading a database of the original platform" in (error.hint or "")
        # the failed migration left the tables as they were
        assert await pending_migrations(conn) == [name for _, name, _ in migration_files()]
        assert "location" not in await column_types(conn, "nodes")
        assert (await column_types(conn, "sensor_data"))["data"] == "json"
        assert await conn.fetchval("SELECT count(*) FROM nodes") == 3

        # once merged as docs/operations.md says, the upgrade goes through
        await conn.execute(MERGE_DUPLICATES)
        await migrate(conn)
        assert await pending_migrations(conn) == []
        row = await conn.fetchrow(
            "SELECT id, name, message_count FROM nodes WHERE node_id = 'AABBCCDDEEFF'"
        )
        assert tuple(row) == (1, "Greenhouse 1", 15423)
    finally:
        await conn.close()


# the merge docs/operations.md gives: keep the oldest row of each node_id, with the latest
# last_seen and the counts summed
MERGE_DUPLICATES = """
UPDATE nodes k SET last_seen = d.last_seen, message_count = d.message_count
FROM (SELECT node_id, min(id) AS id, max(last_seen) AS last_seen,
             sum(message_count) AS message_count
      FROM nodes GROUP BY node_id HAVING count(*) > 1) d
WHERE k.id = d.id;
DELETE FROM nodes x USING nodes k WHERE x.node_id = k.node_id AND x.id > k.id;
"""
