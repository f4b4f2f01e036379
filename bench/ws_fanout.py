"""WebSocket fan-out: a real gateway, 100 real WebSocket clients in a process of their own.

Two sources of events, each at a fixed rate:

- ``hub``: a driver task inside the gateway process calls ``gateway.hub.publish`` with
  events shaped like the gateway's own ``sensor_data`` events (``data.ts`` = publish
  time): the fan-out alone (encode once, per-client queues, senders, uvicorn, sockets).
- ``mqtt``: simulated nodes (``python -m rnr_gateway simulate``: enhanced payloads with
  ``ts``, QoS 1) in a third process publish readings through RabbitMQ's MQTT plugin; the
  gateway ingests, commits to PostgreSQL and pushes: the end-to-end figure.

Scenarios: the hub at several rates, with and without permessage-deflate (browsers offer
it; the gateway here allows it, as ``WS_COMPRESSION=true`` does); 99 healthy clients + 1
stalled one (reads nothing after its snapshot): once like a browser tab (deflate, the
default queue bound), once without deflate and with a queue bound of 100 for it alone,
which makes it reach the hub's overflow path within the window; the MQTT path with 100
healthy clients and with 1 stalled. The gateway runs in this process (its CPU is this
process's, the driver and a sampler included); the clients (``python -m
bench.ws_clients``) and the simulator each in their own. One fresh vhost and database
for the run, dropped afterwards.

    python -m bench.ws_fanout --env-file .env             (~4.5 min)
    python -m bench.ws_fanout --env-file .env --quick     (~1.5 min)

Hold the machine's test lock: ``flock /tmp/rnr-test.lock make bench-ws``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psutil

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import Secret, Settings
from rnr_gateway.simulate_board import reading

from .measure import peak_rss_mib
from .services import (
    ADMIN_URL,
    BrokerAdmin,
    create_database,
    drop_database,
    running,
    with_path,
)
from .ws_report import SAMPLE_S, Outcome, Scenario, line, render


def say(text: str) -> None:
    print(f"[ws {time.strftime('%H:%M:%S')}] {text}", flush=True)


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_published(gw: Gateway) -> list[int]:
    """Count the ``sensor_data`` events handed to the hub, whatever their source."""
    counter, publish = [0], gw.hub.publish

    def counted(event: dict[str, Any]) -> None:
        counter[0] += event.get("type") == "sensor_data"
        publish(event)

    gw.hub.publish = counted  # type: ignore[method-assign]
    return counter


async def drive_hub(gw: Gateway, rate: float, stop: asyncio.Event) -> None:
    """Publish ``rate`` events per second, each stamped with its publish time."""
    rng = random.Random(1)
    started, sent = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        while sent < due:
            node_id = f"HUB-{sent % 50:04d}"
            now = time.time()
            data = reading(node_id, rng)
            data["ts"] = now
            gw.hub.publish(
                {
                    "type": "sensor_data",
                    "node_id": node_id,
                    "data": data,
                    "kind": "reading",
                    "timestamp": datetime.fromtimestamp(now, UTC).isoformat(),
                }
            )
            sent += 1
        await asyncio.sleep(0.002)


class ClientProcess:
    """``python -m bench.ws_clients``, driven one line at a time over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, url: str, token: str, sc: Scenario, extra: Sequence[str] = ()
    ) -> ClientProcess:
        args = ["--clients", str(sc.clients), "--stalled", str(sc.stalled), *extra]
        args += [] if sc.deflate else ["--no-deflate"]
        args += [] if sc.stalled_deflate else ["--stalled-no-deflate"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.ws_clients",
            url,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "RNR_BENCH_TOKEN": token},
        )
        return cls(proc)

    async def read(self, within: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        if not line:
            raise RuntimeError("the client process ended early (its error is printed above)")
        result: dict[str, Any] = json.loads(line)
        return result

    async def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        await self.proc.stdin.drain()

    async def close(self) -> None:
        await stop_process(self.proc, 15)


async def stop_process(proc: asyncio.subprocess.Process, within: float) -> None:
    try:
        await asyncio.wait_for(proc.wait(), within)
    except TimeoutError:
        proc.terminate()
        await proc.wait()


class Bench:
    def __init__(self, gw: Gateway, token: str, env_file: str, warmup_s: float) -> None:
        self.gw = gw
        self.token = token
        self.env_file = env_file
        self.warmup_s = warmup_s
        self.published = count_published(gw)

    async def scenario(self, sc: Scenario) -> Outcome:
        url = f"ws://127.0.0.1:{self.gw.http_port}/ws"
        default_bound = self.gw.hub.queue_size
        self.gw.hub.queue_size = sc.stalled_queue or default_bound  # for the stalled client
        clients = await ClientProcess.start(url, self.token, sc)
        try:
            if sc.stalled:
                await clients.read(60)  # the stalled clients are connected, and only they
                self.gw.hub.queue_size = default_bound
                await clients.send("go")
            connected = (await clients.read(90))["ready"]
            say(f"{sc.label}: {connected} clients connected; warm-up {self.warmup_s:g} s")
            async with self.source(sc):
                outcome = await self.measure(sc, clients)
            await self.settle(sc)
            outcome.clients = await clients.read(60)
            return outcome
        finally:
            self.gw.hub.queue_size = default_bound
            await clients.close()

    async def settle(self, sc: Scenario, within: float = 15.0) -> None:
        """Let the healthy clients' backlog drain before their process closes them."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            sizes = sorted(c.queue.qsize() for c in self.gw.hub.clients)
            if not sum(sizes[: len(sizes) - sc.stalled]):
                return
            await asyncio.sleep(0.1)
        say("  healthy clients' queues not drained 15 s after the window")

    @contextlib.asynccontextmanager
    async def source(self, sc: Scenario) -> AsyncIterator[None]:
        if sc.source == "hub":
            stop = asyncio.Event()
            task = asyncio.create_task(drive_hub(self.gw, sc.rate, stop))
            try:
                yield
            finally:
                stop.set()
                await task
            return
        duration = self.warmup_s + sc.window_s + 2
        fleet = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rnr_gateway",
            "--env-file",
            self.env_file,
            "simulate",
            *("--nodes", str(sc.nodes), "--rate", f"{sc.rate / sc.nodes:g}", "--qos", "1"),
            *("--legacy-share", "0", "--readings-only", "--no-commands"),
            *("--duration", f"{duration:g}"),
            *("--prefix", f"WS{uuid.uuid4().hex[:4]}"),
            env={
                **os.environ,
                "MQTT_USERNAME": self.gw.settings.mqtt.username or "",
                "LOG_LEVEL": "WARNING",
            },
        )
        try:
            yield
        finally:
            await stop_process(fleet, 30)

    async def measure(self, sc: Scenario, clients: ClientProcess) -> Outcome:
        """Warm-up, then the window; queues and counters are sampled from the source's start
        (``t+`` in the timeline), every figure else only in the window."""
        gw, out, me = self.gw, Outcome(sc), psutil.Process()
        m = gw.metrics
        overflows0, closed0 = m.total(m.ws_overflows), m.total(m.ws_closed_slow)
        t0, state, last_say = time.monotonic(), (len(gw.hub.clients), 0.0, 0.0), 0.0
        window: tuple[float, float, Any, int] | None = None  # start, CPU, cpu_times, published
        while (elapsed := time.monotonic() - t0) < self.warmup_s + sc.window_s:
            if window is None and elapsed >= self.warmup_s:
                await clients.send("start")
                window = (time.monotonic(), cpu_self(), psutil.cpu_times(), self.published[0])
            await asyncio.sleep(SAMPLE_S)
            if window is not None:
                out.rss_peak_mib = max(out.rss_peak_mib, me.memory_info().rss / 2**20)
            deepest = max((c.queue.qsize() for c in gw.hub.clients), default=0)
            out.stalled_queue_max = max(out.stalled_queue_max, deepest)
            overflows = gw.metrics.total(gw.metrics.ws_overflows) - overflows0
            closed = gw.metrics.total(gw.metrics.ws_closed_slow) - closed0
            mark = (
                f"t+{elapsed:4.1f} s: {len(gw.hub.clients)} clients, deepest queue {deepest}, "
                f"{overflows:.0f} overflows (resync sent), {closed:.0f} closed as too slow"
            )
            if sc.stalled and (len(gw.hub.clients), overflows, closed) != state:
                state = (len(gw.hub.clients), overflows, closed)
                out.timeline.append(mark)
            if time.monotonic() - last_say >= 5:
                last_say = time.monotonic()
                say(f"  {mark}")
        await clients.send("stop")
        assert window is not None
        started, cpu0, machine0, published0 = window
        out.window_s = length = time.monotonic() - started
        out.cpu_s = cpu_self() - cpu0
        machine1 = psutil.cpu_times()
        idle = (machine1.idle - machine0.idle) + (machine1.iowait - machine0.iowait)
        out.busy_cores = (os.cpu_count() or 1) - idle / length
        out.overflows = gw.metrics.total(gw.metrics.ws_overflows) - overflows0
        out.closed_slow = gw.metrics.total(gw.metrics.ws_closed_slow) - closed0
        out.published = self.published[0] - published0
        return out


def gateway_settings(base: Settings, name: str, db_url: str, token: str) -> Settings:
    user = unquote(urlsplit(base.amqp.url.value).username or "")
    return replace(
        base,
        amqp=replace(base.amqp, url=Secret(with_path(base.amqp.url.value, name))),
        mqtt=replace(base.mqtt, username=f"{name}:{base.mqtt.username or user}"),
        db=replace(base.db, url=Secret(db_url)),
        # compression allowed, so each scenario's clients decide: a "deflate" scenario is
        # what WS_COMPRESSION=true costs, a "no deflate" one the gateway's default
        http=replace(
            base.http,
            host="127.0.0.1",
            port=0,
            tokens=(("read", Secret(token)),),
            ws_compression=True,
        ),
    )


def plan(args: argparse.Namespace) -> list[Scenario]:
    n, w = args.clients, args.window
    hub = [Scenario("hub", rate, n, 0, w) for rate in args.hub_rates]
    mqtt = Scenario("mqtt", args.mqtt_rate, n, 0, w, nodes=args.mqtt_nodes)
    stalled = Scenario("hub", args.stalled_rate, n, 1, max(w, args.stalled_window))
    small = replace(stalled, stalled_deflate=False, stalled_queue=args.small_queue)
    plain = Scenario("hub", args.stalled_rate, n, 0, w, deflate=False)
    if args.quick:
        return [hub[0], small, mqtt]
    return [*hub, plain, stalled, small, mqtt, replace(mqtt, stalled=1)]


async def main(args: argparse.Namespace) -> list[Outcome]:
    base = Settings.from_env(env_file=Path(args.env_file))
    admin = BrokerAdmin(ADMIN_URL)
    name = f"rnr_bench_ws_{uuid.uuid4().hex[:8]}"
    user = unquote(urlsplit(base.amqp.url.value).username or "")
    say(f"vhost and database {name}")
    await asyncio.to_thread(admin.create_vhost, name, user)
    outcomes: list[Outcome] = []
    try:
        db_url = await create_database(base.db.url.value, name)
        try:
            token = secrets.token_hex(16)
            settings = gateway_settings(base, name, db_url, token)
            async with running(Gateway(settings)) as gw:
                say(f"gateway up on port {gw.http_port}")
                args.queue_size = gw.hub.queue_size
                bench = Bench(gw, token, args.env_file, args.warmup)
                for sc in plan(args):
                    outcome = await bench.scenario(sc)
                    say(f"  {line(outcome)}")
                    outcomes.append(outcome)
        finally:
            await drop_database(base.db.url.value, name)
    finally:
        await asyncio.to_thread(admin.delete_vhost, name)
        admin.close()
    return outcomes


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.ws_fanout")
    p.add_argument("--env-file", default=".env")
    p.add_argument("--quick", action="store_true", help="short windows, fewer scenarios")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--hub-rates", default="50,100,200", help="events/s, comma-separated")
    p.add_argument("--stalled-rate", type=float, default=100.0, help="hub events/s")
    p.add_argument(
        "--small-queue",
        type=int,
        default=100,
        help="the stalled client's queue bound in the second stalled run (it offers no deflate)",
    )
    p.add_argument("--mqtt-rate", type=float, default=100.0, help="readings/s in total")
    p.add_argument("--mqtt-nodes", type=int, default=50)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--stalled-window", type=float, default=40.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--report", help="also write the markdown section to this file")
    args = p.parse_args()
    args.hub_rates = [float(r) for r in args.hub_rates.split(",")]
    if args.quick:
        args.window, args.stalled_window = 8.0, 30.0
    return args


def run() -> None:
    args = parse()
    started = time.monotonic()
    outcomes = asyncio.run(main(args))
    args.vmhwm_mib = peak_rss_mib(os.getpid()) or 0.0
    text = render(outcomes, args, time.monotonic() - started)
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    run()
