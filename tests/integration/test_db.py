"""The PostgreSQL adapter against the real server: work the server rolls back runs again."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from rnr_gateway.db import Database, refused
from rnr_gateway.metrics import Metrics
from rnr_gateway.settings import Settings


async def test_work_rolled_back_by_a_deadlock_runs_again(
    settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Two units of work lock two rows in opposite orders: the server breaks the deadlock
    by rolling one back, which is then run again, not taken for an outage or bad data."""
    caplog.set_level(logging.WARNING, logger="rnr_gateway.db")
    await db.execute("INSERT INTO nodes (node_id) VALUES ('A'), ('B')")
    both_hold_one = asyncio.Barrier(2)
    runs = {"AB": 0, "BA": 0}

    def work(first: str, second: str) -> object:
        async def run(conn: asyncpg.Connection) -> str:
            runs[first + second] += 1
            async with conn.transaction():
                await conn.execute("UPDATE nodes SET name = $1 WHERE node_id = $2", "x", first)
                if runs[first + second] == 1:
                    await asyncio.wait_for(both_hold_one.wait(), 5)
                await conn.execute("UPDATE nodes SET name = $1 WHERE node_id = $2", "y", second)
            return first + second

        return run

    stop = asyncio.Event()
    async with Database(settings.db, Metrics()) as database:
        done = await asyncio.wait_for(
            asyncio.gather(
                database.retrying(work("A", "B"), stop),  # type: ignore[arg-type]
                database.retrying(work("B", "A"), stop),  # type: ignore[arg-type]
            ),
            20,
        )
        assert database.up
    assert done == ["AB", "BA"]
    assert sorted(runs.values()) == [1, 2]  # one of them ran again
    assert any("rolled back" in r.getMessage() for r in caplog.records)
    assert not refused(asyncpg.DeadlockDetectedError("deadlock detected"))
    assert refused(asyncpg.NotNullViolationError("null value"))
