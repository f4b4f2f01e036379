"""Fleet simulator: real MQTT clients (one connection per node, LWT set) publishing legacy
and enhanced payloads through the broker's MQTT plugin, so data flows with no hardware.

Legacy nodes behave like the original Arduino firmware (MAC node ids, ``ESP32-<MAC>``
client ids, QoS 0, bare-string ``offline`` LWT, forms A-F of PROTOCOL §3.1); enhanced
nodes like the MicroPython firmware (QoS 1, ``boot``/``seq``/``ts``/``fw``).
Both answer commands the way their firmware does (``simulate_board``): enhanced nodes
ack them, legacy nodes report what they did in a status event; ``REBOOT`` restarts the
node (a new boot number after ``REBOOT_S``) and ``SET_INTERVAL`` changes its rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from . import firmware_node
from .settings import Settings
from .simulate_board import FIRMWARE, Outputs, legacy_answer, legacy_payload, reading, status_event
from .topics import ack_topic, command_topic, data_topic, status_topic

log = logging.getLogger(__name__)
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
BOOT_EPOCH = 1_700_000_000  # boot numbers count seconds from here (they fit an int4)
REBOOT_S = 2.0  # a simulated reset: the node is away this long, then boots again


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
    commands: bool = True  # subscribe to commands and answer them as firmware does

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
    # seqs the broker PUBACKed, and those whose outcome is unknown (a REBOOT starts the
    # seqs of a new boot: then they hold the seqs of several boots)
    confirmed: list[int] = field(default_factory=list)
    uncertain: list[int] = field(default_factory=list)
    readings: int = 0
    reconnects: int = 0
    errors: int = 0
    commands: int = 0  # commands received (retained copies included)
    reboots: int = 0


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

    @property
    def commands(self) -> int:
        return sum(n.commands for n in self.nodes)


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
        self.outputs = Outputs()
        self.rebooting = False
        # the firmware's own command rules; its memory of handled ids survives a reboot,
        # as the boards keep it in flash
        self.firmware = firmware_node.Node(
            node_id, report.boot, time.time, self.outputs.actuators(), reset=self._reset
        )

    def _reset(self) -> None:
        self.rebooting = True

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
            return legacy_payload(
                self.node_id, n, self.rng, self.config.readings_only, self.outputs
            )
        body = reading(self.node_id, self.rng, self.outputs)
        body.update(boot=self.report.boot, seq=self.seq, ts=time.time(), fw=FIRMWARE)
        return body

    def _done(self, deadline: float | None) -> bool:
        if self.stop.is_set():
            return True
        if self.config.count is not None and self.report.sent >= self.config.count:
            return True
        return deadline is not None and time.monotonic() >= deadline

    async def _status(self, client: aiomqtt.Client, body: dict[str, Any]) -> None:
        await client.publish(status_topic(self.node_id), orjson.dumps(body), qos=1, retain=True)

    async def run(self, deadline: float | None) -> None:
        failures = 0
        while not self._done(deadline):
            try:
                async with self._client() as client:
                    failures = 0
                    if self.config.commands:  # before it says online: nothing sent is missed
                        await client.subscribe(command_topic(self.node_id), qos=1)
                        if not self.legacy:
                            await client.subscribe(f"{command_topic(self.node_id)}/last", qos=1)
                    await self._status(client, {"status": "online", "node_id": self.node_id})
                    await self._serve(client, deadline)
                    if self.rebooting:
                        if not self.legacy:  # as the firmware does before its reset
                            await self._status(client, {"status": "offline", "reason": "reboot"})
                    elif not self.legacy:  # legacy nodes just vanish; their LWT says offline
                        await self._status(client, {"status": "offline", "reason": "shutdown"})
                if self.rebooting:
                    await self._reboot()
                    continue
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

    async def _reboot(self) -> None:
        """Away for REBOOT_S, then a new boot: sequence numbers start again."""
        self.rebooting = False
        self.report.reboots += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), REBOOT_S)
        self.report.boot = self.firmware.boot = self.report.boot + 1
        self.seq = 0

    async def _serve(self, client: aiomqtt.Client, deadline: float | None) -> None:
        """Publish readings, and answer commands meanwhile, until done or a REBOOT."""
        publisher = asyncio.create_task(self._publish_loop(client, deadline))
        if not self.config.commands:
            await publisher
            return
        listener = asyncio.create_task(self._commands(client))
        try:
            await asyncio.wait((publisher, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (publisher, listener):
                task.cancel()
            done = await asyncio.gather(publisher, listener, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, Exception):
                raise outcome

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not isinstance(message.payload, bytes) or not message.payload:
                continue  # an empty one clears the retained copy: not a command
            self.report.commands += 1
            if self.legacy:
                answer = legacy_answer(self.outputs, message.payload)
                self.rebooting = answer.reboot
                if answer.event is not None:
                    event = status_event(self.node_id, answer.event, self.rng)
                    await client.publish(data_topic(self.node_id), orjson.dumps(event), qos=0)
            else:
                for ack in self.firmware.handle(message.payload):
                    await client.publish(ack_topic(self.node_id), ack, qos=1)
                self.firmware.run_pending()  # a REBOOT resets only once its acks are out
            if self.rebooting:
                return

    async def _publish_loop(self, client: aiomqtt.Client, deadline: float | None) -> None:
        next_at = time.monotonic() + self.rng.uniform(0, self._interval())
        while not self._done(deadline):
            interval = self._interval()
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
            except (aiomqtt.MqttError, asyncio.CancelledError):  # outcome unknown
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

    def _interval(self) -> float:
        """Seconds between messages: the fleet's rate, or what SET_INTERVAL set."""
        if self.outputs.interval_s is not None:
            return self.outputs.interval_s
        return 1.0 / self.config.rate_hz if self.config.rate_hz > 0 else 0.0


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
        f"({rate:.0f}/s over {elapsed:.0f} s), {report.errors} errors, "
        f"{report.commands} commands answered"
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
    parser.add_argument(
        "--no-commands",
        dest="commands",
        action="store_false",
        help="do not subscribe to commands (default: answer them as the firmware does)",
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
        commands=args.commands,
    )
