"""The consumer alone: CPU per reading and drain rate from a pre-filled queue.

The full-rate scenarios of ``bench.ingest`` put the simulator, the broker, the database
and the consumer on the same two cores, so a consumer's rate there is a share of the
machine. This one takes the simulator out: N enhanced readings are published (AMQP,
publisher confirms) into ``sensor_data_enhanced`` of a fresh vhost with no consumer, then
the consumer starts and drains them. Reported per pipeline: drain rate and the CPU
seconds per 1 000 readings of the consumer, RabbitMQ and PostgreSQL while draining.

    python -m bench.drain --env-file .env --readings 40000 --repeat 2   (make bench-drain)

Pipelines: ``raw`` (``bench.raw`` as in ``bench.ingest``: aio-pika ``Queue.consume``),
``raw-aiormq`` (the same on aio-pika's underlying aiormq channel, as the gateway
consumes) and ``gateway``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import orjson

from rnr_gateway.settings import Settings, read_env_file
from rnr_gateway.simulate_board import FIRMWARE, reading
from rnr_gateway.topology import DEVICE_EXCHANGE, QUEUES, SENSOR_QUEUE

from .ingest import PREFIX, ROOT, spawn, stop
from .measure import cpu_delta, cpu_snapshot
from .services import ADMIN_URL, BrokerAdmin, create_database, drop_database, with_path

DRAIN_LIMIT_S = 300.0


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


async def fill(url: str, readings: int, nodes: int) -> None:
    rng = random.Random(1)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(DEVICE_EXCHANGE)
        boot = int(time.time())
        pending: list[asyncio.Future[object]] = []
        for i in range(readings):
            node = f"DRAIN-{i % nodes:04d}"
            body = reading(node, rng)
            body.update(boot=boot, seq=i // nodes, ts=time.time(), fw=FIRMWARE)
            pending.append(
                asyncio.ensure_future(
                    exchange.publish(
                        aio_pika.Message(orjson.dumps(body)), routing_key=f"devices.{node}.data"
                    )
                )
            )
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await connection.close()


async def ready(channel: aio_pika.abc.AbstractChannel) -> tuple[int, int]:
    queue = await channel.declare_queue(SENSOR_QUEUE, passive=True)
    result = queue.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def drained(db: asyncpg.Connection, readings: int, deadline: float) -> int:
    """Rows stored so far, once all are in or the deadline passed (polled every 20 ms)."""
    rows = 0
    while time.monotonic() < deadline:
        rows = int(await db.fetchval("SELECT count(*) FROM sensor_data"))
        if rows >= readings:
            break
        await asyncio.sleep(0.02)
    return rows


async def one(
    settings: Settings, file_env: dict[str, str], pipeline: str, args: argparse.Namespace
) -> str:

    admin = BrokerAdmin(ADMIN_URL)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    user = unquote(urlsplit(settings.amqp.url.value).username or "")
    await asyncio.to_thread(admin.create_vhost, name, user)
    db_url = await create_database(settings.db.url.value, name)
    try:
        env = dict(os.environ)
        env.update(file_env)
        env.update(
            RABBITMQ_URL=with_path(settings.amqp.url.value, name),
            DATABASE_URL=db_url,
            MQTT_USERNAME=f"{name}:{settings.mqtt.username or ''}",
            PREFETCH_COUNT=str(args.prefetch),
            HTTP_PORT="0",
            PYTHONPATH=str(ROOT),
        )
        say(f"{pipeline}: publishing {args.readings:,} readings")
        await fill(env["RABBITMQ_URL"], args.readings, args.nodes)
        amqp = await aio_pika.connect(env["RABBITMQ_URL"])
        channel = await amqp.channel()
        cmd = ["-m", "rnr_gateway", "run"] if pipeline == "gateway" else ["-m", "bench.raw"]
        if pipeline == "raw-aiormq":
            env["RAW_CONSUME"] = "aiormq"
        log_path = Path(tempfile.mkstemp(prefix=f"rnr-drain-{pipeline}-", suffix=".log")[1])
        with open(log_path, "wb") as log:  # noqa: ASYNC230
            proc = await spawn(cmd, env, log)
            try:
                deadline = time.monotonic() + 60
                while (await ready(channel))[1] == 0:
                    if time.monotonic() > deadline or proc.returncode is not None:
                        raise RuntimeError(f"no consumer; see {log_path}")
                    await asyncio.sleep(0.01)
                pids = {"consumer": proc.pid}
                cpu0, t0 = cpu_snapshot(pids), time.monotonic()
                db = await asyncpg.connect(db_url)
                try:
                    rows = await drained(db, args.readings, t0 + DRAIN_LIMIT_S)
                finally:
                    await db.close()
                cpu1, t1 = cpu_snapshot(pids), time.monotonic()
                if rows < args.readings:
                    raise RuntimeError(
                        f"only {rows:,} of {args.readings:,} rows after {DRAIN_LIMIT_S:g} s"
                    )
            finally:
                await amqp.close()
                await stop(proc)
        cpu, _ = cpu_delta(cpu0, cpu1)
        k = args.readings / 1000
        line = (
            f"| {pipeline} | {args.readings:,} | {args.readings / (t1 - t0):,.0f} | "
            + " | ".join(f"{cpu.get(r, 0) / k:.3f}" for r in ("consumer", "rabbitmq", "postgresql"))
            + " |"
        )
        say(line)
        return line
    finally:
        await drop_database(settings.db.url.value, name)
        await asyncio.to_thread(admin.delete_vhost, name)


async def main() -> None:
    p = argparse.ArgumentParser(prog="bench.drain", description=__doc__.split("\n\n")[0])
    p.add_argument("--env-file", default=".env")
    p.add_argument("--readings", type=int, default=40_000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--prefetch", type=int, default=500)
    p.add_argument("--pipelines", default="raw,raw-aiormq,gateway")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    most = next(q.arguments["x-max-length"] for q in QUEUES if q.name == SENSOR_QUEUE)
    if not 0 < args.readings <= most:
        # beyond it the broker drops the oldest (dead-lettered): they would never arrive
        p.error(f"--readings must be 1 to {most:,}, the length {SENSOR_QUEUE} is capped at")
    file_env = read_env_file(Path(args.env_file))
    settings = Settings.from_env(env_file=args.env_file)
    lines = []
    for _ in range(args.repeat):
        for pipeline in args.pipelines.split(","):
            lines.append(await one(settings, file_env, pipeline, args))
    print("| pipeline | readings | drained/s | CPU s/1k consumer | RabbitMQ | PostgreSQL |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
