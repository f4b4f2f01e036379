"""Retention against the real PostgreSQL: what goes, what stays, one pruner at a time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from bench.services import running

from rnr_gateway import retention
from rnr_gateway.cli import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE
from rnr_gateway.db import Database
from rnr_gateway.gateway import Gateway
from rnr_gateway.metrics import Metrics
from rnr_gateway.retention import Retention, prune
from rnr_gateway.settings import RetentionSettings, Settings

from ..conftest import env_for, eventually

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 27, 14, 30, tzinfo=UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=2)
CUTOFF = NOW - timedelta(days=30)


async def fill(db: asyncpg.Connection, old_readings: int = 7) -> None:
    """Rows on both sides of ``CUTOFF`` in every table retention looks at."""
    await db.executemany(
        "INSERT INTO sensor_data (node_id, data, received_at) VALUES ($1, '{}', $2)",
        [("N1", OLD + timedelta(seconds=i)) for i in range(old_readings)]
        + [("N1", RECENT), ("N2", RECENT)],
    )
    await db.executemany(
        "INSERT INTO node_events (node_id, from_status, to_status, reason, at)"
        " VALUES ($1, $2, $3, 'message', $4)",
        [
            ("N1", "unknown", "online", OLD),
            ("N1", "online", "offline", OLD + timedelta(hours=1)),
            ("N1", "offline", "online", RECENT),
            # N2 went offline long ago and stayed so: its one transition is its latest
            ("N2", "online", "offline", OLD),
        ],
    )
    commands = [
        ("c-old-done", "executed", OLD, OLD + timedelta(minutes=5)),
        ("c-old-sent", "sent", OLD, OLD + timedelta(minutes=5)),  # legacy node: ends at sent
        ("c-old-queued", "queued", OLD, OLD + timedelta(minutes=5)),  # the sweep's first
        ("c-recent", "executed", RECENT, RECENT + timedelta(minutes=5)),
    ]
    await db.executemany(
        "INSERT INTO commands (message_id, node_id, action, params, priority, ttl_s, status,"
        " created_at, expires_at, updated_at)"
        " VALUES ($1, 'N1', 'PING', '{\"action\": \"PING\"}', 5, 300, $2, $3, $4, $3)",
        commands,
    )
    await db.executemany(
        "INSERT INTO command_events (message_id, status, at) VALUES ($1, $2, $3)",
        [(mid, status, at) for mid, status, at, _ in commands],
    )
    await db.executemany(
        "INSERT INTO command_acks_unmatched (node_id, message_id, status, reason, received_at)"
        " VALUES ('N1', $1, 'executed', 'unknown', $2)",
        [("x-old", OLD), ("x-recent", RECENT)],
    )
    await db.executemany(
        "INSERT INTO failed_messages (fingerprint, source, routing_key, body, reason,"
        " first_seen, last_seen) VALUES ($1, 'sensor_data_enhanced', 'devices.N1.data', '',"
        " 'bad_json', $2, $3)",
        [
            (b"old", OLD, OLD),
            (b"seen-again", OLD, RECENT),  # first seen long ago, seen again lately: kept
        ],
    )


async def remaining(db: asyncpg.Connection) -> dict[str, list[object]]:
    return {
        "sensor_data": [r[0] for r in await db.fetch("SELECT received_at FROM sensor_data")],
        "node_events": [
            (r[0], r[1])
            for r in await db.fetch("SELECT node_id, at FROM node_events ORDER BY node_id")
        ],
        "commands": sorted(r[0] for r in await db.fetch("SELECT message_id FROM commands")),
        "command_events": sorted(
            r[0] for r in await db.fetch("SELECT message_id FROM command_events")
        ),
        "command_acks_unmatched": [
            r[0] for r in await db.fetch("SELECT message_id FROM command_acks_unmatched")
        ],
        "failed_messages": [
            bytes(r[0]) for r in await db.fetch("SELECT fingerprint FROM failed_messages")
        ],
    }


async def test_prune_deletes_what_is_older_than_the_cutoff_in_batches_and_keeps_the_rest(
    db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(db)
    monkeypatch.setattr(retention, "BATCH_ROWS", 3)  # 7 old readings: batches of 3, 3, 1
    monkeypatch.setattr(retention, "PROGRESS_EVERY_S", 0.0)
    said: list[str] = []
    counts = await prune(db, CUTOFF, progress=said.append)
    assert counts == {
        "sensor_data": 7,
        "node_events": 2,
        "commands": 2,
        "command_acks_unmatched": 1,
        "failed_messages": 1,
    }
    left = await remaining(db)
    assert left["sensor_data"] == [RECENT, RECENT]
    # each node's latest transition stays: presence restores from it
    assert left["node_events"] == [("N1", RECENT), ("N2", OLD)]
    # the queued one waits for the expiry sweep; the others' events went with them
    assert left["commands"] == ["c-old-queued", "c-recent"]
    assert left["command_events"] == ["c-old-queued", "c-recent"]
    assert left["command_acks_unmatched"] == ["x-recent"]
    assert left["failed_messages"] == [b"seen-again"]
    assert said[:2] == [
        "retention: 3 readings deleted so far, still going",
        "retention: 6 readings deleted so far, still going",
    ]
    assert said[-1].startswith(
        "retention: deleted 7 readings, 2 presence transitions, 2 commands, 1 unmatched acks,"
        " 1 failed messages older than 2026-10-28 14:30 UTC in "
    )
    assert await prune(db, CUTOFF, progress=said.append) == dict.fromkeys(counts, 0)


async def test_one_gateway_prunes_at_a_time(settings: Settings, db: asyncpg.Connection) -> None:
    await fill(db)
    async with Database(settings.db, Metrics()) as database:
        pruner = Retention(RetentionSettings(days=30), database, Metrics(), clock=lambda: NOW)
        await db.execute("SELECT pg_advisory_lock($1)", retention.LOCK)  # another gateway's
        async with database.pool.acquire() as conn:
            assert await pruner.prune_once(conn) is None
        assert len((await remaining(db))["sensor_data"]) == 9
        await db.execute("SELECT pg_advisory_unlock($1)", retention.LOCK)
        async with database.pool.acquire() as conn:
            counts = await pruner.prune_once(conn)
            assert counts is not None and counts["sensor_data"] == 7
            # and it let go of the lock when done
            assert await db.fetchval("SELECT pg_try_advisory_lock($1)", retention.LOCK)


async def test_the_gateway_prunes_by_itself_and_counts_it(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await fill(db)
    # the rows are dated against the real clock here: 40 days old versus 2
    shift = datetime.now(UTC) - NOW
    for table, column in (("sensor_data", "received_at"), ("node_events", "at")):
        await db.execute(f"UPDATE {table} SET {column} = {column} + $1", shift)
    kept = replace(settings, retention=RetentionSettings(days=30, interval_s=0.2))
    async with running(Gateway(kept)) as gw:
        rows = await eventually(
            lambda: db.fetchval("SELECT count(*) FROM sensor_data"), lambda n: n == 2
        )
        assert rows == 2
        deleted = gw.metrics.registry.get_sample_value(
            "rnr_retention_deleted_total", {"table": "sensor_data"}
        )
        assert deleted == 7
        assert (await remaining(db))["node_events"] == [("N1", RECENT + shift), ("N2", OLD + shift)]


async def test_off_by_default_keeps_everything(settings: Settings, db: asyncpg.Connection) -> None:
    await fill(db)
    assert settings.retention.days == 0
    async with Database(settings.db, Metrics()) as database:
        pruner = Retention(settings.retention, database, Metrics())
        await asyncio.wait_for(pruner.run(), 1)  # returns at once: nothing to do
    assert len((await remaining(db))["sensor_data"]) == 9


def prune_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "rnr_gateway", "prune", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stderr


async def test_prune_command_deletes_now_and_says_what(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await fill(db)
    env = env_for(settings)
    code, err = await asyncio.to_thread(prune_cli, env)
    assert code == EXIT_CONFIG and "RETENTION_DAYS is unset or 0" in err, err
    await db.execute("SELECT pg_advisory_lock($1)", retention.LOCK)
    code, err = await asyncio.to_thread(prune_cli, env, "--days", "30")
    assert code == EXIT_UNAVAILABLE and "a gateway is pruning this database now" in err, err
    await db.execute("SELECT pg_advisory_unlock($1)", retention.LOCK)
    # the rows are 40 and 2 days older than NOW, which is not now: keep a cutoff between
    days = (datetime.now(UTC) - CUTOFF).total_seconds() / 86_400
    code, err = await asyncio.to_thread(prune_cli, env, "--days", f"{days:.4f}")
    assert code == EXIT_OK, err
    assert "retention: deleted 7 readings, 2 presence transitions" in err, err
    assert len((await remaining(db))["sensor_data"]) == 2
    code, err = await asyncio.to_thread(prune_cli, env | {"RETENTION_DAYS": f"{days:.4f}"})
    assert code == EXIT_OK and "retention: nothing older than" in err, err


async def test_a_pass_the_server_refuses_is_logged_and_tried_again_later(
    settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(db)
    await db.execute("DROP TABLE failed_messages")  # the last table of a pass
    async with Database(settings.db, Metrics()) as database:
        pruner = Retention(
            RetentionSettings(days=30, interval_s=0.1), database, Metrics(), clock=lambda: NOW
        )
        task = asyncio.create_task(pruner.run())
        failures = await eventually(
            lambda: [r for r in caplog.records if r.getMessage().startswith("retention pass")],
            lambda found: len(found) >= 2,
        )
        assert not task.done()  # still running: the gateway's other tasks go on
        pruner.request_stop()
        await asyncio.wait_for(task, 5)
    assert failures[0].levelname == "ERROR"
    assert failures[0].getMessage() == (
        'retention pass failed (UndefinedTableError: relation "failed_messages" does not'
        " exist); next attempt in 0.1 s"
    )
    # what came before the refused table was deleted all the same
    assert await db.fetchval("SELECT count(*) FROM sensor_data") == 2
