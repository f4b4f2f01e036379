"""Retention pass: how fast a backlog of old readings is deleted (``rnr-gateway prune``).

A fresh database (dropped afterwards) gets ``--rows`` readings older than the cutoff,
shaped like the simulator's (500 nodes, enhanced, one JSON object each), and a quarter as
many newer ones; then one retention pass (``rnr_gateway.retention.prune``, what the
gateway's hourly pass and ``rnr-gateway prune`` run) deletes the old ones, 5 000 per
statement, and reports the rows per second and the table's size before and after.

    python -m bench.prune --env-file .env                 (1 000 000 old readings)
    python -m bench.prune --env-file .env --rows 200000
    python -m bench.prune --env-file .env --under-load 500

With ``--under-load N`` the pass is the gateway's own: a gateway process (RETENTION_DAYS=30,
its first pass ``RETENTION_INTERVAL_S`` = 40 s after start) ingests N simulated nodes
reporting once a second meanwhile, and the readings' latency (publish ``ts`` → row
written, ``stored_at``) is compared before, during and after the pass.

Hold the machine's test lock while it runs: ``flock /tmp/rnr-test.lock make bench-prune``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

from rnr_gateway.retention import BATCH_ROWS, prune
from rnr_gateway.settings import Settings

from .ingest import PREFIX, say, spawn, stop
from .services import ADMIN_URL, BrokerAdmin, create_database, drop_database, process_env, revision

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


FIRST_PASS_S = 40.0  # RETENTION_INTERVAL_S of the gateway under load: its first pass
AFTER_S = 20.0  # readings looked at after the pass
PASS_DONE = re.compile(
    r"^(\S+ \S+) INFO +rnr_gateway.retention: retention: deleted .* in ([0-9.]+) s$", re.M
)
LATENCY = """
SELECT count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM stored_at) - ts) AS took
FROM sensor_data WHERE ts IS NOT NULL AND stored_at >= $1 AND stored_at < $2
"""


async def latency(conn: asyncpg.Connection, label: str, start: datetime, end: datetime) -> str:
    row = await conn.fetchrow(LATENCY, start, end)
    assert row is not None  # an aggregate: always one row
    secs = (end - start).total_seconds()
    took = row["took"] or [float("nan")] * 2
    return (
        f"| {label} | {secs:.1f} | {row['n'] / secs:,.0f} | {took[0] * 1000:.1f}"
        f" | {took[1] * 1000:.1f} |"
    )


async def pass_under_load(
    env_file: str, settings: Settings, db_url: str, name: str, nodes: int
) -> str:
    """The gateway's own first retention pass while it ingests ``nodes`` readings a second;
    returns the report (latency before, during and after the pass)."""
    admin = BrokerAdmin(ADMIN_URL)
    user = unquote(urlsplit(settings.amqp.url.value).username or "")
    await asyncio.to_thread(admin.create_vhost, name, user)
    env = {
        **process_env(env_file, settings, name, db_url),
        "RETENTION_DAYS": "30",
        "RETENTION_INTERVAL_S": f"{FIRST_PASS_S:g}",
    }
    log_path = Path(tempfile.mkstemp(prefix="rnr-prune-", suffix=".log")[1])
    fleet = ["-m", "rnr_gateway", "simulate", "--nodes", str(nodes), "--rate", "1"]
    fleet += ["--legacy-share", "0", "--readings-only", "--no-commands", "--prefix", "LOAD"]
    try:
        with open(log_path, "wb") as log, open(os.devnull, "wb") as quiet:  # noqa: ASYNC230
            gateway = await spawn(["-m", "rnr_gateway", "run"], env, log)
            simulator = await spawn(fleet, env, quiet)
            try:
                say(f"gateway and {nodes} nodes running; its first pass in {FIRST_PASS_S:g} s")
                done = await until_pass_done(log_path, FIRST_PASS_S + 300)
                say(f"pass done; {AFTER_S:g} s more of readings")
                await asyncio.sleep(AFTER_S + 2)
            finally:
                await stop(simulator)
                await stop(gateway)
        ended = datetime.fromisoformat(done[1].replace(",", ".")).astimezone()
        began = ended - timedelta(seconds=float(done[2]))
        conn = await asyncpg.connect(db_url)
        try:
            first = await conn.fetchval("SELECT min(stored_at) FROM sensor_data WHERE ts > 0")
            rows = [
                await latency(
                    conn,
                    "before",
                    max(first + timedelta(seconds=10), began - timedelta(seconds=30)),
                    began,
                ),
                await latency(conn, "during the pass", began, ended),
                await latency(conn, "after", ended, ended + timedelta(seconds=AFTER_S)),
            ]
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(admin.delete_vhost, name)
    return "\n".join(
        [
            f"- under load: the gateway's own pass, {nodes} nodes reporting once a second",
            f"  (publish → row written; log {log_path}):",
            "",
            "| readings | seconds | per second | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"- the pass took {float(done[2]):.1f} s under load",
        ]
    )


async def until_pass_done(log_path: Path, within_s: float) -> re.Match[str]:
    deadline = time.monotonic() + within_s
    while not (found := PASS_DONE.search(await asyncio.to_thread(log_path.read_text))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no retention pass in the gateway's log in {within_s:g} s")
        await asyncio.sleep(0.5)
    return found


async def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(env_file=args.env_file)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    db_url = await create_database(settings.db.url.value, name)
    now = datetime.now(UTC)
    loaded = ""
    try:
        conn = await asyncpg.connect(db_url)
        try:
            say(f"filling: {args.rows:,} readings 40 days old, {args.rows // 4:,} 2 days old")
            await conn.execute(FILL, args.rows, now - timedelta(days=40), 1)
            await conn.execute(FILL, args.rows // 4, now - timedelta(days=2), 2)
            await conn.execute("VACUUM ANALYZE sensor_data")
            before = await size_of(conn)
            started, cpu = time.monotonic(), time.process_time()
            if args.under_load:
                loaded = await pass_under_load(
                    args.env_file, settings, db_url, name, args.under_load
                )
                deleted = args.rows - int(
                    await conn.fetchval("SELECT count(*) FROM sensor_data WHERE boot = 1")
                )
            else:
                counts = await prune(conn, now - timedelta(days=30), progress=say)
                deleted = counts["sensor_data"]
            took = time.monotonic() - started
            left = int(await conn.fetchval("SELECT count(*) FROM sensor_data WHERE boot = 2"))
            await conn.execute("VACUUM sensor_data")
            after = await size_of(conn)
        finally:
            await conn.close()
        print(f"\n## Retention pass, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        under = f" --under-load {args.under_load}" if args.under_load else ""
        print(
            f"- command: `python -m bench.prune --env-file {args.env_file} --rows {args.rows}"
            f"{under}`"
        )
        print(f"- revision: {revision()}")
        if loaded:
            print(loaded)
        else:
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
    p.add_argument(
        "--under-load",
        type=int,
        default=0,
        metavar="N",
        help="the gateway's own pass, while N nodes report once a second",
    )
    args = p.parse_args()
    if not 1 <= args.rows <= 20_000_000 or not 0 <= args.under_load <= 5000:
        p.error("--rows must be 1-20 000 000, --under-load 0-5 000")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
