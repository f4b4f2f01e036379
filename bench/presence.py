"""Presence at scale: the offline-detection ticker driven by an injected clock.

A simulated fleet reports at mixed intervals (2 s, 5 s, 30 s, each gap jittered by
±10 %); every message is fed to ``Presence.heard`` in time order and the ticker's
``check()`` runs every ``STATUS_CHECK_INTERVAL_S`` of simulated time, exactly as the
gateway's ticker does (``check()`` in chunks of ``TICK_CHUNK`` due entries, then
``counts()`` for the node gauges). No database:
the ticker never touches it, and ``flush()`` writes to a sink.

In the measurement window a share of the nodes goes silent one by one at known times,
and another share all at once (a site losing power). For each of them the detection
delay is ``transition time - (last message + the node's threshold)``, in clock seconds.
Optionally, as many other nodes were heard once before the window and are offline and
silent throughout (``--silent-offline``), to show what they cost a tick.

Each scenario runs in its own process, so its RSS is its own.

    python -m bench.presence                  (10 000 and 100 000 nodes, ~4 min)
    python -m bench.presence --quick          (10 000 nodes, short window, ~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil

from rnr_gateway.metrics import Metrics
from rnr_gateway.presence import TICK_CHUNK, Presence, Transition
from rnr_gateway.settings import PresenceSettings

from .measure import peak_rss_mib

INTERVALS = ((2.0, 0.4), (5.0, 0.4), (30.0, 0.2))  # report interval (s), share of nodes
JITTER = 0.1
START = 1_800_000_000.0  # clock epoch of the simulation


@dataclass(frozen=True)
class Scenario:
    nodes: int
    silent_offline: int
    window_s: float
    warmup_s: float = 150.0  # > new-node threshold (60 s) + a 30 s node's first gaps
    staggered_share: float = 0.1
    burst_share: float = 0.1
    seed: int = 1

    @property
    def label(self) -> str:
        return f"{self.nodes:,} online + {self.silent_offline:,} silent offline"


@dataclass
class Figures:
    scenario: Scenario
    ticks: int = 0
    check_cpu_ms: list[float] = field(default_factory=list)
    chunk_wall_ms: list[float] = field(default_factory=list)  # longest chunk of each tick
    check_wall_ms: list[float] = field(default_factory=list)
    counts_cpu_ms: list[float] = field(default_factory=list)
    counts_wall_ms: list[float] = field(default_factory=list)
    transitions_per_tick_max: int = 0
    delays_s: list[float] = field(default_factory=list)
    burst_delays_s: list[float] = field(default_factory=list)
    expected_offline: int = 0
    detected: int = 0
    false_offline: int = 0
    heard_calls: int = 0
    heard_cpu_s: float = 0.0
    heard_wall_s: float = 0.0
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    peak_rss_mib: float = 0.0
    took_s: float = 0.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SinkDb:
    """What ``Presence.flush`` needs of a database: the write is dropped."""

    async def retrying(self, operation: Callable[[Any], Any], stop: asyncio.Event) -> None:
        return None


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


class Fleet:
    """Every node's next message time in one heap; silent nodes stop at a known time."""

    def __init__(self, sc: Scenario, window_start: float, window_end: float) -> None:
        rng = random.Random(sc.seed)
        self.rng = rng
        self.ids = [f"N{i:06d}" for i in range(sc.nodes)]
        shares = [share for _, share in INTERVALS]
        self.interval = [rng.choices(INTERVALS, shares)[0][0] for _ in self.ids]
        self.stop_at: dict[int, float] = {}
        order = list(range(sc.nodes))
        rng.shuffle(order)
        staggered = order[: int(sc.nodes * sc.staggered_share)]
        burst = order[len(staggered) : len(staggered) + int(sc.nodes * sc.burst_share)]
        last_stop = window_end - 90.0  # a 30 s node's 75 s threshold expires in the window
        for i in staggered:
            self.stop_at[i] = rng.uniform(window_start, last_stop)
        self.burst_at = window_start + (last_stop - window_start) / 3
        for i in burst:
            self.stop_at[i] = self.burst_at
        self.burst = {self.ids[i] for i in burst}
        self.silent = {self.ids[i] for i in self.stop_at}
        self.last_sent: dict[str, float] = {}
        self.heap = [(START + rng.uniform(0, self.interval[i]), i) for i in range(sc.nodes)]
        heapq.heapify(self.heap)

    def due(self, until: float) -> list[tuple[str, float]]:
        """Messages sent up to ``until``, in time order."""
        out: list[tuple[str, float]] = []
        heap, ids, interval, rng = self.heap, self.ids, self.interval, self.rng
        while heap and heap[0][0] <= until:
            at, i = heapq.heappop(heap)
            out.append((ids[i], at))
            nxt = at + interval[i] * rng.uniform(1 - JITTER, 1 + JITTER)
            stop = self.stop_at.get(i)
            if stop is not None and nxt > stop:
                self.last_sent[ids[i]] = at
                continue
            heapq.heappush(heap, (nxt, i))
        return out


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(sc: Scenario, say: Callable[[str], None]) -> Figures:
    started = time.perf_counter()
    settings = PresenceSettings()  # the defaults: 15 s floor, 5 s ticks, 60 s for new nodes
    step = settings.status_check_interval_s
    window_start = START + sc.warmup_s
    window_end = window_start + sc.window_s
    fleet = Fleet(sc, window_start, window_end)
    fig = Figures(sc)
    clock = Clock(START)
    presence = Presence(settings, SinkDb(), Metrics(), clock)  # type: ignore[arg-type]
    by_interval = {fleet.ids[i]: fleet.interval[i] for i in range(sc.nodes)}

    def on_transition(t: Transition) -> None:
        if t.status != "offline" or t.at < window_start or t.node_id not in by_interval:
            return
        state = presence.nodes[t.node_id]
        if t.node_id not in fleet.silent or fleet.last_sent.get(t.node_id) != state.last_seen:
            fig.false_offline += 1
            return
        delay = t.at - (state.last_seen + presence.threshold(state))
        (fig.burst_delays_s if t.node_id in fleet.burst else fig.delays_s).append(delay)
        key = f"{by_interval[t.node_id]:g} s"
        fig.thresholds.setdefault(key, []).append(presence.threshold(state))

    presence.add_listener(on_transition)
    fig.rss_before_mib = rss_mib()
    for i in range(sc.silent_offline):  # heard once, silent since: offline before the window
        presence.heard(f"G{i:06d}", START)
    now, last_say = START, time.monotonic()
    while now < window_end:
        now += step
        batch = fleet.due(now)
        measuring = now > window_start
        c0, w0 = time.process_time(), time.perf_counter()
        for node_id, at in batch:
            presence.heard(node_id, at)
        c1, w1 = time.process_time(), time.perf_counter()
        clock.now = now
        transitions, longest = [], 0.0
        while True:  # in chunks, as the gateway's ticker takes it
            w = time.perf_counter()
            transitions += presence.check(now, limit=TICK_CHUNK)
            longest = max(longest, time.perf_counter() - w)
            if not presence.due(now):
                break
        c2, w2 = time.process_time(), time.perf_counter()
        presence.counts()
        c3, w3 = time.process_time(), time.perf_counter()
        if measuring:
            fig.ticks += 1
            fig.heard_calls += len(batch)
            fig.heard_cpu_s += c1 - c0
            fig.heard_wall_s += w1 - w0
            fig.check_cpu_ms.append((c2 - c1) * 1e3)
            fig.check_wall_ms.append((w2 - w1) * 1e3)
            fig.chunk_wall_ms.append(longest * 1e3)
            fig.counts_cpu_ms.append((c3 - c2) * 1e3)
            fig.counts_wall_ms.append((w3 - w2) * 1e3)
            fig.transitions_per_tick_max = max(fig.transitions_per_tick_max, len(transitions))
        elif now + step > window_start:
            online, offline = presence.counts()
            if offline != sc.silent_offline:
                raise SystemExit(f"warm-up: {offline} offline, expected {sc.silent_offline}")
            fig.rss_after_mib = rss_mib()
            say(f"  warm-up done: {online:,} online, {offline:,} offline; window starts")
        await presence.flush()
        if time.monotonic() - last_say > 5:
            last_say = time.monotonic()
            say(f"  clock +{now - START:.0f} s of {window_end - START:.0f} s")
    fig.expected_offline = len(fleet.silent)
    fig.detected = len(fig.delays_s) + len(fig.burst_delays_s)
    fig.peak_rss_mib = peak_rss_mib(os.getpid()) or 0.0
    fig.took_s = time.perf_counter() - started
    return fig


# -- parent: one child process per scenario, then the report ----------------------------
def child(sc: Scenario) -> Figures:
    """Run one scenario in a fresh interpreter; its progress lines pass through."""
    cmd = [sys.executable, "-m", "bench.presence", "--one", json.dumps(asdict(sc))]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    raw["scenario"] = sc
    return Figures(**raw)


def say(line: str) -> None:
    print(f"[presence {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def dist(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(f"{pct(values, q):.{digits}f}" for q in (0.5, 0.99, 1.0))


def render(results: Sequence[Figures], command: str, took_s: float) -> str:
    step = PresenceSettings().status_check_interval_s
    mem = psutil.virtual_memory().total / 2**30
    lines = [
        f"## Presence ticker at scale, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}), {mem:.1f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "- fleet: report intervals 2 s / 5 s / 30 s (40 / 40 / 20 %), each gap ±10 %; "
        f"default thresholds (15 s floor, 2.5 x interval, ticks every {step:g} s)",
        "- in the window 10 % of the nodes go silent one by one at random times and 10 % at "
        "the same instant; 'silent offline' nodes were heard once and are offline throughout",
        f"- total time {took_s:.0f} s",
        "",
        "Detection delay = offline transition - (last message + the node's threshold), clock "
        f"seconds; it must stay below one check interval ({step:g} s). 'burst': the nodes that "
        "went silent at the same instant.",
        "",
        "| scenario | silent nodes detected | false offline | delay p50 / p99 / max (s) "
        "| same, the burst | thresholds used (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        used = ", ".join(f"{k}: {min(v):.0f}-{max(v):.0f}" for k, v in sorted(r.thresholds.items()))
        lines.append(
            f"| {r.scenario.label} | {r.detected:,} of {r.expected_offline:,} "
            f"| {r.false_offline} | {dist(r.delays_s, 3)} | {dist(r.burst_delays_s, 3)} "
            f"| {used} |"
        )
    lines += [
        "",
        "CPU per tick in ms, p50 / p99 / max over the window's ticks: `check()` alone (taken "
        f"in chunks of {TICK_CHUNK:,} due entries, as the gateway's ticker does), its longest "
        "chunk (the longest the event loop waits on the ticker), and `counts()` (the node "
        "gauges the ticker sets after every check). Process CPU time (`time.process_time`) "
        "and wall time (`time.perf_counter`).",
        "",
        "| scenario | ticks | check() CPU | check() wall | longest chunk wall | counts() CPU "
        "| counts() wall | max transitions in a tick |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario.label} | {r.ticks} | {dist(r.check_cpu_ms)} | {dist(r.check_wall_ms)} "
            f"| {dist(r.chunk_wall_ms)} | {dist(r.counts_cpu_ms)} | {dist(r.counts_wall_ms)} "
            f"| {r.transitions_per_tick_max:,} |"
        )
    lines += [
        "",
        "`heard()` per message (mean over the window's messages) and memory: RSS before the "
        "first message and at the end of the warm-up (the difference is mostly the presence "
        "table and its heap; the simulated fleet was built before), and the peak.",
        "",
        "| scenario | messages | heard() CPU ns | heard() wall ns | RSS before -> after warm-up "
        "| peak RSS | run time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        calls = max(1, r.heard_calls)
        lines.append(
            f"| {r.scenario.label} | {r.heard_calls:,} | {r.heard_cpu_s / calls * 1e9:,.0f} "
            f"| {r.heard_wall_s / calls * 1e9:,.0f} "
            f"| {r.rss_before_mib:.0f} -> {r.rss_after_mib:.0f} MiB | {r.peak_rss_mib:.0f} MiB "
            f"| {r.took_s:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.quick:
        return [Scenario(10_000, 0, 150.0), Scenario(10_000, 10_000, 150.0)]
    return [
        Scenario(10_000, 0, args.window),
        Scenario(10_000, 10_000, args.window),
        Scenario(10_000, 100_000, args.window),
        Scenario(100_000, 0, args.big_window, warmup_s=120.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.presence")
    parser.add_argument("--quick", action="store_true", help="10 000 nodes, short window")
    parser.add_argument("--window", type=float, default=600.0, help="clock s at 10 000 nodes")
    parser.add_argument("--big-window", type=float, default=240.0, help="clock s at 100 000")
    parser.add_argument("--report", help="also write the markdown section to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        fig = asyncio.run(run(Scenario(**json.loads(args.one)), say))
        raw = asdict(fig)
        raw.pop("scenario")
        print(json.dumps(raw))
        return
    started = time.perf_counter()
    results = []
    for sc in scenarios(args):
        say(f"{sc.label}: {sc.warmup_s:g} s warm-up + {sc.window_s:g} s window (clock time)")
        fig = child(sc)
        say(
            f"  {fig.detected:,}/{fig.expected_offline:,} detected, delay max "
            f"{max(fig.delays_s + fig.burst_delays_s, default=float('nan')):.2f} s, "
            f"check() p99 {pct(fig.check_cpu_ms, 0.99):.2f} ms CPU, "
            f"counts() p99 {pct(fig.counts_cpu_ms, 0.99):.2f} ms, took {fig.took_s:.0f} s"
        )
        results.append(fig)
    command = "python -m bench.presence" + (" --quick" if args.quick else "")
    text = render(results, command, time.perf_counter() - started)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
