"""Soak: the gateway under a steady fleet for minutes, its memory sampled as it goes.

One gateway (``python -m rnr_gateway run``) and one fleet simulator (``python -m
rnr_gateway simulate``), each in its own process, on a fresh vhost and database (dropped
afterwards). Every ``--every`` seconds: the gateway's RSS, the rows committed so far and
the rate since the last sample. At the end: RSS after the warm-up and at the end, the
peak, the growth per hour over the second half of the run (a leak shows there; a
process filling its caches and allocator arenas levels off before it), and every
WARNING or ERROR line the gateway logged. With ``--trace`` the gateway runs under
``tracemalloc`` (``bench/traced_gateway.py``) and the memory Python's allocators hold and
the objects the garbage collector tracks are reported too: they grow with a leak in
Python code, whatever the allocator does with its pages (tracing inflates RSS).

    python -m bench.soak --env-file .env                       (500 nodes, 1/s each, 8 min)
    python -m bench.soak --env-file .env --trace               (the same, Python heap traced)
    python -m bench.soak --env-file .env --nodes 100 --minutes 2

Hold the machine's test lock while it runs: ``flock /tmp/rnr-test.lock make bench-soak``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import psutil

from rnr_gateway.settings import Settings, read_env_file

from .ingest import PREFIX, ROOT, spawn, stop
from .services import ADMIN_URL, BrokerAdmin, create_database, drop_database, machine, with_path

MIB = 2**20


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return 0.0
    seconds, values = zip(*points, strict=True)
    try:
        return statistics.linear_regression(seconds, values).slope * 3600
    except statistics.StatisticsError:  # every point at one time
        return 0.0


async def sample(
    gateway: psutil.Process, db_url: str, minutes: float, every_s: float
) -> list[tuple[float, float, int]]:
    """(seconds since start, RSS MiB, rows committed) every ``every_s`` for ``minutes``."""
    out: list[tuple[float, float, int]] = []
    conn = await asyncpg.connect(db_url)
    try:
        start = time.monotonic()
        for k in range(1, int(minutes * 60 / every_s) + 1):
            await asyncio.sleep(max(0.0, start + k * every_s - time.monotonic()))
            rss = gateway.memory_info().rss / MIB
            rows = int(await conn.fetchval("SELECT count(*) FROM sensor_data"))
            t = time.monotonic() - start
            rate = (rows - out[-1][2]) / (t - out[-1][0]) if out else rows / t
            out.append((t, rss, rows))
            print(f"| {t:6.0f} | {rss:7.1f} | {rows:10,} | {rate:8,.0f} |", flush=True)
    finally:
        await conn.close()
    return out


def traced(lines: list[str]) -> list[str]:
    """The ``TRACED`` lines of bench/traced_gateway.py, summarised over the second half:
    the floor (the lowest sample) of its first and of its last quarter, which a leak
    raises, and the highest sample (batches in flight, a tick's transitions)."""
    samples = [tuple(float(x) for x in line.split()[1:4]) for line in lines]
    half = samples[len(samples) // 2 :]
    if len(half) < 4:
        return []
    q = len(half) // 4
    first, last = half[:q], half[-q:]
    return [
        "- Python heap (tracemalloc), second half: floor"
        f" {min(s[1] for s in first) / 1024:.2f} MiB at {first[0][0]:.0f}-{first[-1][0]:.0f} s,"
        f" {min(s[1] for s in last) / 1024:.2f} MiB at {last[0][0]:.0f}-{last[-1][0]:.0f} s,"
        f" highest {max(s[1] for s in half) / 1024:.2f} MiB; objects tracked by the GC: floor"
        f" {min(s[2] for s in first):,.0f}, then {min(s[2] for s in last):,.0f}"
    ]


def summary(points: list[tuple[float, float, int]], log_path: Path) -> list[str]:
    half = points[len(points) // 2 :]
    warm = points[min(len(points) - 1, max(0, len(points) // 8))]
    lines = log_path.read_text(errors="replace").splitlines()
    problems = [line for line in lines if " WARNING " in line or " ERROR " in line]
    t_end, rss_end, rows_end = points[-1]
    return [
        f"- committed: {rows_end:,} rows in {t_end:.0f} s ({rows_end / t_end:,.0f}/s)",
        f"- gateway RSS: {points[0][1]:.1f} MiB at {points[0][0]:.0f} s, {warm[1]:.1f} MiB at"
        f" {warm[0]:.0f} s, {rss_end:.1f} MiB at the end, peak {max(p[1] for p in points):.1f}"
        " MiB",
        f"- RSS growth over the second half: {slope_per_hour([(t, r) for t, r, _ in half]):+.1f}"
        " MiB per hour",
        *traced([line for line in lines if line.startswith("TRACED ")]),
        f"- WARNING/ERROR lines logged by the gateway: {len(problems)}",
        *(f"  - {line}" for line in problems[:20]),
    ]


async def soak(args: argparse.Namespace) -> int:
    file_env = read_env_file(Path(args.env_file))
    settings = Settings.from_env(env_file=args.env_file)
    admin = BrokerAdmin(ADMIN_URL)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    user = unquote(urlsplit(settings.amqp.url.value).username or "")
    await asyncio.to_thread(admin.create_vhost, name, user)
    db_url = await create_database(settings.db.url.value, name)
    env = {
        **os.environ,
        **file_env,
        "RABBITMQ_URL": with_path(settings.amqp.url.value, name),
        "DATABASE_URL": db_url,
        "MQTT_USERNAME": f"{name}:{settings.mqtt.username or ''}",
        "HTTP_PORT": "0",
        "PYTHONPATH": str(ROOT),
        "TRACE_EVERY_S": str(args.every),
    }
    log_path = Path(tempfile.mkstemp(prefix="rnr-soak-", suffix=".log")[1])
    fleet = ["-m", "rnr_gateway", "simulate", "--nodes", str(args.nodes)]
    try:
        described = await machine(admin, db_url)
        print(f"## Soak, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        print(
            f"- command: `python -m bench.soak --env-file {args.env_file} --nodes {args.nodes}"
            f" --rate {args.rate:g} --minutes {args.minutes:g} --every {args.every:g}"
            f"{' --trace' if args.trace else ''}`"
        )
        print("- machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
        print(f"- gateway log: {log_path}\n")
        print("| s | gateway RSS MiB | rows committed | rows/s |\n|---:|---:|---:|---:|")
        with open(log_path, "wb") as log, open(os.devnull, "wb") as quiet:  # noqa: ASYNC230
            run = ["-m", "bench.traced_gateway"] if args.trace else ["-m", "rnr_gateway", "run"]
            gateway = await spawn(run, env, log)
            simulator = await spawn([*fleet, "--rate", str(args.rate)], env, quiet)
            try:
                points = await sample(psutil.Process(gateway.pid), db_url, args.minutes, args.every)
            finally:
                await stop(simulator)
                await stop(gateway)
        print()
        print("\n".join(summary(points, log_path)))
    finally:
        await drop_database(settings.db.url.value, name)
        await asyncio.to_thread(admin.delete_vhost, name)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--env-file", default=".env")
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--rate", type=float, default=1.0, help="messages/s per node")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--trace", action="store_true", help="trace the Python heap (tracemalloc)")
    args = p.parse_args()
    if not 0 < args.minutes <= 24 * 60 or args.every <= 0 or args.nodes < 1:
        p.error("--minutes must be 0-1440, --every and --nodes positive")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
