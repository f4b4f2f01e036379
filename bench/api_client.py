"""The API client of bench/commands.py, in a child process so that the gateway's event
loop carries only the gateway: an open loop of ``POST /api/nodes/{id}/actions`` (command
*k* at *k / rate* seconds to node *k mod N*, not waiting for earlier ones), each one's
start on the machine's monotonic clock, which the benchmark compares with the moment the
gateway recorded the command ``executed``.

HTTP/1.1 over a pool of keep-alive connections, written on asyncio streams: httpx spent
about 1.3-1.4 ms of CPU per request at 100-200 commands/s (0.23-0.3 ms for this one,
open loop included; docs/benchmarks.md, the API client column), and 1.4 cores at 300/s,
taken from the two the gateway, broker and database share.

    python -m bench.api_client < config.json   (started by bench.commands)
    config: {"base_url", "token", "nodes": [...], "rate", "duration", "tag"[, "body"]}
    (body: the command sent, default {"action": "PING"})
    prints: {"sent": n, "started": {message_id: monotonic seconds}, "cpu_s": client CPU}
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import orjson

CONNECTIONS = 64  # at most this many requests in progress; the rest wait for one
IDLE_S = 2.0  # a connection idle longer is not reused (uvicorn closes them after 5 s)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = time.monotonic()

    async def post(self, request: bytes) -> tuple[int, bytes]:
        """Send one request; the status code and body of its response."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)


class Pool:
    """Keep-alive connections, the most recently used first; a new one when none is idle."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(CONNECTIONS)

    async def post(self, request: bytes) -> tuple[int, bytes]:
        async with self.slots:
            connection = None
            while self.idle and connection is None:
                connection = self.idle.pop()
                if time.monotonic() - connection.used > IDLE_S:
                    connection.writer.close()
                    connection = None
            if connection is None:
                connection = Connection(*await asyncio.open_connection(self.host, self.port))
            try:
                answer = await asyncio.wait_for(connection.post(request), 30)
            except BaseException:
                connection.writer.close()
                raise
            connection.used = time.monotonic()
            self.idle.append(connection)
            return answer

    def close(self) -> None:
        for connection in self.idle:
            connection.writer.close()


async def run(config: dict[str, Any]) -> dict[str, Any]:
    nodes, rate, tag = config["nodes"], float(config["rate"]), config["tag"]
    url = urlsplit(config["base_url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = f"Host: {host}:{port}\r\nAuthorization: Bearer {config['token']}\r\n"
    pool = Pool(host, port)
    started: dict[str, float] = {}

    async def fire(k: int) -> None:
        mid = f"gw-{tag}-{k}"
        started[mid] = time.monotonic()
        body = orjson.dumps({**config.get("body", {"action": "PING"}), "message_id": mid})
        request = (
            f"POST /api/nodes/{nodes[k % len(nodes)]}/actions HTTP/1.1\r\n{head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        status, text = await pool.post(request)
        if status >= 300:
            raise SystemExit(f"bench: the API refused a command: {status} {text!r}")

    cpu = time.process_time()
    sent = await open_loop(rate, float(config["duration"]), fire)
    cpu = time.process_time() - cpu
    pool.close()
    return {"sent": sent, "started": started, "cpu_s": cpu}


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


if __name__ == "__main__":
    result = asyncio.run(run(orjson.loads(sys.stdin.buffer.read())))
    sys.stdout.buffer.write(orjson.dumps(result))
