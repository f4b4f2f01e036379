"""Fleet simulator: real MQTT clients (one connection per node, LWT set) publishing legacy
and enhanced payloads through the broker's MQTT plugin, so data flows with no hardware.

Legacy nodes behave like the original Arduino firmware (MAC node ids, ``ESP32-<MAC>``
client ids, QoS 0, bare-string ``offline`` LWT, forms A-F of PROTOCOL §3.1); enhanced
nodes like the MicroPython firmware (QoS 1, ``boot``/``seq``/``ts``/``fw``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import orjson

from .settings import Settings
from .topics import data_topic, status_topic

log = logging.getLogger(__name__)
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
FIRMWARE = "sim-1.0"
BOOT_EPOCH = 1_700_000_000  # boot numbers count seconds from here (they fit an int4)


@dataclass(frozen=True)
class FleetConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    nodes: int = 20
    rate_hz: float = 1.0  # messages per second per node; 0 = as fast as the broker allows
    legacy_share: float = 0.3
    qos: int | None = None  # None: legacy 0, enhanced 1 (as the firmwares do)
    duration_s: float | None = None
    count: int | None = None  # messages per node, then stop
    node_prefix: str = "SIM"
    # a new boot number each run (like a node that restarted): (boot, seq) of this run
    # never repeats an earlier run's, which the gateway would take for duplicates
    boot: int = field(default_factory=lambda: int(time.time()) - BOOT_EPOCH)
    progress_interval_s: float = 5.0
    readings_only: bool = False  # only readings (benchmarks), no heartbeats/events/pings
    connect_retries: int = 20

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FleetConfig:
        mqtt = settings.mqtt
        return cls(
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.username,
            password=mqtt.password.value if mqtt.password else None,
            **overrides,
        )

    def node_ids(self) -> list[tuple[str, bool]]:
        """(node id, is_legacy) for every simulated node, stable for a given prefix."""
        legacy_count = round(self.nodes * self.legacy_share)
        mac_base = hashlib.sha1(self.node_prefix.encode()).hexdigest()[:6].upper()
        out = []
        for i in range(self.nodes):
            if i < legacy_count:
                out.append((f"{mac_base}{i:06X}", True))
            else:
                out.append((f"{self.node_prefix}-{i:04d}", False))
        return out


@dataclass
class NodeReport:
    node_id: str
    legacy: bool
    boot: int
    sent: int = 0
    confirmed: list[int] = field(default_factory=list)  # seqs the broker PUBACKed
    uncertain: list[int] = field(default_factory=list)  # publish outcome unknown
    readings: int = 0
    reconnects: int = 0
    errors: int = 0


@dataclass
class FleetReport:
    nodes: list[NodeReport]
    started: float
    finished: float = 0.0

    @property
    def sent(self) -> int:
        return sum(n.sent for n in self.nodes)

    @property
    def errors(self) -> int:
        return sum(n.errors for n in self.nodes)


def reading(node_id: str, rng: random.Random) -> dict[str, Any]:
    """Form A, the full legacy reading."""
    return {
        "timestamp": time.strftime("%H:%M:%S"),
        "temperature": round(rng.uniform(18, 32), 1),
        "humidity": round(rng.uniform(30, 80), 1),
        "gas_sensor": rng.randint(800, 1500),
        "status": "online",
        "node_id": node_id,
        "servo_angle": rng.choice((0, 45, 90, 135)),
        "light_state": rng.random() < 0.5,
        "fan_state": rng.random() < 0.3,
        "uptime": int(time.monotonic() * 1000),
        "wifi_rssi": rng.randint(-80, -40),
    }


def legacy_payload(node_id: str, n: int, rng: random.Random, readings_only: bool) -> dict[str, Any]:
    """Rotate through the legacy forms the way an Arduino node mixes them."""
    if readings_only or n % 10 not in (3, 6, 9):
        if n % 10 == 5 and not readings_only:
            return {
                "temperature": round(rng.uniform(18, 32), 1),
                "node_id": node_id,
                "timestamp": int(time.monotonic() * 1000),
            }  # form F
        return reading(node_id, rng)
    if n % 10 == 3:
        return {
            "type": "heartbeat",
            "status": "online",
            "node_id": node_id,
            "uptime": int(time.monotonic() * 1000),
        }  # form C
    if n % 10 == 6:
        return {
            "timestamp": "unknown",
            "status": rng.choice(("light_on", "relay3_off")),
            "free_heap": rng.randint(150_000, 210_000),
            "wifi_rssi": -55,
            "node_id": node_id,
            "signal_strength": 70,
        }  # form D
    return {"test": "ping", "node_id": node_id}  # form E


class SimulatedNode:
    def __init__(
        self,
        config: FleetConfig,
        node_id: str,
        legacy: bool,
        report: NodeReport,
        stop: asyncio.Event,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.legacy = legacy
        self.report = report
        self.stop = stop
        self.qos = config.qos if config.qos is not None else (0 if legacy else 1)
        self.rng = random.Random(node_id)
        self.seq = 0

    def _client(self) -> aiomqtt.Client:
        lwt: bytes = (
            b"offline" if self.legacy else orjson.dumps({"status": "offline", "reason": "lwt"})
        )
        return aiomqtt.Client(
            self.config.host,
            self.config.port,
            username=self.config.username,
            password=self.config.password,
            identifier=f"ESP32-{self.node_id}" if self.legacy else self.node_id,
            will=aiomqtt.Will(status_topic(self.node_id), lwt, qos=1, retain=True),
            keepalive=30,
            timeout=10,
            socket_options=NODELAY,
        )

    def _payload(self) -> dict[str, Any]:
        n = self.report.sent
        if self.legacy:
            return legacy_payload(self.node_id, n, self.rng, self.config.readings_only)
        body = reading(self.node_id, self.rng)
        body.update(boot=self.report.boot, seq=self.seq, ts=time.time(), fw=FIRMWARE)
        return body

    def _done(self, deadline: float | None) -> bool:
        if self.stop.is_set():
            return True
        if self.config.count is not None and self.report.sent >= self.config.count:
            return True
        return deadline is not None and time.monotonic() >= deadline

    async def run(self, deadline: float | None) -> None:
        failures = 0
        while not self._done(deadline):
            try:
                async with self._client() as client:
                    failures = 0
                    await client.publish(
                        status_topic(self.node_id),
                        orjson.dumps({"status": "online", "node_id": self.node_id}),
                        qos=1,
                        retain=True,
                    )
                    await self._publish_loop(client, deadline)
                    if self.legacy:  # legacy nodes just vanish; their LWT says offline
                        continue
                    await client.publish(
                        status_topic(self.node_id),
                        orjson.dumps({"status": "offline", "reason": "shutdown"}),
                        qos=1,
                        retain=True,
                    )
                return
            except aiomqtt.MqttError as exc:
                failures += 1
                self.report.errors += 1
                if failures > self.config.connect_retries:
                    log.warning(
                        "node %s gives up after %d failures: %s", self.node_id, failures, exc
                    )
                    return
                self.report.reconnects += 1
                await asyncio.sleep(min(0.2 * 2 ** min(failures, 5), 5) * self.rng.uniform(0.5, 1))

    async def _publish_loop(self, client: aiomqtt.Client, deadline: float | None) -> None:
        interval = 1.0 / self.config.rate_hz if self.config.rate_hz > 0 else 0.0
        next_at = time.monotonic() + self.rng.uniform(0, interval)
        while not self._done(deadline):
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self.stop.wait(), delay)
                        return
                    except TimeoutError:
                        pass
                next_at = max(next_at + interval, time.monotonic() - interval)
            body = self._payload()
            seq = self.seq
            try:
                await client.publish(data_topic(self.node_id), orjson.dumps(body), qos=self.qos)
            except aiomqtt.MqttError:
                if not self.legacy:
                    self.report.uncertain.append(seq)
                    self.seq += 1
                self.report.sent += 1
                raise
            if not self.legacy:
                self.report.confirmed.append(seq)
                self.seq += 1
            if "temperature" in body and "free_heap" not in body:
                self.report.readings += 1
            self.report.sent += 1
            if not interval and self.qos == 0:
                await asyncio.sleep(0)


async def run_fleet(
    config: FleetConfig,
    stop: asyncio.Event,
    progress: Callable[[str], None] | None = None,
) -> FleetReport:
    """Run every node until ``stop``, ``duration_s`` or ``count``; returns what was sent."""
    report = FleetReport(
        [NodeReport(node_id, legacy, config.boot) for node_id, legacy in config.node_ids()],
        time.monotonic(),
    )
    deadline = time.monotonic() + config.duration_s if config.duration_s else None
    nodes = [SimulatedNode(config, r.node_id, r.legacy, r, stop) for r in report.nodes]
    reporter = asyncio.ensure_future(_progress(report, config, progress or log.info))
    try:
        async with asyncio.TaskGroup() as tg:
            for node in nodes:
                tg.create_task(node.run(deadline), name=f"sim-{node.node_id}")
    finally:
        reporter.cancel()
        report.finished = time.monotonic()
    (progress or log.info)(_summary(report, final=True))
    return report


async def _progress(report: FleetReport, config: FleetConfig, emit: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(config.progress_interval_s)
        emit(_summary(report, final=False))


def _summary(report: FleetReport, *, final: bool) -> str:
    elapsed = (report.finished or time.monotonic()) - report.started
    rate = report.sent / elapsed if elapsed > 0 else 0.0
    word = "done" if final else "running"
    return (
        f"simulator {word}: {len(report.nodes)} nodes, {report.sent} messages sent "
        f"({rate:.0f}/s over {elapsed:.0f} s), {report.errors} errors"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=20, help="number of nodes (default 20)")
    parser.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="messages per second per node; 0 = as fast as possible",
    )
    parser.add_argument(
        "--legacy-share",
        type=float,
        default=0.3,
        help="fraction of nodes that behave like legacy firmware (0..1)",
    )
    parser.add_argument(
        "--qos",
        type=int,
        choices=(0, 1),
        default=None,
        help="force a QoS (default: legacy 0, enhanced 1)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds, then stop")
    parser.add_argument("--count", type=int, default=None, help="messages per node, then stop")
    parser.add_argument("--prefix", default="SIM", help="node id prefix (default SIM)")
    parser.add_argument(
        "--boot",
        type=int,
        default=None,
        help="boot number of enhanced nodes (default: a new one each run)",
    )
    parser.add_argument(
        "--readings-only",
        action="store_true",
        help="send readings only (no heartbeats, events or pings)",
    )


def config_from_args(args: argparse.Namespace, settings: Settings) -> FleetConfig:
    if args.nodes < 1 or not 0 <= args.legacy_share <= 1 or args.rate < 0:
        raise SystemExit("simulate: --nodes >= 1, --rate >= 0 and --legacy-share in 0..1")
    return FleetConfig.from_settings(
        settings,
        nodes=args.nodes,
        rate_hz=args.rate,
        legacy_share=args.legacy_share,
        qos=args.qos,
        duration_s=args.duration,
        count=args.count,
        node_prefix=args.prefix,
        **({} if args.boot is None else {"boot": args.boot}),
        readings_only=args.readings_only,
    )
