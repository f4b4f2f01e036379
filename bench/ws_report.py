"""What one WebSocket fan-out scenario is, what it measured, and the markdown report
``bench.ws_fanout`` prints."""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil

from .services import cpu_model

SAMPLE_S = 0.5  # queues, counters and RSS are sampled this often


@dataclass(frozen=True)
class Scenario:
    source: str  # "hub" | "mqtt"
    rate: float  # events per second in total
    clients: int
    stalled: int
    window_s: float
    nodes: int = 50  # mqtt: simulated nodes sharing the rate
    deflate: bool = True  # clients offer permessage-deflate, as browsers do
    stalled_deflate: bool = True
    stalled_queue: int | None = None  # the stalled client's queue bound; None: the default

    @property
    def label(self) -> str:
        who = f"{self.clients - self.stalled} + {self.stalled} stalled" if self.stalled else ""
        extra = "" if self.deflate else ", no deflate"
        if self.stalled and (self.stalled_queue or not self.stalled_deflate):
            extra += " (" if self.stalled_deflate else " (no deflate, "
            extra += f"queue bound {self.stalled_queue or 'default'})"
        return f"{self.source} {self.rate:g}/s, {who or f'{self.clients} clients'}{extra}"


@dataclass
class Outcome:
    scenario: Scenario
    clients: dict[str, Any] = field(default_factory=dict)
    published: int = 0  # sensor_data events handed to the hub in the window
    window_s: float = 0.0  # as measured
    cpu_s: float = 0.0
    rss_peak_mib: float = 0.0
    busy_cores: float = 0.0
    overflows: float = 0.0
    closed_slow: float = 0.0
    stalled_queue_max: int = 0
    timeline: list[str] = field(default_factory=list)


def healthy_frames(o: Outcome) -> list[int]:
    frames: list[int] = o.clients.get("frames", [])
    return frames


def line(o: Outcome) -> str:
    frames = healthy_frames(o)
    lag = o.clients.get("lag_source_ms") or {}
    return (
        f"{o.scenario.label}: {sum(frames) / o.window_s:,.0f} frames/s delivered, "
        f"lag p50 {lag.get('p50', float('nan')):.1f} ms p99 {lag.get('p99', float('nan')):.1f} ms, "
        f"gateway CPU {o.cpu_s:.1f} s"
    )


def ms(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['p50']:.1f} / {summary['p99']:.1f} / {summary['max']:.0f}"


def render(outcomes: list[Outcome], args: argparse.Namespace, took_s: float) -> str:
    command = "python -m bench.ws_fanout --env-file .env" + (" --quick" if args.quick else "")
    mem = psutil.virtual_memory().total / 2**30
    lines = [
        f"## WebSocket fan-out, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}), {mem:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        f"- {args.clients} clients in one process of their own; gateway in the bench process "
        f"(per-client queue bound {args.queue_size} events); "
        f"warm-up {args.warmup:g} s before each window; total time {took_s / 60:.1f} min",
        "- hub = `gateway.hub.publish` from a driver task in the gateway process; mqtt = "
        f"{args.mqtt_nodes} simulated nodes (QoS 1) → RabbitMQ → gateway → PostgreSQL → hub",
        "- lag: `data.ts` (publish time at the source) → client receive, and `timestamp` "
        "(the event's time at the gateway) → client receive; p50 / p99 / max in ms",
        "- gateway CPU: user + system seconds of the gateway process in the window; "
        "busy: the machine's cores in use (all processes); peak RSS: sampled every "
        f"{SAMPLE_S:g} s in the window (the process's high-water mark over the whole run: "
        f"{args.vmhwm_mib:.0f} MiB)",
        "",
        "| scenario | window | delivered frames/s (all clients) | per client min-max frames "
        "| events published | lag source → client | lag gateway → client | gateway CPU "
        "| peak RSS | client proc CPU | busy cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        sc, frames = o.scenario, healthy_frames(o)
        lines.append(
            f"| {sc.label} | {o.window_s:.1f} s | {sum(frames) / o.window_s:,.0f} "
            f"| {min(frames, default=0):,}-{max(frames, default=0):,} | {o.published:,} "
            f"| {ms(o.clients.get('lag_source_ms'))} | {ms(o.clients.get('lag_gateway_ms'))} "
            f"| {o.cpu_s:.1f} s ({o.cpu_s / o.window_s * 100:.0f} %) | {o.rss_peak_mib:.0f} MiB "
            f"| {o.clients.get('cpu_s', 0):.1f} s | {o.busy_cores:.2f} |"
        )
    lines += [
        "",
        f"The stalled client (timeline: t+ from the source's start, the window opening at "
        f"t+{args.warmup:g} s; one line per change in clients, overflows or closes; 'deepest "
        "queue' is the longest queue of any client):",
        "",
    ]
    for o in outcomes:
        if not o.scenario.stalled:
            continue
        stalled = o.clients.get("stalled") or [{}]
        bound = o.scenario.stalled_queue or args.queue_size
        lines += [
            f"- {o.scenario.label}: deepest queue {o.stalled_queue_max} (bound {bound}); "
            f"{o.overflows:.0f} overflows (each: backlog dropped, one resync queued), "
            f"{o.closed_slow:.0f} closed as too slow; healthy clients' "
            f"resyncs: {sum(o.clients.get('resyncs', []))}; after the window the stalled "
            f"client read {stalled[0].get('frames', 0)} frames ({stalled[0].get('resyncs', 0)} "
            f"resync) and then: {stalled[0].get('close', '?')}",
            *(f"  - {mark}" for mark in o.timeline),
        ]
    return "\n".join(lines) + "\n"
