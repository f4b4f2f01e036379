"""Retention: rows older than ``RETENTION_DAYS`` deleted in small batches, hourly.

What goes: readings and status messages (``sensor_data``) received before the cutoff;
presence transitions before it, except each node's latest (presence restores from it);
commands that expired before it, with their events (a queued one is left to the expiry
sweep first); acks that matched no command; failed messages last seen before it.
``nodes`` is never touched. Off by default (``RETENTION_DAYS=0`` keeps everything).

Each batch is its own short transaction, so ingest never waits behind a long delete, and
one gateway at a time prunes (a session advisory lock: several gateways on one database
take turns, none of them repeats another's work). A long pass logs its progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client import Counter, Gauge

from .command_codec import utcnow
from .errors import DependencyUnavailable
from .metrics import Metrics
from .settings import RetentionSettings

if TYPE_CHECKING:
    from .db import Conn, Database

log = logging.getLogger(__name__)
LOCK = 0x726E7270  # pg_advisory_lock key: one pruning gateway at a time
BATCH_ROWS = 5_000
PAUSE_S = 0.02  # between batches: the database's other clients get their turn
PROGRESS_EVERY_S = 10.0
FIRST_PASS_AFTER_S = 60.0  # after start: the gateway settles in first
# one batch on a slow disk may take longer than DB_COMMAND_TIMEOUT_S, which is sized for
# ingest's statements; running into this one means the database is really in trouble
STATEMENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Target:
    table: str
    what: str  # for log lines
    delete: str  # $1 the cutoff, $2 the batch size; deletes at most $2 rows


TARGETS = (
    Target(
        "sensor_data",
        "readings",
        "DELETE FROM sensor_data WHERE id IN (SELECT id FROM sensor_data"
        " WHERE received_at < $1 LIMIT $2)",
    ),
    Target(
        "node_events",
        "presence transitions",
        "DELETE FROM node_events WHERE id IN (SELECT e.id FROM node_events e"
        " WHERE e.at < $1 AND EXISTS (SELECT 1 FROM node_events l"
        "  WHERE l.node_id = e.node_id AND (l.at, l.id) > (e.at, e.id)) LIMIT $2)",
    ),
    Target(
        "commands",
        "commands",
        "DELETE FROM commands WHERE message_id IN (SELECT message_id FROM commands"
        " WHERE expires_at < $1 AND status <> 'queued' LIMIT $2)",
    ),
    Target(
        "command_acks_unmatched",
        "unmatched acks",
        "DELETE FROM command_acks_unmatched WHERE id IN (SELECT id FROM"
        " command_acks_unmatched WHERE received_at < $1 LIMIT $2)",
    ),
    Target(
        "failed_messages",
        "failed messages",
        "DELETE FROM failed_messages WHERE id IN (SELECT id FROM failed_messages"
        " WHERE last_seen < $1 LIMIT $2)",
    ),
)


class Retention:
    def __init__(
        self,
        settings: RetentionSettings,
        db: Database,
        metrics: Metrics,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.days = settings.days
        self.interval_s = settings.interval_s
        self.db = db
        self.clock = clock
        self.stopped = asyncio.Event()
        r = metrics.registry
        self.deleted = Counter(
            "rnr_retention_deleted",
            "Rows deleted as older than RETENTION_DAYS",
            ["table"],
            registry=r,
        )
        self.last_pass = Gauge(
            "rnr_retention_last_pass_timestamp_seconds",
            "When this gateway last finished a retention pass (0: never)",
            registry=r,
        )

    def request_stop(self) -> None:
        self.stopped.set()

    async def run(self) -> None:
        """A pass shortly after start, then one every ``interval_s``, while enabled."""
        if self.days <= 0:
            return
        log.info(
            "retention: rows older than %g day(s) are deleted every %g s",
            self.days,
            self.interval_s,
        )
        wait = min(FIRST_PASS_AFTER_S, self.interval_s)
        while not self.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), wait)
            if self.stopped.is_set():
                return
            wait = self.interval_s
            try:
                await self.db.retrying(self.prune_once, self.stopped)
            except DependencyUnavailable as exc:
                log.debug("retention pass skipped: %s", exc)
            except asyncpg.PostgresError as exc:  # refused by the server: ingest goes on
                log.error(
                    "retention pass failed (%s: %s); next attempt in %g s",
                    type(exc).__name__,
                    exc,
                    self.interval_s,
                )

    async def prune_once(self, conn: Conn) -> dict[str, int] | None:
        """One pass over every table, under the lock; None when another gateway holds it."""
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK):
            log.debug("retention: another gateway is pruning; skipped")
            return None
        try:
            cutoff = self.clock() - timedelta(days=self.days)
            counts = await prune(conn, cutoff, self.stopped, counted=self._counted)
        finally:
            with contextlib.suppress(Exception):  # a lost connection released it already
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK)
        self.last_pass.set(time.time())
        return counts

    def _counted(self, table: str, n: int) -> None:
        self.deleted.labels(table).inc(n)


async def prune(
    conn: Conn,
    cutoff: datetime,
    stop: asyncio.Event | None = None,
    progress: Callable[[str], None] = log.info,
    counted: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Delete what is older than ``cutoff`` from every table, ``BATCH_ROWS`` at a time;
    ``counted(table, n)`` after each batch. Returns the rows deleted per table. Stops
    early (between batches) when ``stop`` is set.
    """
    started = time.monotonic()
    counts: dict[str, int] = {}
    for target in TARGETS:
        counts[target.table] = await _prune_table(conn, target, cutoff, stop, progress, counted)
        if stop is not None and stop.is_set():
            break
    if any(counts.values()):
        progress(
            f"retention: deleted {_listed(counts)} older than {cutoff:%Y-%m-%d %H:%M} UTC"
            f" in {time.monotonic() - started:.1f} s"
        )
    return counts


async def _prune_table(
    conn: Conn,
    target: Target,
    cutoff: datetime,
    stop: asyncio.Event | None,
    progress: Callable[[str], None],
    counted: Callable[[str, int], None] | None,
) -> int:
    total = 0
    said = time.monotonic()
    while stop is None or not stop.is_set():
        status = await conn.execute(target.delete, cutoff, BATCH_ROWS, timeout=STATEMENT_TIMEOUT_S)
        n = int(status.rsplit(" ", 1)[-1])  # "DELETE <n>"
        total += n
        if counted is not None and n:
            counted(target.table, n)
        if n < BATCH_ROWS:
            break
        if time.monotonic() - said >= PROGRESS_EVERY_S:
            said = time.monotonic()
            progress(f"retention: {total:,} {target.what} deleted so far, still going")
        await asyncio.sleep(PAUSE_S)
    return total


def _listed(counts: dict[str, int]) -> str:
    names = {t.table: t.what for t in TARGETS}
    return ", ".join(f"{n:,} {names[table]}" for table, n in counts.items() if n)
