"""Soak: the gateway under a steady fleet for minutes, its memory sampled as it goes.

One gateway (``python -m rnr_gateway run``) and one fleet simulator (``python -m
rnr_gateway simulate``), each in its own process, on a fresh vhost and database (dropped
afterwards). Every ``--every`` seconds: the gateway's RSS, the rows committed so far and
the rate since the last sample. At the end: RSS after the warm-up and at the end, the
peak, the growth per hour over the second half of the run (a leak shows there; a
process filling its caches and allocator arenas levels off before it), and every
WARNING or ERROR line the gateway logged, and where the RSS is (the brk heap, anonymous
mappings, files). With ``--malloc`` the gateway reports glibc's count of the bytes it
has handed out and of those freed but kept (``bench/traced_gateway.py``): the first grows
with a leak anywhere, C extensions included, the second with fragmentation. With
``--trace`` it also runs under ``tracemalloc``, and the memory Python's allocators hold and
the objects the garbage collector tracks are reported: they grow with a leak in Python
code, whatever the allocator does with its pages (tracing inflates RSS).

    python -m bench.soak --env-file .env                       (500 nodes, 1/s each, 8 min)
    python -m bench.soak --env-file .env --malloc              (the same, malloc counted)
    python -m bench.soak --env-file .env --trace               (and the Python heap traced)
    python -m bench.soak --env-file .env --nodes 100 --minutes 2
    python -m bench.soak --env-file .env --commands 2          (and 2 commands a second)

With ``--commands R`` an API client (``bench/api_client.py``) posts R ``RELAY_CONTROL``
commands a second, round robin over the fleet: the simulated nodes answer them as their
firmware does (enhanced ones ack, legacy ones send the status event the gateway infers
from), and the outbox is read at the end: every command's status, and API → executed.

Hold the machine's test lock while it runs: ``flock /tmp/rnr-test.lock make bench-soak``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson
import psutil

from rnr_gateway.settings import Settings, read_env_file
from rnr_gateway.simulate import FleetConfig

from .ingest import PREFIX, spawn, stop
from .services import (
    ADMIN_URL,
    BrokerAdmin,
    child,
    create_database,
    drop_database,
    machine,
    process_env,
)
from .ws_fanout import ClientProcess
from .ws_report import Scenario

MIB = 2**20
Process = asyncio.subprocess.Process


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


def where(pid: int) -> dict[str, float]:
    """The process's resident memory by kind of mapping, in MiB, from /proc/PID/smaps:
    the brk heap (glibc's main arena), anonymous mappings (other arenas, large blocks,
    Python's object arenas), files mapped (code), the rest (stacks, vdso); and threads."""
    kinds = {"heap": 0.0, "anonymous": 0.0, "files": 0.0, "other": 0.0}
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's header line
            name = line.split(maxsplit=5)[5] if len(line.split()) > 5 else ""
            kind = (
                "heap"
                if name == "[heap]"
                else "anonymous"
                if not name
                else "other"
                if name.startswith("[")
                else "files"
            )
        elif head == "Rss:":
            kinds[kind] += int(rest.split()[0]) / 1024
    kinds["threads"] = float(len(os.listdir(f"/proc/{pid}/task")))
    return kinds


def breakdown(label: str, kinds: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.1f}" for k, v in kinds.items() if k != "threads")
    return f"- {label}: {parts} MiB; {kinds['threads']:.0f} threads"


async def sample(
    gateway: psutil.Process, db_url: str, minutes: float, every_s: float
) -> tuple[list[tuple[float, float, int]], list[dict[str, float]]]:
    """(seconds since start, RSS MiB, rows committed) every ``every_s`` for ``minutes``,
    and where the RSS was at each sample."""
    out: list[tuple[float, float, int]] = []
    kinds: list[dict[str, float]] = []
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
            kinds.append(where(gateway.pid))
            print(f"| {t:6.0f} | {rss:7.1f} | {rows:10,} | {rate:8,.0f} |", flush=True)
    finally:
        await conn.close()
    return out, kinds


def traced(lines: list[str]) -> list[str]:
    """The ``TRACED`` lines of bench/traced_gateway.py, summarised over the second half:
    the floor (the lowest sample) of its first and of its last quarter, which a leak
    raises, and the highest sample (batches in flight, a tick's transitions)."""
    samples = [tuple(float(x) for x in line.split()[1:6]) for line in lines]
    half = samples[len(samples) // 2 :]
    if len(half) < 4:
        return []
    q = len(half) // 4
    first, last = half[:q], half[-q:]
    span = (
        f"at {first[0][0]:.0f}-{first[-1][0]:.0f} s, then at {last[0][0]:.0f}-{last[-1][0]:.0f} s"
    )

    def floors(k: int, scale: float = 1024) -> str:
        return f"{min(s[k] for s in first) / scale:.2f} and {min(s[k] for s in last) / scale:.2f}"

    out = [f"- second half, lowest sample {span}:"]
    if first[0][1] >= 0:
        out.append(
            f"  - Python heap (tracemalloc): {floors(1)} MiB (highest"
            f" {max(s[1] for s in half) / 1024:.2f}); objects tracked by the GC:"
            f" {min(s[2] for s in first):,.0f} and {min(s[2] for s in last):,.0f}"
        )
    if len(first[0]) > 4 and first[0][3] >= 0:
        out.append(
            f"  - malloc (mallinfo2, every arena): in use {floors(3)} MiB; freed but kept"
            f" {floors(4)} MiB (highest {max(s[4] for s in half) / 1024:.2f})"
        )
    return out


async def http_port(log_path: Path) -> int:
    """The port the gateway says it serves HTTP on (it binds port 0)."""
    deadline = time.monotonic() + 30
    pattern = re.compile(r"HTTP on http://[^:/]+:(\d+)/")
    while not (found := pattern.search(await asyncio.to_thread(log_path.read_text))):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not say its HTTP port in 30 s: {log_path}")
        await asyncio.sleep(0.2)
    return int(found[1])


async def ws_clients(count: int, log_path: Path, token: str) -> ClientProcess:
    """``count`` WebSocket clients (bench/ws_clients.py) reading every event, all the run."""
    url = f"ws://127.0.0.1:{await http_port(log_path)}/ws"
    clients = await ClientProcess.start(
        url, token, Scenario("mqtt", 0, count, 0, 0, deflate=False), ["--no-lags"]
    )
    ready = (await clients.read(90))["ready"]
    if ready != count:
        raise RuntimeError(f"{ready} of {count} WebSocket clients connected")
    await clients.send("start")
    return clients


async def ws_result(clients: ClientProcess) -> list[str]:
    await clients.send("stop")
    got = await clients.read(60)
    frames, resyncs, closed = got["frames"], sum(got["resyncs"]), got["closed"]
    return [
        f"- WebSocket: {len(frames)} clients the whole run; sensor_data frames per client"
        f" {min(frames):,} to {max(frames):,}; resyncs {resyncs}; closed early:"
        f" {', '.join(closed) or 'none'}"
    ]


async def fleet_known(db_url: str, node_ids: list[str], within_s: float = 120) -> None:
    """Wait until every node of the fleet has sent a message (the API refuses commands for
    a node it does not know)."""
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.monotonic() + within_s
        query = "SELECT count(*) FROM nodes WHERE node_id = ANY($1::text[])"
        while (known := await conn.fetchval(query, node_ids)) < len(node_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{known} of {len(node_ids)} nodes known in {within_s:g} s")
            await asyncio.sleep(1)
    finally:
        await conn.close()


async def api_client(
    log_path: Path, db_url: str, token: str, nodes: int, rate: float, secs: float
) -> Process:
    """Posts ``rate`` commands a second for ``secs`` (bench/api_client.py), round robin over
    the simulator's nodes (``FleetConfig.node_ids``: the fleet's defaults), once every one
    of them is known."""
    port = await http_port(log_path)
    node_ids = [n for n, _ in FleetConfig(host="", port=0, nodes=nodes).node_ids()]
    await fleet_known(db_url, node_ids)
    config = {
        "base_url": f"http://127.0.0.1:{port}",
        "token": token,
        "nodes": node_ids,
        "rate": rate,
        "duration": secs,
        "tag": uuid.uuid4().hex[:6],
        "body": {"action": "RELAY_CONTROL", "relay": 1, "state": True},
    }
    return await child("bench.api_client", config)


COMMANDS = """
SELECT count(*) FILTER (WHERE status = 'executed' AND reason = 'inferred') AS inferred,
       count(*) AS total,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY finished_at - created_at)
           FILTER (WHERE status = 'executed') AS took
FROM commands
"""


async def commands_result(client: Process, db_url: str) -> list[str]:
    """What the outbox says of the commands the API client posted, once it is done."""
    out, _ = await asyncio.wait_for(client.communicate(), 120)
    if client.returncode != 0:
        return [f"- commands: the API client failed (exit {client.returncode})"]
    sent = int(orjson.loads(out)["sent"])
    await asyncio.sleep(5)  # the last ones answered
    conn = await asyncpg.connect(db_url)
    try:
        by_status = await conn.fetch(
            "SELECT status, count(*) FROM commands GROUP BY 1 ORDER BY 2 DESC"
        )
        row = await conn.fetchrow(COMMANDS)
    finally:
        await conn.close()
    assert row is not None  # an aggregate: always one row
    statuses = ", ".join(f"{r['status']} {r['count']:,}" for r in by_status)
    took = row["took"] or [None, None]
    ms = [f"{t.total_seconds() * 1000:.0f}" if t is not None else "-" for t in took]
    return [
        f"- commands: {sent:,} posted, {row['total']:,} in the outbox: {statuses}"
        f" ({row['inferred']:,} executed by inference, from legacy nodes' status events);"
        f" API → executed p50 {ms[0]} ms, p99 {ms[1]} ms"
    ]


async def disk(db_url: str, rows_per_s: float) -> str:
    """What the readings take on disk, and so what a day of them at this rate takes."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = int(await conn.fetchval("SELECT count(*) FROM sensor_data"))
        size = int(await conn.fetchval("SELECT pg_total_relation_size('sensor_data')"))
    finally:
        await conn.close()
    per_row = size / max(rows, 1)
    return (
        f"- disk: sensor_data holds {rows:,} rows in {size / MIB:,.0f} MiB with its indexes"
        f" ({per_row:,.0f} bytes per row): {per_row * rows_per_s * 86_400 / 2**30:,.1f} GiB a"
        " day at this rate (RETENTION_DAYS bounds it)"
    )


def summary(
    points: list[tuple[float, float, int]], kinds: list[dict[str, float]], log_path: Path
) -> list[str]:
    half = points[len(points) // 2 :]
    k_warm = min(len(points) - 1, max(0, len(points) // 8))
    warm = points[k_warm]
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
        breakdown(f"resident at {warm[0]:.0f} s", kinds[k_warm]),
        breakdown("resident at the end", kinds[-1]),
        *traced([line for line in lines if line.startswith("TRACED ")]),
        f"- WARNING/ERROR lines logged by the gateway: {len(problems)}",
        *(f"  - {line}" for line in problems[:20]),
    ]


async def soak(args: argparse.Namespace) -> int:
    file_env = read_env_file(Path(args.env_file))
    settings = Settings.from_env(env_file=args.env_file)
    admin = BrokerAdmin(ADMIN_URL)
    name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
    token = secrets.token_hex(16)  # the WebSocket clients' (--ws)
    commander = secrets.token_hex(16)  # the API client's (--commands)
    user = unquote(urlsplit(settings.amqp.url.value).username or "")
    await asyncio.to_thread(admin.create_vhost, name, user)
    db_url = await create_database(settings.db.url.value, name)
    env = {
        **process_env(args.env_file, settings, name, db_url),
        "TRACE_EVERY_S": str(args.every),
        "TRACE_PYTHON": "1" if args.trace else "0",
        "API_TOKENS": ",".join(
            filter(None, (file_env.get("API_TOKENS"), f"read:{token}", f"command:{commander}"))
        ),
    }
    log_path = Path(tempfile.mkstemp(prefix="rnr-soak-", suffix=".log")[1])
    fleet = ["-m", "rnr_gateway", "simulate", "--nodes", str(args.nodes)]
    try:
        described = await machine(admin, db_url)
        print(f"## Soak, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        tuning = sorted((k, v) for k, v in os.environ.items() if k.startswith("MALLOC_"))
        prefix = "".join(f"{k}={v} " for k, v in tuning)  # glibc malloc's settings
        print(
            f"- command: `{prefix}python -m bench.soak --env-file {args.env_file}"
            f" --nodes {args.nodes} --rate {args.rate:g} --minutes {args.minutes:g}"
            f" --every {args.every:g}{' --trace' if args.trace else ''}"
            f"{' --malloc' if args.malloc and not args.trace else ''}"
            f"{f' --ws {args.ws}' if args.ws else ''}"
            f"{f' --commands {args.commands:g}' if args.commands else ''}`"
        )
        print("- machine: " + ", ".join(f"{k} {v}" for k, v in described.items()))
        print(f"- gateway log: {log_path}\n")
        print("| s | gateway RSS MiB | rows committed | rows/s |\n|---:|---:|---:|---:|")
        with open(log_path, "wb") as log, open(os.devnull, "wb") as quiet:  # noqa: ASYNC230
            inside = args.trace or args.malloc
            run = ["-m", "bench.traced_gateway"] if inside else ["-m", "rnr_gateway", "run"]
            gateway = await spawn(run, env, log)
            simulator = await spawn([*fleet, "--rate", str(args.rate)], env, quiet)
            clients: ClientProcess | None = None
            poster: Process | None = None
            try:
                if args.ws:
                    clients = await ws_clients(args.ws, log_path, token)
                if args.commands:
                    secs = max(1.0, args.minutes * 60 - 2 * args.every)  # done before the end
                    poster = await api_client(
                        log_path, db_url, commander, args.nodes, args.commands, secs
                    )
                points, kinds = await sample(
                    psutil.Process(gateway.pid), db_url, args.minutes, args.every
                )
                seen = await ws_result(clients) if clients else []
                if poster is not None:
                    seen += await commands_result(poster, db_url)
                    poster = None
            finally:
                if poster is not None:
                    poster.kill()
                    await poster.wait()
                if clients is not None:
                    await clients.close()
                await stop(simulator)
                await stop(gateway)
        print()
        print("\n".join(summary(points, kinds, log_path) + seen))
        print(await disk(db_url, points[-1][2] / points[-1][0]))
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
    p.add_argument("--malloc", action="store_true", help="count glibc malloc's bytes (cheap)")
    p.add_argument("--ws", type=int, default=0, metavar="N", help="WebSocket clients reading all")
    p.add_argument("--commands", type=float, default=0, metavar="R", help="commands a second")
    args = p.parse_args()
    if not 0 < args.minutes <= 24 * 60 or args.every <= 0 or args.nodes < 1 or args.commands < 0:
        p.error("--minutes must be 0-1440, --every and --nodes positive, --commands 0 or more")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
