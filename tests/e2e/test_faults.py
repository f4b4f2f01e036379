"""Faults injected for real into the shared services while enhanced readings stream in.

PostgreSQL is stopped for 10 s; RabbitMQ is restarted cleanly and, separately, killed with
SIGKILL. The gateway must ride each fault out by itself: every reading the broker PUBACKed
is stored exactly once, ingest resumes, consumers come back (checked on the broker, not
assumed) and the outage shows in the metrics. Commands too: one in flight when PostgreSQL
stops is acked meanwhile and recorded once it is back (a new one is refused with the
reason); those taken while RabbitMQ is down go out after it, in priority order, once each.

These tests stop services other tests use: run them under the suite lock
(``flock /tmp/rnr-test.lock .venv/bin/pytest -m fault``). Every fault is undone in a
``finally`` block, and a fixture checks both services again at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from rnr_gateway import topology
from rnr_gateway.errors import DependencyUnavailable
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Settings
from rnr_gateway.simulate import FleetConfig, FleetReport, run_fleet
from tests.conftest import BrokerAdmin, eventually, mqtt_client, running
from tests.e2e.command_node import TestNode, settled, statuses

log = logging.getLogger(__name__)
PG_VERSION = max(os.listdir("/etc/postgresql"), key=int) if Path("/etc/postgresql").is_dir() else ""
PG_CLUSTER = ("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main")
SENSOR = topology.SENSOR_QUEUE
NODES = 4
RATE_HZ = 25.0
OUTAGE_S = 10.0
Key = tuple[str, int, int]  # (node_id, boot, seq)


# -- bounded commands ----------------------------------------------------------------------
async def sh(*argv: str, within: float, detach: bool = False) -> tuple[int, str]:
    """Run a command, bounded; returns (exit code, output). ``detach`` is for daemons that
    keep inherited pipes open (``rabbitmq-server -detached``): their output is discarded.
    Inherited descriptors are closed (the default, kept on purpose): a broker started from
    here must not hold the suite's flock for the rest of its life."""
    pipe = subprocess.DEVNULL if detach else subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=subprocess.DEVNULL if detach else subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(within):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {within} s") from None
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode(errors="replace").strip()


async def wait_for_command(argv: tuple[str, ...], within: float, what: str) -> None:
    """Repeat a (bounded) check command until it succeeds, at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        rc, out = await sh(*argv, within=max(5.0, deadline - time.monotonic()))
        if rc == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s: {out[-500:]}")
        await asyncio.sleep(0.5)


# -- PostgreSQL ----------------------------------------------------------------------------
def pg_port(settings: Settings) -> str:
    return str(urlsplit(settings.db.url.value).port or 5432)


async def pg_ready(settings: Settings) -> bool:
    rc, _ = await sh("pg_isready", "-q", "-h", "127.0.0.1", "-p", pg_port(settings), within=10)
    return rc == 0


async def pg_stop() -> None:
    rc, out = await sh(*PG_CLUSTER, "stop", "-m", "fast", within=60)
    assert rc == 0, f"pg_ctlcluster stop failed ({rc}): {out}"


async def pg_start(settings: Settings) -> None:
    """Start the cluster unless it already accepts connections; wait until it does."""
    if not await pg_ready(settings):
        rc, out = await sh(*PG_CLUSTER, "start", within=60)
        assert rc == 0 or await pg_ready(settings), f"pg_ctlcluster start failed ({rc}): {out}"
    probe = ("pg_isready", "-q", "-h", "127.0.0.1", "-p", pg_port(settings))
    await wait_for_command(probe, 60, "PostgreSQL accepting connections")


@contextlib.asynccontextmanager
async def postgres_stopped(settings: Settings) -> AsyncIterator[None]:
    try:
        await pg_stop()
        yield
    finally:
        await pg_start(settings)


# -- RabbitMQ ------------------------------------------------------------------------------
async def rabbit_running() -> bool:
    rc, _ = await sh("rabbitmq-diagnostics", "-q", "check_running", within=30)
    return rc == 0


async def rabbit_stop() -> None:
    rc, out = await sh("rabbitmqctl", "stop", within=60)
    assert rc == 0, f"rabbitmqctl stop failed ({rc}): {out}"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead too


async def rabbit_kill() -> None:
    rc, out = await sh("rabbitmqctl", "eval", "os:getpid().", within=30)
    assert rc == 0, f"cannot get the broker's pid: {out}"
    pid = int(out.strip().strip('"'))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"beam.smp {pid} still alive 10 s after SIGKILL"
        await asyncio.sleep(0.1)


async def rabbit_start() -> None:
    """Start the broker unless it runs; wait (bounded) until it has fully booted."""
    if await rabbit_running():
        return
    await sh("rabbitmq-server", "-detached", within=30, detach=True)
    await wait_for_command(
        ("rabbitmqctl", "-q", "await_startup", "--timeout", "30"), 90, "RabbitMQ booted"
    )
    await wait_for_command(("rabbitmq-diagnostics", "-q", "check_running"), 30, "RabbitMQ running")


@contextlib.asynccontextmanager
async def rabbit_down(how: str) -> AsyncIterator[None]:
    try:
        await (rabbit_kill() if how == "kill" else rabbit_stop())
        yield
    finally:
        await rabbit_start()


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def services_kept_running(settings: Settings) -> Iterator[None]:
    """Whatever happened in the test, both services run afterwards (torn down before the
    vhost and the database, which need them)."""
    yield
    port = pg_port(settings)
    if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", port], timeout=10).returncode:
        subprocess.run([*PG_CLUSTER, "start"], timeout=60, check=False)
    check = ["rabbitmq-diagnostics", "-q", "check_running"]
    if subprocess.run(check, timeout=30, capture_output=True).returncode:
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        subprocess.run(
            ["rabbitmqctl", "-q", "await_startup", "--timeout", "90"],
            timeout=100,
            capture_output=True,
            check=False,
        )


# -- the stream ----------------------------------------------------------------------------
@dataclass
class Stream:
    """Enhanced nodes publishing readings at QoS 1 through the MQTT plugin until stopped."""

    config: FleetConfig
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[FleetReport] | None = None

    async def finish(self, within: float = 60.0) -> FleetReport:
        assert self.task is not None
        self.stop.set()
        return await asyncio.wait_for(self.task, within)


@contextlib.asynccontextmanager
async def streaming(settings: Settings, prefix: str) -> AsyncIterator[Stream]:
    config = FleetConfig.from_settings(
        settings,
        nodes=NODES,
        rate_hz=RATE_HZ,
        legacy_share=0.0,
        readings_only=True,
        node_prefix=prefix,
        progress_interval_s=3600,
        connect_retries=40,
    )
    stream = Stream(config)
    stream.task = asyncio.create_task(run_fleet(config, stream.stop, progress=lambda _: None))
    try:
        yield stream
    finally:
        stream.stop.set()
        if not stream.task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.task), 30)
            stream.task.cancel()


async def fetch_keys(database: str) -> list[Key]:
    conn = await asyncpg.connect(database, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT node_id, boot, seq FROM sensor_data WHERE seq IS NOT NULL", timeout=10
        )
    finally:
        await conn.close(timeout=5)
    return [(r["node_id"], r["boot"], r["seq"]) for r in rows]


async def fetch_value(database: str, sql: str) -> int:
    conn = await asyncpg.connect(database, timeout=5)
    try:
        value: int = await conn.fetchval(sql, timeout=10)
    finally:
        await conn.close(timeout=5)
    return value


@dataclass(frozen=True)
class Missing:
    count: int
    sample: list[Key]


async def assert_stored_exactly_once(
    gateway: Gateway, database: str, confirmed: set[Key], uncertain: set[Key]
) -> list[Key]:
    """Every confirmed key becomes one row (waiting, bounded, for the backlog to drain);
    no row is anything but a confirmed or uncertain key; no key is stored twice."""

    async def missing() -> Missing:
        gone = confirmed - set(await fetch_keys(database))
        return Missing(len(gone), sorted(gone)[:10])

    try:
        await eventually(missing, lambda m: m.count == 0, within=30)
    finally:
        summarise(gateway, confirmed, uncertain, len(await fetch_keys(database)))
    keys = await fetch_keys(database)
    assert len(keys) == len(set(keys)), "a reading was stored twice"
    twice = await fetch_value(
        database,
        "SELECT count(*) - count(DISTINCT (node_id, boot, seq)) FROM sensor_data "
        "WHERE seq IS NOT NULL",
    )
    assert twice == 0, "a reading was stored twice"
    assert set(keys) <= confirmed | uncertain, "rows that no node sent"
    return keys


def sent_keys(report: FleetReport) -> tuple[set[Key], set[Key]]:
    confirmed = {(n.node_id, n.boot, s) for n in report.nodes for s in n.confirmed}
    uncertain = {(n.node_id, n.boot, s) for n in report.nodes for s in n.uncertain}
    assert not confirmed & uncertain
    return confirmed, uncertain


def summarise(gateway: Gateway, confirmed: set[Key], uncertain: set[Key], stored: int) -> None:
    """One line for the captured log of a failing run."""
    value = gateway.metrics.value
    log.info(
        "confirmed %d, uncertain %d, stored %d; gateway: consumed %d, acked %d, ack lost %d, "
        "duplicates %d",
        len(confirmed),
        len(uncertain),
        stored,
        value("rnr_messages_consumed_total", {"queue": SENSOR}),
        value("rnr_messages_acked_total"),
        value("rnr_ack_lost_total"),
        value("rnr_messages_duplicate_total"),
    )


def gateway_alive() -> bool:
    return any(t.get_name() == "gateway" for t in asyncio.all_tasks())  # bench.services.running


async def rows_grow(database: str, by: int, within: float = 20.0) -> None:
    """New readings keep arriving: the row count grows by ``by`` (bounded wait)."""
    start = len(await fetch_keys(database))
    await eventually(lambda: fetch_keys(database), lambda k: len(k) >= start + by, within=within)


# -- tests ---------------------------------------------------------------------------------
@pytest.mark.fault
@pytest.mark.skipif(not PG_VERSION, reason="no local PostgreSQL cluster to stop")
async def test_postgresql_stopped_mid_stream_loses_nothing(
    settings: Settings, database: str, unique: str, services_kept_running: None
) -> None:
    pg = {"system": "postgresql"}
    async with running(Gateway(settings)) as gateway, streaming(settings, f"PG{unique}") as s:
        await eventually(lambda: fetch_keys(database), lambda k: len(k) >= 50, within=15)
        assert gateway.metrics.value("rnr_dependency_up", pg) == 1
        node = TestNode(settings, f"PGC{unique}")
        async with node.connected(gateway):
            node.hold.clear()  # its acks wait: the command is in flight when the database goes
            flight = await gateway.commands.submit(node.node_id, {"action": "PING"})
            await settled(gateway, flight.message_id, frozenset(("sent",)))

            async with postgres_stopped(settings):
                stopped_at = time.monotonic()
                await eventually(
                    lambda: gateway.metrics.value("rnr_dependency_up", pg),
                    lambda v: v == 0,
                    within=8,
                )
                # no outbox, no command: refused at once, with the reason
                with pytest.raises(DependencyUnavailable):
                    await gateway.commands.submit(node.node_id, {"action": "PING"})
                node.hold.set()  # acked while the database is down: recorded once it is back
                # hold the outage for its full length while readings keep arriving
                await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
                assert gateway_alive(), "the gateway stopped during the database outage"
                backlog = gateway.ingest.backlog + gateway.metrics.value(
                    "rnr_ingest_unacked_in_client"
                )
                assert backlog > 0, "no delivery waited for the database during the outage"

            await eventually(
                lambda: gateway.metrics.value("rnr_dependency_up", pg), lambda v: v == 1, within=20
            )
            done = await settled(gateway, flight.message_id, within=30)
        assert statuses(done) == ["queued", "sent", "received", "executed"]
        assert node.log.executed == {flight.message_id: 1}
        await rows_grow(database, by=NODES * 25)  # ingest resumed by itself
        report = await s.finish()
        assert gateway_alive()
        confirmed, uncertain = sent_keys(report)
        keys = await assert_stored_exactly_once(gateway, database, confirmed, uncertain)

    assert len(confirmed) >= NODES * RATE_HZ * OUTAGE_S * 0.5, "too few readings to be a test"
    assert not uncertain, "the broker stayed up: every publish should have been confirmed"
    assert len(keys) == len(confirmed)
    assert gateway.metrics.value("rnr_outages_total", pg) >= 1
    assert gateway.metrics.value("rnr_reconnects_total", pg) >= 1
    assert await fetch_value(database, "SELECT count(*) FROM failed_messages") == 0


async def broker_consumers(admin: BrokerAdmin, vhost: str, queue: str) -> int:
    info = await asyncio.to_thread(admin.queue, vhost, queue)
    return int(info.get("consumers") or 0)


@pytest.mark.fault
@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_rabbitmq_outage_mid_stream_loses_nothing(
    how: str,
    settings: Settings,
    database: str,
    vhost: str,
    unique: str,
    broker_admin: BrokerAdmin,
    services_kept_running: None,
) -> None:
    mq = {"system": "rabbitmq"}
    consumers = {"queue": SENSOR}
    async with running(Gateway(settings)) as gateway, streaming(settings, f"MQ{unique}") as s:
        await eventually(lambda: fetch_keys(database), lambda k: len(k) >= 50, within=15)
        await eventually(  # management stats lag by a few seconds
            lambda: broker_consumers(broker_admin, vhost, SENSOR), lambda n: n == 1, within=15
        )
        assert gateway.metrics.value("rnr_amqp_consumers", consumers) == 1
        assert gateway.metrics.value("rnr_dependency_up", mq) == 1
        node = TestNode(settings, f"CMD{unique}")
        async with node.connected(gateway):
            pass  # known to the gateway now; it leaves (offline) before the outage

        async with rabbit_down(how):
            # the broker is gone: the gateway must know, not believe it still consumes
            await eventually(
                lambda: gateway.metrics.value("rnr_dependency_up", mq), lambda v: v == 0, within=5
            )
            assert gateway.metrics.value("rnr_amqp_consumers", consumers) == 0
            assert gateway_alive()
            # commands are still taken (the outbox is the record), to go out once it is back
            during = [
                await gateway.commands.submit(node.node_id, {"action": "PING", "n": n}, priority=p)
                for n, p in enumerate((2, 9, 5))
            ]
            assert {r.status for r in during} == {"queued"}

        await eventually(
            lambda: gateway.metrics.value("rnr_dependency_up", mq), lambda v: v == 1, within=30
        )
        assert gateway.metrics.value("rnr_reconnects_total", mq) >= 1
        assert gateway.metrics.value("rnr_outages_total", mq) >= 1
        assert gateway.metrics.value("rnr_amqp_consumers", consumers) == 1
        # the broker's own view
        await eventually(
            lambda: broker_consumers(broker_admin, vhost, SENSOR), lambda n: n == 1, within=20
        )

        # MQTT on its configured port came back with the broker: a fresh client gets through
        marker: Key = (f"MK{unique}", 1, 0)
        async with mqtt_client(settings, f"marker-{unique}") as client:
            body = {"temperature": 1.0, "boot": marker[1], "seq": marker[2]}
            await client.publish(f"devices/{marker[0]}/data", orjson.dumps(body), qos=1)
        await rows_grow(database, by=NODES * 25)  # the fleet reconnected and ingest resumed

        # commands: the gateway holds the command queues again and sends, those taken
        # during the outage first, highest priority first, each executed once
        await eventually(gateway.commands.active.is_set, bool, within=30)
        async with node.connected(gateway):
            for record in during:
                assert (await settled(gateway, record.message_id, within=20)).status == "executed"
            record = await gateway.commands.submit(node.node_id, {"action": "PING"})
            assert (await settled(gateway, record.message_id, within=20)).status == "executed"
        assert node.log.ids == [
            during[1].message_id,
            during[2].message_id,
            during[0].message_id,
            record.message_id,
        ]
        assert set(node.log.executed.values()) == {1}

        report = await s.finish()
        assert gateway_alive()
        confirmed, uncertain = sent_keys(report)
        await assert_stored_exactly_once(gateway, database, confirmed | {marker}, uncertain)

    for node in report.nodes:
        assert node.reconnects >= 1, f"{node.node_id} never lost its connection"
        assert node.confirmed and max(node.confirmed) > max(node.uncertain, default=-1), (
            f"{node.node_id} published nothing after the broker came back"
        )
    assert len(confirmed) >= NODES * RATE_HZ * 2
    assert gateway.metrics.value("rnr_messages_failed_total", {"reason": "store_refused"}) == 0
