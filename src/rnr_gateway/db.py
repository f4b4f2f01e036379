"""PostgreSQL adapter: the asyncpg pool, migrations, and riding out outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from importlib import resources
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # what the pool hands out and what a plain connect returns; code takes either
    Conn: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]

from .errors import DependencyUnavailable
from .metrics import Metrics
from .settings import DbSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
SYSTEM = "postgresql"
MIGRATION_LOCK = 0x726E7267  # pg_advisory_lock key: one migrator at a time

# Errors that mean "the database is not reachable right now", not "this data is bad".
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # a connection left mid-operation by an outage ("another operation is in progress");
    # the pool terminates it on release and the retry gets a fresh one
    asyncpg.InternalClientError,
)
CONNECT_FAILURE: tuple[type[BaseException], ...] = (*TRANSIENT, asyncpg.PostgresError)


# A deadlock or serialization failure: the server rolled the work back and it may simply
# run again (neither an outage nor bad data).
RUN_AGAIN: tuple[type[BaseException], ...] = (asyncpg.TransactionRollbackError,)
MAX_RUN_AGAIN = 10  # times in a row; then the error stands


def refused(exc: BaseException) -> bool:
    """Whether the data itself was refused, by the server or by the driver encoding it (a
    ``ValueError``, though asyncpg's is an ``InterfaceError`` too): not an outage."""
    if isinstance(exc, ValueError):
        return True
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, (*TRANSIENT, *RUN_AGAIN))


class Database:
    """Owns the pool. ``retrying`` runs a unit of work until it succeeds or stop is set."""

    def __init__(self, settings: DbSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._pool: asyncpg.Pool | None = None
        self._down_since: float | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "Database used outside its context"
        return self._pool

    @property
    def up(self) -> bool:
        return self._pool is not None and self._down_since is None

    async def __aenter__(self) -> Database:
        try:
            self._pool = await asyncpg.create_pool(
                self.settings.url.value,
                # no floor: asyncpg would otherwise reconnect in the background during an
                # outage and log a traceback each time; ours logs the outage once
                min_size=0,
                max_size=self.settings.pool_size,
                command_timeout=self.settings.command_timeout_s,
                timeout=self.settings.command_timeout_s,
                reset=_keep_session,
            )
            # the pool has no floor, so prove the database answers now: fail fast at start
            await self._pool.fetchval("SELECT 1")
        except CONNECT_FAILURE as exc:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            raise DependencyUnavailable(SYSTEM, self.settings.display, _describe(exc)) from None
        self.metrics.dependency_up.labels(SYSTEM).set(1)
        log.info("connected to PostgreSQL at %s", self.settings.display)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), timeout=5)
        except TimeoutError:
            log.warning("PostgreSQL pool did not close within 5 s; terminating connections")
            self._pool.terminate()
        self._pool = None

    async def retrying(self, work: Callable[[Conn], Awaitable[T]], stop: asyncio.Event) -> T:
        """Run ``work`` on a pooled connection; on a transient failure wait and retry.

        The first failure of an outage and the recovery are logged once each; the state is
        in the ``rnr_dependency_up{system="postgresql"}`` gauge. Raises ``asyncio.CancelledError``
        only through cancellation, and ``DependencyUnavailable`` when ``stop`` is set while
        the database is down.
        """
        delay = 0.2
        rollbacks = 0
        while True:
            try:
                async with self.pool.acquire(timeout=self.settings.command_timeout_s) as conn:
                    result = await work(conn)
            except RUN_AGAIN as exc:
                rollbacks += 1
                if rollbacks > MAX_RUN_AGAIN:
                    raise
                log.warning("database work rolled back (%s); running it again", _describe(exc))
                await asyncio.sleep(0.05 * rollbacks * (0.5 + random.random()))
                continue
            except TRANSIENT as exc:
                if refused(exc):
                    raise  # the data, not the database: retrying would loop
                self._mark_down(exc)
                if stop.is_set():
                    raise DependencyUnavailable(
                        SYSTEM, self.settings.display, _describe(exc)
                    ) from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * (0.5 + random.random()))
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            self._mark_up()
            return result

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()
            self.metrics.dependency_up.labels(SYSTEM).set(0)
            self.metrics.outages.labels(SYSTEM).inc()
            log.warning(
                "PostgreSQL unavailable (%s); ingest paused, deliveries stay unacked",
                _describe(exc),
            )
            log.debug("PostgreSQL failure", exc_info=exc)

    def _mark_up(self) -> None:
        if self._down_since is not None:
            outage = asyncio.get_running_loop().time() - self._down_since
            self._down_since = None
            self.metrics.dependency_up.labels(SYSTEM).set(1)
            self.metrics.reconnects.labels(SYSTEM).inc()
            log.warning("PostgreSQL available again after %.1f s; ingest resumed", outage)


async def _keep_session(conn: Conn) -> None:
    """Pool release hook: the gateway keeps no session state (no LISTEN, no session
    settings; the migration lock is released explicitly), so the default reset's extra
    round trip per release is skipped."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every packaged migration, in order."""
    out = []
    for entry in resources.files("rnr_gateway.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text()))
    return sorted(out)


async def migrate(conn: Conn) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the applied names."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %s", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def pending_migrations(conn: Conn) -> list[str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [name for version, name, _ in migration_files() if version not in done]
