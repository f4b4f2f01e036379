"""Command round trip: ``Commands.submit`` → the node's ``executed`` ack recorded in
PostgreSQL (the gateway's status event after commit), beside the raw MQTT round trip
measured in the same run: a bare QoS 1 publish → the same test node → its ack, no gateway.

The test nodes run in a child process (real MQTT clients with TCP_NODELAY that ack
``received`` then ``executed``), so the gateway's event loop carries only the gateway.
Each run uses a fresh vhost and database, dropped afterwards.

    python -m bench.commands --env-file .env [--rates 1,10,100] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiomqtt
import orjson

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Secret, Settings
from rnr_gateway.topology import ACK_QUEUE

from .services import BrokerAdmin, create_database, drop_database, machine, with_path

NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
ADMIN_URL = os.environ.get("RABBITMQ_ADMIN_URL", "http://guest:guest@127.0.0.1:15672")
MAX_RATES = (25, 50, 75, 100, 150, 200, 300, 400, 600, 800)
HEARTBEAT_S = 10.0
SUSTAINED_P99_MS = 250.0  # a rate is sustained when every command executes and p99 stays under


@dataclass
class Row:
    label: str
    rate: float
    sent: int
    done: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        return (
            f"| {self.label} | {self.rate:g}/s | {self.sent} | {self.done} | {ms(self.p50_ms)} "
            f"| {ms(self.p99_ms)} | {ms(self.max_ms)} |"
        )


class Tally:
    """Start and finish times by message id; ``wait`` until all sent finished (bounded)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.took: list[float] = []
        self.expected: int | None = None
        self.complete = asyncio.Event()

    def start(self, mid: str) -> None:
        self.started[mid] = time.perf_counter()

    def finish(self, mid: str) -> None:
        t0 = self.started.pop(mid, None)
        if t0 is not None:
            self.took.append((time.perf_counter() - t0) * 1000)
            self._check()

    def _check(self) -> None:
        if self.expected is not None and len(self.took) >= self.expected:
            self.complete.set()

    async def wait(self, sent: int, grace_s: float = 5.0) -> None:
        self.expected = sent
        self._check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.complete.wait(), grace_s)

    def row(self, label: str, rate: float, sent: int) -> Row:
        took = self.took
        return Row(
            label,
            rate,
            sent,
            len(took),
            percentile(took, 0.5),
            percentile(took, 0.99),
            max(took) if took else None,
        )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the test nodes (child process) ------------------------------------------------------
def mqtt_config(settings: Settings) -> dict[str, Any]:
    return {
        "hostname": settings.mqtt.host,
        "port": settings.mqtt.port,
        "username": settings.mqtt.username,
        "password": settings.mqtt.password.value if settings.mqtt.password else None,
    }


async def heartbeats(client: aiomqtt.Client, node_id: str) -> None:
    """As firmware does: without them presence rightly takes the node for gone."""
    beat = orjson.dumps({"type": "heartbeat", "status": "online"})
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        await client.publish(f"devices/{node_id}/data", beat, qos=0)


async def serve_nodes(config: dict[str, Any], node_ids: list[str]) -> None:
    """Each node acks ``received`` then ``executed`` for every command, as firmware does."""

    async def node(node_id: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(
            **config,
            identifier=f"bench-{node_id}",
            socket_options=NODELAY,
        ) as client:
            await client.subscribe(f"devices/{node_id}/commands", qos=1)
            status = orjson.dumps({"status": "online", "node_id": node_id})
            await client.publish(f"devices/{node_id}/status", status, qos=1)
            beats = asyncio.create_task(heartbeats(client, node_id))
            ready.set()
            try:
                async for message in client.messages:
                    mid = orjson.loads(message.payload)["message_id"]
                    for outcome in ("received", "executed"):
                        ack = orjson.dumps({"message_id": mid, "status": outcome})
                        await client.publish(f"devices/{node_id}/ack", ack, qos=1)
            finally:
                beats.cancel()

    readies = [asyncio.Event() for _ in node_ids]
    tasks = [asyncio.create_task(node(n, r)) for n, r in zip(node_ids, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def nodes_process(settings: Settings, node_ids: list[str]) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.commands",
        "--serve-nodes",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"mqtt": mqtt_config(settings), "nodes": node_ids}).encode())
    proc.stdin.close()  # the password goes through a pipe, never the command line
    line = await asyncio.wait_for(proc.stdout.readline(), 90)
    if line.strip() != b"ready":
        raise SystemExit("bench: the node process did not start")
    try:
        yield
    finally:
        proc.terminate()
        await proc.wait()


# -- load --------------------------------------------------------------------------------
async def open_loop(
    rate: float, duration_s: float, fire: Callable[[int], Coroutine[Any, Any, None]]
) -> int:
    """Start ``fire(k)`` at k / rate seconds, without waiting for earlier ones to finish."""
    total = max(1, int(rate * duration_s))
    start = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for k in range(total):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(k)))
    await asyncio.gather(*tasks)
    return total


async def raw_round_trips(settings: Settings, node_ids: list[str], rate: float, secs: float) -> Row:
    """Bare QoS 1 publish → test node → its ``executed`` ack, read back over MQTT."""
    tally = Tally()
    async with aiomqtt.Client(
        **mqtt_config(settings),
        identifier=f"bench-raw-{secrets.token_hex(3)}",
        socket_options=NODELAY,
    ) as client:
        await client.subscribe("devices/+/ack", qos=1)

        async def read() -> None:
            async for message in client.messages:
                ack = orjson.loads(message.payload)
                if ack["status"] == "executed":
                    tally.finish(ack["message_id"])

        reader = asyncio.create_task(read())

        async def fire(k: int) -> None:
            mid = f"raw-{rate:g}-{k}"
            body = orjson.dumps({"action": "PING", "message_id": mid})
            tally.start(mid)
            await client.publish(f"devices/{node_ids[k % len(node_ids)]}/commands", body, qos=1)

        sent = await open_loop(rate, secs, fire)
        await tally.wait(sent)
        reader.cancel()
    return tally.row("raw MQTT", rate, sent)


async def gateway_round_trips(gw: Gateway, nodes: list[str], rate: float, secs: float) -> Row:
    """``submit`` → the ``executed`` transition committed (its status event)."""
    tally = Tally()

    def on_status(event: dict[str, Any]) -> None:
        if event["status"] == "executed":
            tally.finish(event["message_id"])

    gw.commands.add_listener(on_status)
    tag = secrets.token_hex(3)

    async def fire(k: int) -> None:
        mid = f"gw-{tag}-{k}"
        tally.start(mid)
        await gw.commands.submit(nodes[k % len(nodes)], {"action": "PING", "message_id": mid})

    try:
        sent = await open_loop(rate, secs, fire)
        await tally.wait(sent)
    finally:
        gw.commands.listeners.remove(on_status)
    return tally.row("gateway", rate, sent)


@contextlib.asynccontextmanager
async def acks_drained(settings: Settings) -> AsyncIterator[None]:
    """A bare consumer on device_acks while no gateway runs, so the broker treats the
    nodes' acks as it does with the gateway attached (delivered, not written and kept)."""
    connection = await aio_pika.connect(settings.amqp.url.value)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(ACK_QUEUE, passive=True)
        tag = await queue.consume(lambda message: asyncio.sleep(0), no_ack=True)
        try:
            yield
        finally:
            await queue.cancel(tag)


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[Gateway]:
    task = asyncio.create_task(gateway.run())
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    try:
        yield gateway
    finally:
        gateway.request_stop()
        await asyncio.wait_for(task, 60)


async def settled(gw: Gateway) -> None:
    """Each step starts from an empty scheduler (the previous step's backlog is gone)."""
    s = gw.commands.scheduler
    await until(lambda: s.queued == 0 and s.in_flight == 0, 120, "previous backlog drained")


async def until(probe: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not within {within} s")
        await asyncio.sleep(0.1)


# -- the run -----------------------------------------------------------------------------
async def measure(settings: Settings, args: Any) -> list[Row]:
    nodes = [f"BENCH-{i:02d}" for i in range(args.nodes)]
    raw_nodes = [f"RAW-{i:02d}" for i in range(args.nodes)]
    rows: list[Row] = []
    async with nodes_process(settings, nodes + raw_nodes):
        async with acks_drained(settings):
            for rate in args.rates:
                rows.append(await raw_round_trips(settings, raw_nodes, rate, args.duration))
                print(rows[-1].line(), flush=True)
        async with running(Gateway(settings)) as gw:
            await until(lambda: all(gw.presence.is_online(n) for n in nodes), 60, "nodes online")
            await until(gw.mqtt.connected.is_set, 30, "MQTT connected")
            await gateway_round_trips(gw, nodes, 10, 2)  # warm-up, not reported
            for rate in args.rates:
                await settled(gw)
                rows.append(await gateway_round_trips(gw, nodes, rate, args.duration))
                print(rows[-1].line(), flush=True)
            for rate in MAX_RATES if args.max_rate else ():
                await settled(gw)
                row = await gateway_round_trips(gw, nodes, rate, args.max_duration)
                row.label = "gateway, max-rate search"
                rows.append(row)
                print(row.line(), flush=True)
                if row.done < row.sent or (row.p99_ms or math.inf) > SUSTAINED_P99_MS:
                    break
    return rows


async def main(args: Any) -> None:
    base = Settings.from_env(env_file=args.env_file)
    tag = secrets.token_hex(4)
    vhost, dbname = f"rnr_bench_cmd_{tag}", f"rnr_bench_cmd_{tag}"
    user = urlsplit(base.amqp.url.value).username or ""
    admin = BrokerAdmin(ADMIN_URL)
    admin.create_vhost(vhost, user)
    db_url = await create_database(base.db.url.value, dbname)
    settings = replace(
        base,
        amqp=replace(base.amqp, url=Secret(with_path(base.amqp.url.value, vhost))),
        mqtt=replace(base.mqtt, username=f"{vhost}:{base.mqtt.username}"),
        db=replace(base.db, url=Secret(db_url)),
        http=replace(base.http, port=0),
        log_level="WARNING",
    )
    try:
        described = await machine(admin, db_url)
        print("machine: " + ", ".join(f"{k} {v}" for k, v in described.items()), flush=True)
        print("| path | offered | sent | executed | p50 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|---|---|", flush=True)
        await measure(settings, args)
    finally:
        admin.delete_vhost(vhost)
        await drop_database(base.db.url.value, dbname)
        admin.close()


def parse(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="bench.commands", description=__doc__)
    parser.add_argument("--env-file", default=".env")
    parser.add_argument("--rates", default="1,10,100", help="commands per second, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument(
        "--nodes", type=int, default=100, help="test nodes (one command in flight each)"
    )
    parser.add_argument("--no-max-rate", dest="max_rate", action="store_false")
    parser.add_argument("--max-duration", type=float, default=8.0)
    parser.add_argument("--serve-nodes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    return args


def serve_main() -> None:
    config = json.loads(sys.stdin.read())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_nodes(config["mqtt"], config["nodes"]))


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve_nodes:
        serve_main()
    else:
        asyncio.run(main(arguments))
