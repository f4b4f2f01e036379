"""``make bench``: how many readings per second reach PostgreSQL, how fast, and at what
CPU cost, through the gateway and through the least possible consumer, same machine,
same run.

For each scenario (nodes x QoS x load x pipeline): a fresh vhost (topology loaded as
definitions) and a fresh migrated database; the consumer (``python -m rnr_gateway run``
or ``python -m bench.raw``) and the fleet simulator (``python -m bench.fleet``) each in
their own process; a warm-up, then a measurement window in which committed rows are
counted from ``stored_at`` and latency is ``stored_at - ts`` (``ts`` = publish time).
CPU seconds per process come from psutil. Vhost and database are dropped afterwards.

    python -m bench.ingest --env-file .env            (the full run, ~15 min)
    python -m bench.ingest --env-file .env --quick    (a smoke run, ~2 min)

Hold the machine's test lock while it runs: ``flock /tmp/rnr-test.lock make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import httpx

from rnr_gateway.settings import AmqpSettings, Settings, read_env_file
from rnr_gateway.topology import SENSOR_QUEUE

from .measure import (
    WINDOW_QUERY,
    CpuSnapshot,
    Result,
    Scenario,
    cpu_delta,
    cpu_snapshot,
    interpolate,
    peak_rss_mib,
    window_figures,
)
from .report import render
from .services import (
    ADMIN_URL,
    BrokerAdmin,
    create_database,
    drop_database,
    ensure_broker_file_limit,
    machine,
    with_path,
)

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "rnr_bench_"
OURS = re.compile(PREFIX + r"[0-9a-f]{8}")  # other benchmarks share the prefix, not the form


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


@dataclass
class Options:
    env_file: str
    quick: bool
    nodes: list[int]
    qos: list[int]
    warmup_s: float
    window_s: float
    prefetch: int
    sweep: list[int]
    sweep_at: tuple[int, int]
    fixed_rate: float
    restart_broker: bool
    output: str | None
    pipelines: tuple[str, ...] = ("raw", "gateway")
    gateway_env: tuple[str, ...] = ()
    command: str = field(default="")


def plan(opts: Options) -> list[Scenario]:
    out: list[Scenario] = []
    for nodes in opts.nodes:
        for qos in opts.qos:
            for load in ("full", "fixed"):
                for pipeline in ("raw", "gateway"):
                    if pipeline not in opts.pipelines:
                        continue
                    out.append(Scenario(pipeline, nodes, qos, load, opts.prefetch, opts.fixed_rate))
    nodes, qos = opts.sweep_at
    for prefetch in opts.sweep:
        out.append(Scenario("gateway", nodes, qos, "full", prefetch, opts.fixed_rate, "sweep"))
    return out


class Bench:
    def __init__(self, opts: Options, settings: Settings, admin: BrokerAdmin) -> None:
        self.opts = opts
        self.settings = settings
        self.admin = admin
        self.file_env = read_env_file(Path(opts.env_file))
        self.amqp_user = unquote(urlsplit(settings.amqp.url.value).username or "")
        self.logs = Path(tempfile.mkdtemp(prefix="rnr-bench-"))

    # -- one scenario ------------------------------------------------------------------
    async def run(self, sc: Scenario, index: int, total: int) -> Result:
        name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        tag = f"[{index}/{total}] {sc.label}"
        say(f"{tag}: vhost and database {name}")
        await asyncio.to_thread(self.admin.create_vhost, name, self.amqp_user)
        try:
            db_url = await create_database(self.settings.db.url.value, name)
            try:
                return await self._measure(sc, tag, name, db_url, index)
            finally:
                await drop_database(self.settings.db.url.value, name)
        except Exception as exc:
            say(f"{tag}: FAILED: {type(exc).__name__}: {exc} (logs in {self.logs})")
            return Result(sc, error=f"{type(exc).__name__}: {exc}")
        finally:
            await asyncio.to_thread(self.admin.delete_vhost, name)

    def _env(self, name: str, db_url: str, prefetch: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.file_env)
        mqtt = self.settings.mqtt
        env.update(
            RABBITMQ_URL=with_path(self.settings.amqp.url.value, name),
            DATABASE_URL=db_url,
            MQTT_USERNAME=f"{name}:{mqtt.username or ''}",
            PREFETCH_COUNT=str(prefetch),
            HTTP_PORT="0",
            PYTHONPATH=str(ROOT),
        )
        env.update(item.split("=", 1) for item in self.opts.gateway_env)  # type: ignore[misc]
        return env

    async def _measure(self, sc: Scenario, tag: str, name: str, db_url: str, index: int) -> Result:
        env = self._env(name, db_url, sc.prefetch)
        log_path = self.logs / f"{index:02d}-{sc.pipeline}-{sc.nodes}-q{sc.qos}-{sc.load}.log"
        consumer_cmd = (
            ["-m", "rnr_gateway", "run"] if sc.pipeline == "gateway" else ["-m", "bench.raw"]
        )
        fleet_cmd = [
            "-m", "bench.fleet", "--nodes", str(sc.nodes), "--qos", str(sc.qos),
            "--rate", f"{sc.rate_hz:g}", "--prefix", "BENCH",
        ]  # fmt: skip
        with open(log_path, "wb") as log:  # noqa: ASYNC230 (opened once per scenario)
            consumer = await spawn(consumer_cmd, env, log)
            fleet: asyncio.subprocess.Process | None = None
            amqp = await aio_pika.connect(env["RABBITMQ_URL"])
            db = await asyncpg.connect(db_url)
            sent: list[tuple[float, int]] = []
            reader: asyncio.Task[None] | None = None
            try:
                channel = await amqp.channel()
                await wait_consumer(channel, consumer, log_path)
                fleet = await spawn(fleet_cmd, env, log, stdout=asyncio.subprocess.PIPE)
                reader = asyncio.create_task(read_sent(fleet, sent))
                await self._wait_connected(name, sc.nodes, tag)
                probe = Probe(channel, db, sent)
                await probe.phase(tag, "warm-up", self.opts.warmup_s)
                pids = {"consumer": consumer.pid, "simulator": fleet.pid}
                metrics_url = gateway_metrics_url(log_path) if sc.pipeline == "gateway" else None
                batches0 = await batch_totals(metrics_url)
                t0, m0 = time.time(), time.monotonic()
                cpu0, ready0 = cpu_snapshot(pids), await probe.ready()
                await probe.phase(tag, "measuring", self.opts.window_s)
                cpu1: CpuSnapshot = cpu_snapshot(pids)
                t1, m1 = time.time(), time.monotonic()
                ready1 = await probe.ready()
                batches1 = await batch_totals(metrics_url)
                rss = peak_rss_mib(consumer.pid)
                alive = consumer.returncode is None
            finally:
                await amqp.close()
                await asyncio.gather(stop(fleet), stop(consumer))
                if reader is not None:
                    reader.cancel()
            if not alive:
                raise RuntimeError(f"consumer exited during the window; see {log_path}")
            row = await db.fetchrow(WINDOW_QUERY, t0, t1)
            await db.close()
        assert row is not None
        committed, p50, p99 = window_figures(row)
        cpu, busy = cpu_delta(cpu0, cpu1)
        sent0, sent1 = interpolate(sent, m0), interpolate(sent, m1)
        offered = (sent1 - sent0) / (m1 - m0) if sent0 is not None and sent1 is not None else None
        result = Result(
            sc, t1 - t0, committed, offered, p50, p99, cpu, busy / (t1 - t0), rss, (ready0, ready1)
        )
        if batches0 and batches1 and batches1[1] > batches0[1]:
            result.mean_batch = (batches1[0] - batches0[0]) / (batches1[1] - batches0[1])
        say(
            f"{tag}: {result.rate:,.0f} readings/s committed, p50 {fmt(p50)} ms, "
            f"p99 {fmt(p99)} ms, backlog {ready0} -> {ready1}"
        )
        return result

    async def _wait_connected(self, vhost: str, nodes: int, tag: str) -> None:
        deadline = time.monotonic() + 30 + nodes / 20
        connected = 0
        while time.monotonic() < deadline:
            connected = await asyncio.to_thread(self.admin.mqtt_connections, vhost)
            if connected >= nodes:
                return
            await asyncio.sleep(1)
        say(f"{tag}: WARNING only {connected}/{nodes} MQTT nodes connected; measuring anyway")

    async def cleanup_leftovers(self) -> None:
        """Vhosts and databases a killed earlier run left behind."""
        vhosts = (await asyncio.to_thread(self.admin.client.get, "/api/vhosts")).json()
        for v in vhosts:
            if OURS.fullmatch(str(v.get("name", ""))):
                await asyncio.to_thread(self.admin.delete_vhost, v["name"])
        conn = await asyncpg.connect(self.settings.db.url.value)
        try:
            names = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", PREFIX + "%"
            )
        finally:
            await conn.close()
        for r in names:
            if OURS.fullmatch(r["datname"]):
                await drop_database(self.settings.db.url.value, r["datname"])


class Probe:
    """Progress lines while a phase runs: elapsed, committed rows/s, broker backlog."""

    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        db: asyncpg.Connection,
        sent: list[tuple[float, int]],
    ) -> None:
        self.channel = channel
        self.db = db
        self.sent = sent

    async def ready(self) -> int:
        queue = await self.channel.declare_queue(SENSOR_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def rows(self) -> int:
        return int(await self.db.fetchval("SELECT coalesce(max(id), 0) FROM sensor_data"))

    async def phase(self, tag: str, phase: str, seconds: float, every: float = 5.0) -> None:
        start = time.monotonic()
        end = start + seconds
        last_t, last_rows = start, await self.rows()
        sent_start = self.sent[-1][1] if self.sent else 0
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(every, end - now))
            now, rows = time.monotonic(), await self.rows()
            sent = self.sent[-1][1] if self.sent else 0
            say(
                f"  {tag}: {phase} {now - start:4.0f}/{seconds:.0f} s, "
                f"{(rows - last_rows) / (now - last_t):7,.0f} rows/s committed, "
                f"{(sent - sent_start) / (now - start):7,.0f}/s published, "
                f"backlog {await self.ready()}"
            )
            last_t, last_rows = now, rows


async def spawn(
    args: list[str], env: dict[str, str], log: object, stdout: int | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout if stdout is not None else log,  # type: ignore[arg-type]
        stderr=log,  # type: ignore[arg-type]
    )


async def stop(proc: asyncio.subprocess.Process | None, timeout_s: float = 30) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def wait_consumer(
    channel: aio_pika.abc.AbstractChannel, proc: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"consumer exited with {proc.returncode} at start; see {log}")
        queue = await channel.declare_queue(SENSOR_QUEUE, passive=True)
        if queue.declaration_result.consumer_count:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"no consumer on {SENSOR_QUEUE} within 30 s; see {log}")


async def read_sent(proc: asyncio.subprocess.Process, into: list[tuple[float, int]]) -> None:
    assert proc.stdout is not None
    async for raw in proc.stdout:
        parts = raw.decode().split()
        if len(parts) == 3 and parts[0] == "sent":
            into.append((float(parts[1]), int(parts[2])))


def gateway_metrics_url(log_path: Path) -> str | None:
    """The gateway logs where its HTTP server listens (HTTP_PORT=0 picks a free port)."""
    found = re.search(rb"HTTP on (http://[^/\s]+)/", log_path.read_bytes())
    return found.group(1).decode() + "/metrics" if found else None


async def batch_totals(url: str | None) -> tuple[float, float] | None:
    """(messages, batches) committed so far, from the gateway's Prometheus histogram."""
    if url is None:
        return None
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(url)).text
    except httpx.HTTPError:
        return None
    values = dict(
        line.split()[:2] for line in text.splitlines() if line.startswith("rnr_ingest_batch_size_")
    )
    try:
        return float(values["rnr_ingest_batch_size_sum"]), float(
            values["rnr_ingest_batch_size_count"]
        )
    except (KeyError, ValueError):
        return None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# -- entry point -------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--env-file", default=".env")
    p.add_argument("--quick", action="store_true", help="a short smoke run (~2 min)")
    p.add_argument("--nodes", help="comma-separated node counts (default 100,1000)")
    p.add_argument("--qos", help="comma-separated QoS levels (default 0,1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up (default 5)")
    p.add_argument("--window", type=float, help="seconds of measurement (default 20)")
    p.add_argument(
        "--prefetch",
        type=int,
        default=AmqpSettings.prefetch,
        help="PREFETCH_COUNT of the gateway and the raw consumer "
        f"(default {AmqpSettings.prefetch}, the gateway's own default)",
    )
    p.add_argument(
        "--sweep", help="gateway PREFETCH_COUNT values (default 10,100,500,1000; '' for none)"
    )
    p.add_argument("--sweep-at", help="NODES:QOS of the full-rate sweep scenario (default 100:1)")
    p.add_argument("--fixed-rate", type=float, default=1000.0, help="readings/s of the fixed load")
    p.add_argument(
        "--no-restart-broker",
        dest="restart_broker",
        action="store_false",
        help="stop instead of restarting a broker whose open-files limit is too low",
    )
    p.add_argument("--output", help="also write the markdown report to this file")
    p.add_argument("--pipelines", default="raw,gateway", help=argparse.SUPPRESS)
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting for the gateway under test (repeatable)",
    )
    a = p.parse_args(argv)

    def ints(text: str | None, default: str) -> list[int]:
        return [int(x) for x in (default if text is None else text).split(",") if x.strip()]

    quick = bool(a.quick)
    nodes, qos = (a.sweep_at or "100:1").split(":")
    return Options(
        env_file=a.env_file,
        quick=quick,
        nodes=ints(a.nodes, "100" if quick else "100,1000"),
        qos=ints(a.qos, "1" if quick else "0,1"),
        warmup_s=a.warmup if a.warmup is not None else (3.0 if quick else 5.0),
        window_s=a.window if a.window is not None else (6.0 if quick else 20.0),
        prefetch=a.prefetch,
        sweep=ints(a.sweep, "10,500" if quick else "10,100,500,1000"),
        sweep_at=(int(nodes), int(qos)),
        fixed_rate=a.fixed_rate,
        restart_broker=a.restart_broker,
        output=a.output,
        pipelines=tuple(a.pipelines.split(",")),
        gateway_env=tuple(a.gateway_env),
        command=" ".join(["python -m bench.ingest", *(argv or sys.argv[1:])]),
    )


async def amain(opts: Options) -> int:
    settings = Settings.from_env(env_file=opts.env_file)
    scenarios = plan(opts)
    say(f"ingest benchmark: {len(scenarios)} scenarios, logs below {tempfile.gettempdir()}")
    ensure_broker_file_limit(max(s.nodes for s in scenarios) + 200, opts.restart_broker, say)
    admin = BrokerAdmin(ADMIN_URL)
    try:
        bench = Bench(opts, settings, admin)
        await bench.cleanup_leftovers()
        info = await machine(admin, settings.db.url.value)
        started = time.monotonic()
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        results = []
        for i, sc in enumerate(scenarios, 1):
            results.append(await bench.run(sc, i, len(scenarios)))
            say(f"elapsed {time.monotonic() - started:.0f} s")
        report = render(opts, info, date, results, time.monotonic() - started)
    finally:
        admin.close()
    print()
    print(report)
    if opts.output:
        await asyncio.to_thread(Path(opts.output).write_text, report)
        say(f"report written to {opts.output}")
    return 1 if any(r.error for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
