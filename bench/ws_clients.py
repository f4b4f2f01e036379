"""The WebSocket side of ``bench.ws_fanout``: many real clients in one process of their own,
so their event loop is not the gateway's.

Each healthy client reads every frame; for each ``sensor_data`` frame received inside the
measurement window it records two lags: ``data.ts`` (set by whoever produced the reading:
the simulated node's publish time, or the driver's ``hub.publish`` time) → receive, and
``timestamp`` (the gateway's receive time) → receive. Wall clocks of one machine.

A stalled client reads its snapshot and then nothing: its socket's receive buffer is
4 KiB, its library buffer one frame, and its MSS that of an Ethernet path (loopback's
64 KiB MSS would let the gateway's kernel buffer over a megabyte for it), so the
gateway's writes to it block after some 100 KiB, as they would over a network. After the
window it drains what it is still sent and reports the resyncs and the close code.

The parent drives it over stdin/stdout, one line each: ``{"ready": n}`` ←, → ``start``,
→ ``stop``, the result as JSON ←. It imports nothing of the gateway.

    RNR_BENCH_TOKEN=... python -m bench.ws_clients ws://127.0.0.1:PORT/ws --clients 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

STALLED_RCVBUF = 4096
STALLED_MSS = 1460
CONNECT_BATCH = 20


@dataclass
class Tally:
    measuring: bool = False
    lags: bool = True  # off for a long run (bench.soak): the lists would grow without bound
    frames: list[int] = field(default_factory=list)  # per healthy client, in the window
    resyncs: list[int] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    lag_source: list[float] = field(default_factory=list)
    lag_gateway: list[float] = field(default_factory=list)
    stalled: list[dict[str, Any]] = field(default_factory=list)


def _lags(frame: dict[str, Any], now: float, tally: Tally) -> None:
    data = frame.get("data")
    if isinstance(data, dict) and isinstance(data.get("ts"), float | int):
        tally.lag_source.append(now - data["ts"])
    stamp = frame.get("timestamp")
    if isinstance(stamp, str):
        tally.lag_gateway.append(now - datetime.fromisoformat(stamp).timestamp())


def summary(lags_s: list[float]) -> dict[str, float] | None:
    """p50 / p99 / max in milliseconds."""
    if not lags_s:
        return None
    ordered = sorted(lags_s)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1] * 1e3, "n": len(ordered)}


async def _open(url: str, token: str, stalled: bool, deflate: bool) -> ClientConnection:
    kwargs: dict[str, Any] = {} if deflate else {"compression": None}
    if stalled:
        parts = urlsplit(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLED_MSS)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        kwargs.update(sock=sock, max_queue=1)
    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        proxy=None,
        open_timeout=30,
        ping_interval=None,  # the stalled one would time out its own pings
        close_timeout=1,
        max_size=2**24,
        **kwargs,
    )
    snapshot = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
    if snapshot.get("type") != "snapshot":
        raise RuntimeError(f"first frame is not a snapshot: {snapshot.get('type')}")
    return ws


async def _healthy(ws: ClientConnection, index: int, tally: Tally) -> None:
    try:
        async for message in ws:
            now = time.time()
            frame = orjson.loads(message)
            kind = frame.get("type")
            if kind == "resync":
                tally.resyncs[index] += 1
            elif kind == "sensor_data" and tally.measuring:
                tally.frames[index] += 1
                if tally.lags:
                    _lags(frame, now, tally)
        tally.closed.append(f"closed by server: {ws.close_code}")
    except ConnectionClosed as exc:
        tally.closed.append(f"connection lost: {exc}")


async def _drain_stalled(ws: ClientConnection, tally: Tally) -> None:
    """After the window: read what the gateway still has for it, briefly."""
    got = {"frames": 0, "resyncs": 0, "close": "still open after the drain"}
    try:
        async with asyncio.timeout(10):
            while True:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 3))
                got["frames"] += 1
                got["resyncs"] += frame.get("type") == "resync"
    except ConnectionClosed as exc:
        got["close"] = f"{exc.rcvd.code} {exc.rcvd.reason!r}" if exc.rcvd else "no close frame"
    except TimeoutError:
        pass
    tally.stalled.append(got)


async def _stdin() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _expect(commands: asyncio.StreamReader, word: str) -> None:
    line = (await commands.readline()).decode().strip()
    if line != word:
        raise SystemExit(f"ws_clients: got {line!r} from the parent, expected {word!r}")


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def run(
    url: str,
    token: str,
    clients: int,
    stalled: int,
    deflate: bool,
    stalled_deflate: bool,
    lags: bool = True,
) -> None:
    """The stalled clients connect first; the parent says ``go`` before the others do."""
    commands = await _stdin()
    healthy = clients - stalled
    tally = Tally(lags=lags, frames=[0] * healthy, resyncs=[0] * healthy)
    stuck = [await _open(url, token, True, stalled_deflate) for _ in range(stalled)]
    if stalled:
        _say({"stalled": len(stuck)})
        await _expect(commands, "go")
    sockets: list[ClientConnection] = []
    for start in range(0, healthy, CONNECT_BATCH):
        batch = range(start, min(healthy, start + CONNECT_BATCH))
        sockets += await asyncio.gather(*(_open(url, token, False, deflate) for _ in batch))
    readers = [asyncio.create_task(_healthy(ws, i, tally)) for i, ws in enumerate(sockets)]
    sockets += stuck
    _say({"ready": len(sockets)})
    await _expect(commands, "start")
    tally.measuring, cpu = True, time.process_time()
    await _expect(commands, "stop")
    tally.measuring, cpu = False, time.process_time() - cpu
    await asyncio.gather(*(_drain_stalled(ws, tally) for ws in stuck))
    _say(
        {
            "frames": tally.frames,
            "resyncs": tally.resyncs,
            "closed": tally.closed,
            "lag_source_ms": summary(tally.lag_source),
            "lag_gateway_ms": summary(tally.lag_gateway),
            "stalled": tally.stalled,
            "cpu_s": cpu,
        }
    )
    for task in readers:
        task.cancel()
    for ws in sockets:
        with contextlib.suppress(Exception):
            await ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.ws_clients")
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--stalled", type=int, default=0)
    parser.add_argument("--no-deflate", action="store_true", help="healthy clients")
    parser.add_argument("--stalled-no-deflate", action="store_true")
    parser.add_argument("--no-lags", action="store_true", help="count frames only")
    args = parser.parse_args()
    token = os.environ["RNR_BENCH_TOKEN"]
    deflate, stalled_deflate = not args.no_deflate, not args.stalled_no_deflate
    asyncio.run(
        run(args.url, token, args.clients, args.stalled, deflate, stalled_deflate, not args.no_lags)
    )


if __name__ == "__main__":
    main()
