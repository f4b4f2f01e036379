"""The Gateway owns every resource and one TaskGroup; shutdown is staged with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

from . import topology
from .amqp import Amqp, Consumer
from .db import Database, pending_migrations
from .errors import GatewayError
from .ingest import Ingest
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger(__name__)
INGEST_QUEUES = (topology.SENSOR_QUEUE, topology.STATUS_QUEUE, topology.FAILED_QUEUE)
Extra = Callable[["Gateway"], Awaitable[None]]


class Gateway:
    def __init__(self, settings: Settings, *, extras: Mapping[str, Extra] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.extras = dict(extras or {})
        self.db = Database(settings.db, self.metrics)
        self.ingest = Ingest(settings.ingest, self.db, self.metrics)
        self.amqp = Amqp(
            settings.amqp,
            self.metrics,
            [Consumer(q, partial(self.ingest.submit, q)) for q in INGEST_QUEUES],
        )
        self._stop = asyncio.Event()
        self.started = asyncio.Event()

    def request_stop(self) -> None:
        """Ask for a staged shutdown (signals in ``__main__`` call this)."""
        self._stop.set()

    async def run(self) -> None:
        async with self.db:
            async with self.db.pool.acquire() as conn:
                pending = await pending_migrations(conn)
            if pending:
                raise GatewayError(
                    f"database has {len(pending)} pending migration(s) ({', '.join(pending)}); "
                    "run `rnr-gateway migrate` first"
                )
            async with self.amqp, asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.amqp.run(), name="amqp"),
                    tg.create_task(self.ingest.run(), name="ingest"),
                ]
                for name, extra in self.extras.items():
                    tasks.append(tg.create_task(_logged(name, extra(self)), name=name))
                self.started.set()
                log.info("gateway running: consuming %s", ", ".join(INGEST_QUEUES))
                await self._stop.wait()
                await self._shutdown()
                for task in tasks:
                    task.cancel()
        log.info("gateway stopped")

    async def _shutdown(self) -> None:
        budget = self.settings.shutdown_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        log.info("stopping: cancelling consumers")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.1, budget * 0.2)):
                await self.amqp.stop_consuming()
        log.info("stopping: flushing %d buffered deliveries", self.ingest.backlog)
        drained = await self.ingest.drain(max(0.1, deadline - loop.time()))
        if not drained:
            log.warning(
                "shutdown deadline passed with deliveries unacked; the broker redelivers them"
            )
        self.ingest.request_stop()
        self.amqp.request_stop()


async def _logged(name: str, work: Awaitable[None]) -> None:
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("task %s crashed", name)
        raise
