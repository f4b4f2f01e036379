"""Command round trip: ``POST /api/nodes/{id}/actions`` on the gateway's HTTP socket → the
node's ``executed`` ack recorded in PostgreSQL (the gateway's status event after commit),
beside the raw MQTT round trip measured in the same run: a bare QoS 1 publish → the same
test node → its ack, no gateway. The HTTP client runs in a child process of its own
(``bench.api_client``), so the gateway's event loop carries only the gateway.

The test nodes run in a child process (real MQTT clients with TCP_NODELAY that ack
``received`` then ``executed``), so the gateway's event loop carries only the gateway.
Each run uses a fresh vhost and database, dropped afterwards.

    python -m bench.commands --env-file .env [--rates 1,10,100] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiomqtt
import orjson
import psutil

from rnr_gateway.gateway import Gateway
from rnr_gateway.mqtt import NODELAY
from rnr_gateway.settings import Secret, Settings
from rnr_gateway.topology import ACK_QUEUE

from .api_client import open_loop
from .command_nodes import mqtt_config, nodes_process
from .services import (
    ADMIN_URL,
    BrokerAdmin,
    broker_process,
    child,
    create_database,
    drop_database,
    machine,
    postgres_processes,
    running,
    with_path,
)

MAX_RATES = (25, 50, 75, 100, 150, 200, 300, 400, 600, 800)
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
    stages: str = ""  # p50 (p99) of the outbox's timestamps; raw rows: the PUBACK wait
    cpu: str = ""  # % of one core in the step: gateway / broker / nodes / PostgreSQL / client

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        return (
            f"| {self.label} | {self.rate:g}/s | {self.sent} | {self.done} | {ms(self.p50_ms)} "
            f"| {ms(self.p99_ms)} | {ms(self.max_ms)} | {self.stages or '-'} | {self.cpu or '-'} |"
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


class Cpu:
    """CPU used during a block by this process (the gateway, or the raw publisher), the
    broker, the node process and PostgreSQL, in % of one core."""

    def __enter__(self) -> Cpu:
        me = psutil.Process()
        broker = broker_process()
        self.roles: dict[str, list[psutil.Process]] = {
            "gateway": [me],
            "broker": [broker] if broker else [],
            "nodes": me.children(recursive=True),
            "pg": postgres_processes(),
        }
        self.start = (time.perf_counter(), self._times())
        self.text = ""
        return self

    def _times(self) -> dict[str, float]:
        out = {}
        for role, procs in self.roles.items():
            total = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
            out[role] = total
        return out

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.start[0]
        now, before = self._times(), self.start[1]
        self.text = " / ".join(f"{100 * (now[r] - before[r]) / wall:.0f}" for r in now)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- load --------------------------------------------------------------------------------
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

        pubacks: list[float] = []

        async def fire(k: int) -> None:
            mid = f"raw-{rate:g}-{k}"
            body = orjson.dumps({"action": "PING", "message_id": mid})
            tally.start(mid)
            t0 = time.perf_counter()
            await client.publish(f"devices/{node_ids[k % len(node_ids)]}/commands", body, qos=1)
            pubacks.append((time.perf_counter() - t0) * 1000)

        with Cpu() as cpu:
            sent = await open_loop(rate, secs, fire)
            await tally.wait(sent)
        reader.cancel()
    row = tally.row("raw MQTT", rate, sent)
    row.stages = (
        f"PUBACK {percentile(pubacks, 0.5) or 0:.1f} ({percentile(pubacks, 0.99) or 0:.1f})"
    )
    row.cpu = f"{cpu.text} / -"  # no API client: the publisher is this process
    return row


def command_token(gw: Gateway) -> str:
    """A token of the gateway's API that may send commands."""
    tokens = [t.value for scope, t in gw.settings.http.tokens if scope in ("command", "admin")]
    if not tokens:
        raise SystemExit("bench: API_TOKENS has no command or admin token (set one in .env)")
    return tokens[0]


async def gateway_round_trips(gw: Gateway, nodes: list[str], rate: float, secs: float) -> Row:
    """``POST …/actions`` from the client process → the ``executed`` transition committed
    (its status event here), both on the machine's monotonic clock."""
    done_at: dict[str, float] = {}
    expected: set[str] = set()  # known once the client is done
    finished = asyncio.Event()

    def on_status(event: dict[str, Any]) -> None:
        if event["status"] == "executed":
            done_at[event["message_id"]] = time.monotonic()
            if expected and expected <= done_at.keys():
                finished.set()

    gw.commands.add_listener(on_status)
    tag = secrets.token_hex(3)
    config = {
        "base_url": f"http://127.0.0.1:{gw.http_port}",
        "token": command_token(gw),
        "nodes": nodes,
        "rate": rate,
        "duration": secs,
        "tag": tag,
    }
    try:
        with Cpu() as cpu:  # the client process starts after: not counted
            client = await child("bench.api_client", config)
            out, _ = await client.communicate()
            if client.returncode != 0:
                raise SystemExit("bench: the API client failed (its error is above)")
            result = orjson.loads(out)
            started: dict[str, float] = result["started"]
            expected.update(started)
            if expected <= done_at.keys():
                finished.set()
            with contextlib.suppress(TimeoutError):  # what is not done by then: not executed
                await asyncio.wait_for(finished.wait(), 5.0)
    finally:
        gw.commands.listeners.remove(on_status)
    took = [(done_at[m] - t0) * 1000 for m, t0 in started.items() if m in done_at]
    row = Row(
        "gateway",
        rate,
        int(result["sent"]),
        len(took),
        percentile(took, 0.5),
        percentile(took, 0.99),
        max(took) if took else None,
    )
    row.stages = await stages(gw, f"gw-{tag}-%")
    row.cpu = f"{cpu.text} / {100 * result['cpu_s'] / secs:.0f}"  # client: while sending
    return row


STAGES = """
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY sent_at - created_at) AS queued,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY received_at - sent_at) AS sent,
       percentile_cont(ARRAY[0.5, 0.99])
           WITHIN GROUP (ORDER BY finished_at - received_at) AS received
FROM commands WHERE message_id LIKE $1 AND status = 'executed'
"""


async def stages(gw: Gateway, pattern: str) -> str:
    """Time in each state, from the outbox's timestamps (ms, p50 (p99)): queued → PUBACK
    recorded, sent → received ack applied, received → executed ack applied."""
    row = await gw.db.pool.fetchrow(STAGES, pattern)
    if row is None or row["queued"] is None:
        return ""
    return " / ".join(
        "{:.1f} ({:.1f})".format(*(q.total_seconds() * 1000 for q in row[k]))
        for k in ("queued", "sent", "received")
    )


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
        print(
            "| path | offered | sent | executed | p50 ms | p99 ms | max ms "
            "| stages, p50 (p99) ms | CPU % gw / broker / nodes / pg / API client |"
        )
        print("|---|---|---|---|---|---|---|---|---|", flush=True)
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
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
