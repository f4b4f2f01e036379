"""Retention pass: how fast a backlog of old readings is deleted (``rnr-gateway prune``).

A fresh database (dropped afterwards) gets ``--rows`` readings older than the cutoff,
shaped like the simulator's (500 nodes, enhanced, one JSON object each), and a quarter as
many newer ones; then one retention pass (``rnr_gateway.retention.prune``, what the
gateway's hourly pass and ``rnr-gateway prune`` run) deletes the old ones, 5 000 per
statement, and reports the rows per second and the table's size before and after.

    python -m bench.prune --env-file .env                 (1 000 000 old readings)
    python -m bench.prune --env-file .env --rows 200000

Hold the machine's test lock while it runs: ``flock /tmp/rnr-test.lock make bench-prune``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from rnr_gateway.retention import BATCH_ROWS, prune
from rnr_gateway.settings import Settings

from .ingest import PREFIX, say
from .services import create_database, drop_database, revision

MIB = 2**20
FILL = """
INSERT INTO sensor_data (node_id, data, received_at, kind, boot, seq)
SELECT 'ESP32_' || lpad((i % 500)::text, 4, '0'),
       jsonb_build_object('temperature', round((20 + random() * 5)::numeric, 2),
                          'humidity', round((40 + random() * 20)::numeric, 2),
                          'boot', 1, 'seq', i, 'ts', extract(epoch FROM $2::timestamptz)),
       $2::timestamptz + i * interval '1 ms', 'reading', $3, i
FROM generate_series(1, $1) AS i
"""


async def size_of(conn: asyncpg.Connection) -> float:
    return int(await conn.fetchval("SELECT pg_total_relation_size('sensor_data')")) / MIB


async def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(env_file=args.env_file)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    db_url = await create_database(settings.db.url.value, name)
    now = datetime.now(UTC)
    try:
        conn = await asyncpg.connect(db_url)
        try:
            say(f"filling: {args.rows:,} readings 40 days old, {args.rows // 4:,} 2 days old")
            await conn.execute(FILL, args.rows, now - timedelta(days=40), 1)
            await conn.execute(FILL, args.rows // 4, now - timedelta(days=2), 2)
            await conn.execute("VACUUM ANALYZE sensor_data")
            before = await size_of(conn)
            started, cpu = time.monotonic(), time.process_time()
            counts = await prune(conn, now - timedelta(days=30), progress=say)
            took = time.monotonic() - started
            left = int(await conn.fetchval("SELECT count(*) FROM sensor_data"))
            await conn.execute("VACUUM sensor_data")
            after = await size_of(conn)
        finally:
            await conn.close()
        deleted = counts["sensor_data"]
        print(f"\n## Retention pass, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        print(f"- command: `python -m bench.prune --env-file {args.env_file} --rows {args.rows}`")
        print(f"- revision: {revision()}")
        print(
            f"- deleted {deleted:,} readings in {took:.1f} s ({deleted / took:,.0f} rows/s,"
            f" {BATCH_ROWS:,} per statement); {left:,} newer ones kept;"
            f" client CPU {time.process_time() - cpu:.2f} s"
        )
        print(
            f"- sensor_data with its indexes: {before:,.0f} MiB before, {after:,.0f} MiB after"
            " VACUUM (the space is reused by new rows; only VACUUM FULL gives it back)"
        )
        if deleted != args.rows or left != args.rows // 4:
            print(f"- MISMATCH: expected {args.rows:,} deleted and {args.rows // 4:,} kept")
            return 1
    finally:
        await drop_database(settings.db.url.value, name)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.prune", description=__doc__.split("\n\n")[0])
    p.add_argument("--env-file", default=".env")
    p.add_argument("--rows", type=int, default=1_000_000, help="old readings to delete")
    args = p.parse_args()
    if not 1 <= args.rows <= 20_000_000:
        p.error("--rows must be 1-20 000 000")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
