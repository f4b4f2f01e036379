"""The gateway as a real process: SIGKILL mid-stream, redelivery, cold start, SIGTERM
under load, exit codes. Devices publish over MQTT (QoS 1) through the real broker; every
outcome is read back from PostgreSQL and the broker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg
import pytest

from rnr_gateway import topology
from rnr_gateway.settings import Settings
from rnr_gateway.simulate import FleetConfig, FleetReport, run_fleet
from tests.conftest import BrokerAdmin, env_for, eventually, mqtt_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
EXIT_UNAVAILABLE, EXIT_CONFIG = 69, 78
Key = tuple[str, int, int]


# -- the gateway process -------------------------------------------------------------------
class GatewayProcess:
    """``python -m rnr_gateway run`` with its output appended to one log file per test."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, env: dict[str, str], *args: str) -> None:
        assert self.proc is None or self.proc.returncode is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"===== start #{self.starts}: run {' '.join(args)}\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                str(PYTHON),
                "-m",
                "rnr_gateway",
                "run",
                *args,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
            )

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.returncode is None, "not running"
        self.proc.send_signal(sig)

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            pytest.fail(f"gateway did not exit within {within} s\n{self.tail()}")

    async def kill(self) -> None:
        """SIGKILL and reap: no shutdown code runs, sockets are closed by the kernel."""
        self.signal(signal.SIGKILL)
        assert await self.wait(10) == -signal.SIGKILL

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no gateway output)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "gateway output (tail):\n" + "\n".join(text[-lines:])


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gateway.log")
    yield gw
    if gw.proc is not None and gw.proc.returncode is None:
        gw.proc.kill()
        await gw.proc.wait()
    print(gw.tail(200))  # shown by pytest when the test failed


class Broker:
    """What the broker itself says about this test's vhost (AMQP declare-ok, management)."""

    def __init__(self, settings: Settings, admin: BrokerAdmin, vhost: str) -> None:
        self.settings = settings
        self.admin = admin
        self.vhost = vhost
        self._conn: aio_pika.abc.AbstractConnection | None = None

    async def consumers(self, queue: str = topology.SENSOR_QUEUE) -> int:
        """Live consumer count from a passive declare (not the lagging management stats)."""
        return int((await self._declare_ok(queue)).consumer_count or 0)

    async def ready(self, queue: str = topology.SENSOR_QUEUE) -> int:
        return int((await self._declare_ok(queue)).message_count or 0)

    async def _declare_ok(self, queue: str) -> aiormq.spec.Queue.DeclareOk:
        if self._conn is None or self._conn.is_closed:
            self._conn = await aio_pika.connect(self.settings.amqp.url.value, timeout=5)
        async with self._conn.channel() as channel:
            return (await channel.declare_queue(queue, passive=True)).declaration_result

    def stats(self, queue: str = topology.SENSOR_QUEUE) -> dict[str, object]:
        return self.admin.queue(self.vhost, queue)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


@pytest.fixture
async def broker(
    settings: Settings, broker_admin: BrokerAdmin, vhost: str
) -> AsyncIterator[Broker]:
    b = Broker(settings, broker_admin, vhost)
    yield b
    await b.close()


async def start_and_wait(
    gw: GatewayProcess, broker: Broker, env: dict[str, str], within: float = 20
) -> None:
    """Start the process and wait until it says it runs (its start-up, consumer checks
    included, is over) and the broker reports its consumer on the data queue."""
    await gw.start(env)

    async def probe() -> tuple[int | None, bool]:
        running = gw.log_path.read_text(errors="replace").count("gateway running:")
        return gw.returncode, running >= gw.starts and await broker.consumers() >= 1

    rc, _ = await eventually(probe, lambda v: v[0] is not None or v[1], within=within)
    assert rc is None, f"gateway exited with {rc} while starting\n{gw.tail()}"


# -- the devices ---------------------------------------------------------------------------
@dataclass
class Fleet:
    """A simulated fleet of enhanced nodes (QoS 1) running as a task of the test."""

    config: FleetConfig
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[FleetReport] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(run_fleet(self.config, self.stop, progress=lambda _: None))

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def finish(self, within: float = 60) -> FleetReport:
        assert self.task is not None
        report = await asyncio.wait_for(self.task, within)
        assert report.errors == 0, f"the simulated fleet hit {report.errors} MQTT errors"
        return report


def fleet(
    settings: Settings,
    unique: str,
    *,
    nodes: int,
    count: int,
    rate_hz: float,
    legacy: bool = False,
) -> Fleet:
    """Enhanced nodes (keyed by boot and seq), or legacy ones (no key) publishing at QoS 1
    so that every reading the broker accepted is known."""
    return Fleet(
        FleetConfig.from_settings(
            settings,
            nodes=nodes,
            count=count,
            rate_hz=rate_hz,
            legacy_share=1 if legacy else 0,
            qos=1,
            readings_only=True,
            node_prefix=f"P{unique[:8]}",
            boot=7,
            progress_interval_s=60,
        )
    )


def confirmed_keys(report: FleetReport) -> set[Key]:
    return {(n.node_id, n.boot, s) for n in report.nodes for s in n.confirmed}


def uncertain_keys(report: FleetReport) -> set[Key]:
    return {(n.node_id, n.boot, s) for n in report.nodes for s in n.uncertain}


# -- what the database holds ---------------------------------------------------------------
async def readings(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM sensor_data WHERE kind = 'reading'"))


async def assert_stored_exactly_once(db: asyncpg.Connection, report: FleetReport) -> None:
    """Every confirmed reading once; nothing beyond confirmed or uncertain; counts agree."""
    confirmed, uncertain = confirmed_keys(report), uncertain_keys(report)
    rows = await db.fetch(
        "SELECT node_id, boot, seq FROM sensor_data WHERE kind = 'reading' ORDER BY id"
    )
    keys = [(r["node_id"], r["boot"], r["seq"]) for r in rows]
    stored = set(keys)
    assert len(keys) == len(stored), f"{len(keys) - len(stored)} readings stored twice"
    missing = confirmed - stored
    assert not missing, f"{len(missing)} confirmed readings lost, e.g. {sorted(missing)[:5]}"
    extra = stored - confirmed - uncertain
    assert not extra, f"{len(extra)} readings never published, e.g. {sorted(extra)[:5]}"
    # the node table counts messages, not deliveries: a redelivery is not a new message
    counts = {
        r["node_id"]: r["message_count"]
        for r in await db.fetch(
            "SELECT n.node_id, n.message_count - "
            "  (SELECT count(*) FROM sensor_data s WHERE s.node_id = n.node_id"
            "   AND s.kind <> 'reading') AS message_count FROM nodes n"
        )
    }
    per_node: dict[str, int] = {}
    for node_id, _, _ in keys:
        per_node[node_id] = per_node.get(node_id, 0) + 1
    assert counts == per_node, "nodes.message_count disagrees with the readings stored"


async def drained(
    db: asyncpg.Connection, broker: Broker, report: FleetReport, within: float = 45
) -> None:
    """Wait until every confirmed reading is stored and the data queue is empty."""
    # legacy nodes have no seq to confirm: every one they sent without an error counts
    want = len(confirmed_keys(report)) + sum(n.sent - n.errors for n in report.nodes if n.legacy)

    async def probe() -> tuple[int, int]:
        return await readings(db), await broker.ready()

    await eventually(probe, lambda v: v[0] >= want and v[1] == 0, within=within, interval=0.2)


async def acked_stats(broker: Broker, acks: int) -> dict[str, int]:
    """The data queue's message counters once the management stats show ``acks`` acks
    (they lag the broker by up to its statistics interval, 5 s by default)."""

    def counters() -> dict[str, int]:
        stats = broker.stats().get("message_stats") or {}
        assert isinstance(stats, dict)
        return {k: int(stats.get(k, 0)) for k in ("ack", "deliver", "redeliver")}

    return await eventually(counters, lambda c: c["ack"] >= acks, within=20, interval=0.5)


# -- 1. SIGKILL mid-stream -----------------------------------------------------------------
# with two writers, batches commit out of order while acks still go out in delivery order
@pytest.mark.parametrize("writers", [1, 2])
async def test_sigkill_mid_stream_then_restart_stores_every_confirmed_reading_once(
    settings: Settings,
    unique: str,
    db: asyncpg.Connection,
    broker: Broker,
    gateway_process: GatewayProcess,
    writers: int,
) -> None:
    env = env_for(settings) | {"INGEST_WRITERS": str(writers)}
    await start_and_wait(gateway_process, broker, env)
    devices = fleet(settings, unique, nodes=10, count=1000, rate_hz=400)  # ≥ 2.5 s of stream
    devices.start()

    at_kill = await eventually(lambda: readings(db), lambda n: n >= 1500, within=30)
    assert devices.running, "the stream ended before the kill: it must land mid-stream"
    await gateway_process.kill()
    killed_with = await readings(db)
    assert 1500 <= killed_with < 10_000, killed_with

    report = await devices.finish()
    assert report.sent == 10_000
    assert len(confirmed_keys(report)) == 10_000 - len(uncertain_keys(report))
    # nothing is consumed while the gateway is down
    assert await readings(db) == killed_with
    assert await broker.ready() >= 10_000 - killed_with - settings.amqp.prefetch

    await eventually(broker.consumers, lambda n: n == 0, within=10)
    await start_and_wait(gateway_process, broker, env)
    await drained(db, broker, report)
    await assert_stored_exactly_once(db, report)
    assert at_kill >= 1500


# -- 2. committed but never acked → redelivered → stored once ------------------------------
class HoldingProxy:
    """A TCP proxy to RabbitMQ that can stop passing the client's bytes (acks) upstream,
    while deliveries keep flowing down: commits happen, acks never reach the broker."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.holding = False
        self.held_bytes = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(*self.target)
        self._writers += [client_w, broker_w]
        for task in (
            asyncio.create_task(self._pump(client_r, broker_w, upstream=True)),
            asyncio.create_task(self._pump(broker_r, client_w, upstream=False)),
        ):
            self._tasks.add(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65_536):
                if upstream and self.holding:
                    self.held_bytes += len(data)
                    continue
                dst.write(data)
                await dst.drain()
        dst.close()


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


# legacy readings carry no (boot, seq): their redeliveries are recognised by payload
@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced", "legacy"])
async def test_deliveries_committed_but_not_acked_are_redelivered_and_stored_once(
    settings: Settings,
    unique: str,
    db: asyncpg.Connection,
    broker: Broker,
    gateway_process: GatewayProcess,
    legacy: bool,
) -> None:
    prefetch = settings.amqp.prefetch
    amqp = urlsplit(settings.amqp.url.value)
    async with HoldingProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as proxy:
        env = env_for(settings) | {"RABBITMQ_URL": through(settings.amqp.url.value, proxy.port)}
        await start_and_wait(gateway_process, broker, env)
        proxy.holding = True  # from now on the broker hears nothing from the gateway

        devices = fleet(settings, unique, nodes=3, count=200, rate_hz=0, legacy=legacy)
        devices.start()
        report = await devices.finish()
        if legacy:
            assert report.sent == 600 and report.errors == 0  # QoS 1: each one PUBACKed
        else:
            assert len(confirmed_keys(report)) == 600
        # the broker stops at prefetch unacked deliveries; the gateway commits all of them
        committed = await eventually(lambda: readings(db), lambda n: n >= prefetch, within=20)
        assert committed == prefetch, "acks reached the broker through a holding proxy"
        await eventually(lambda: proxy.held_bytes, lambda n: n > 0, within=10)  # the acks
        assert await readings(db) == prefetch

        await gateway_process.kill()
    # the broker requeues the committed deliveries it never saw acked
    await eventually(broker.ready, lambda n: n == 600, within=10)

    await start_and_wait(gateway_process, broker, env_for(settings))
    await drained(db, broker, report)
    assert await readings(db) == 600
    if legacy:
        readings_of = dict(
            await db.fetch(
                "SELECT node_id, count(*) FROM sensor_data WHERE kind = 'reading' GROUP BY 1"
            )
        )
        assert readings_of == {n.node_id: 200 for n in report.nodes}
        distinct = "SELECT count(DISTINCT data) FROM sensor_data WHERE kind = 'reading'"
        assert await db.fetchval(distinct) == 600
        # redeliveries are not counted as messages either (status messages are)
        rows = dict(await db.fetch("SELECT node_id, count(*) FROM sensor_data GROUP BY 1"))
        assert dict(await db.fetch("SELECT node_id, message_count FROM nodes")) == rows
    else:
        await assert_stored_exactly_once(db, report)
    stats = await acked_stats(broker, 600)
    assert stats["redeliver"] >= prefetch, stats  # the committed ones came back


# -- 3. cold start --------------------------------------------------------------------------
async def test_readings_published_before_the_gateway_ever_ran_are_stored(
    settings: Settings,
    unique: str,
    db: asyncpg.Connection,
    broker: Broker,
    gateway_process: GatewayProcess,
) -> None:
    # the topology exists from the broker definitions only: no gateway has declared it
    assert await broker.consumers() == 0
    devices = fleet(settings, unique, nodes=4, count=500, rate_hz=0)
    devices.start()
    report = await devices.finish()
    assert len(confirmed_keys(report)) == 2000
    assert await broker.ready() == 2000

    await start_and_wait(gateway_process, broker, env_for(settings))
    await drained(db, broker, report)
    await assert_stored_exactly_once(db, report)
    assert await readings(db) == 2000


# -- 4. SIGTERM under load -----------------------------------------------------------------
async def test_sigterm_under_load_exits_in_time_with_nothing_unacked_or_lost(
    settings: Settings,
    unique: str,
    db: asyncpg.Connection,
    broker: Broker,
    gateway_process: GatewayProcess,
) -> None:
    deadline_s = 5.0
    env = env_for(settings) | {"SHUTDOWN_TIMEOUT_S": str(deadline_s)}
    await start_and_wait(gateway_process, broker, env)
    devices = fleet(settings, unique, nodes=8, count=750, rate_hz=300)  # ≥ 2.5 s of stream
    devices.start()
    await eventually(lambda: readings(db), lambda n: n >= 1000, within=30)
    assert devices.running, "the stream ended before SIGTERM: it must land under load"

    gateway_process.signal(signal.SIGTERM)
    asked = time.monotonic()
    code = await gateway_process.wait(within=deadline_s + 10)
    took = time.monotonic() - asked
    assert code == 0, gateway_process.tail()
    assert took <= deadline_s, f"shutdown took {took:.1f} s, deadline {deadline_s} s"
    print(f"SIGTERM to exit: {took:.2f} s")
    stopped_with = await readings(db)
    assert await broker.consumers() == 0
    await eventually(broker.stats, lambda s: s.get("messages_unacknowledged") == 0, within=15)

    report = await devices.finish()
    assert await readings(db) == stopped_with  # nothing consumed after the exit
    await start_and_wait(gateway_process, broker, env)
    await drained(db, broker, report)
    await assert_stored_exactly_once(db, report)
    # every delivery the stopping gateway had taken was acked before it closed the
    # connection: the broker never had to put one back and deliver it again
    stats = await acked_stats(broker, len(confirmed_keys(report)))
    assert stats["redeliver"] == 0, stats


# -- 5. exit codes -------------------------------------------------------------------------
@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def run_cli(env: dict[str, str], *args: str, within: float = 30) -> tuple[int, str, str]:
    done = subprocess.run(
        [str(PYTHON), "-m", "rnr_gateway", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=within,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_bad_settings_exit_78_with_one_line_per_bad_value(settings: Settings) -> None:
    bad = {
        "PREFETCH_COUNT": "lots",
        "HTTP_PORT": "70000",
        "LOG_FORMAT": "xml",
        "OFFLINE_THRESHOLD_S": "-1",
        "DATABASE_URL": "mysql://user:hunter2secret@127.0.0.1/db",
        "API_TOKENS": "root:abcdefgh12345",
        "SHUTDOWN_TIMEOUT_S": "soon",
    }
    code, out, err = run_cli(env_for(settings) | bad, "run", within=20)
    assert code == EXIT_CONFIG, err
    assert "Traceback" not in err
    assert "hunter2secret" not in err + out
    lines = err.strip().splitlines()
    for name in bad:
        naming = [line for line in lines if name in line]
        assert len(naming) == 1, f"{name}: expected one line, got {naming!r}\n{err}"
    # nothing but the problems (and one header line)
    assert len(lines) <= len(bad) + 1, err


@pytest.mark.parametrize("dependency", ["DATABASE_URL", "RABBITMQ_URL"])
def test_unreachable_dependency_at_start_exits_69_with_a_clear_message(
    settings: Settings, closed_port: int, dependency: str
) -> None:
    env = env_for(settings)
    env[dependency] = through(env[dependency], closed_port)
    started = time.monotonic()
    code, out, err = run_cli(env, "run", within=30)
    assert code == EXIT_UNAVAILABLE, err
    assert time.monotonic() - started < 15, "a refused connection must fail fast"
    system = "postgresql" if dependency == "DATABASE_URL" else "rabbitmq"
    problem = [line for line in err.splitlines() if "unavailable" in line]
    assert len(problem) == 1, err
    assert system in problem[0].lower() and f"127.0.0.1:{closed_port}" in problem[0], problem
    assert "Traceback" not in err
    for url in (settings.db.url.value, settings.amqp.url.value):
        password = urlsplit(url).password
        assert not password or password not in err + out


# -- a poison message does not take the process down ---------------------------------------
async def test_a_payload_too_deep_to_store_is_recorded_and_the_process_keeps_running(
    settings: Settings,
    db: asyncpg.Connection,
    broker: Broker,
    gateway_process: GatewayProcess,
) -> None:
    # valid JSON that the JSON parser accepts (< 1024 levels) but cannot encode again (>= 254)
    deep = b'{"temperature": 1, "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    await start_and_wait(gateway_process, broker, env_for(settings))
    async with mqtt_client(settings, "poison-node") as client:
        await client.publish("devices/POISON-1/data", deep, qos=1)
        await client.publish("devices/POISON-1/data", b'{"temperature": 2}', qos=1)

    failed = await eventually(
        lambda: db.fetch("SELECT reason, body FROM failed_messages"),
        lambda rows: len(rows) >= 1 or gateway_process.returncode is not None,
        within=15,
    )
    assert gateway_process.returncode is None, f"the gateway died\n{gateway_process.tail()}"
    assert [(r["reason"], bytes(r["body"])) for r in failed] == [("wrong_type", deep)]
    await eventually(lambda: readings(db), lambda n: n == 1, within=10)
    assert await broker.consumers() == 1
