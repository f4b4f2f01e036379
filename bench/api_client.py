"""The API client of bench/commands.py, in a child process so that the gateway's event
loop carries only the gateway: an open loop of ``POST /api/nodes/{id}/actions`` (command
*k* at *k / rate* seconds to node *k mod N*, not waiting for earlier ones), each one's
start on the machine's monotonic clock, which the benchmark compares with the moment the
gateway recorded the command ``executed``.

    python -m bench.api_client < config.json   (started by bench.commands)
    config: {"base_url", "token", "nodes": [...], "rate", "duration", "tag"}
    prints: {"sent": n, "started": {message_id: monotonic seconds}}
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import orjson


async def run(config: dict[str, Any]) -> dict[str, Any]:
    nodes, rate, tag = config["nodes"], float(config["rate"]), config["tag"]
    started: dict[str, float] = {}
    async with httpx.AsyncClient(
        base_url=config["base_url"],
        headers={"Authorization": f"Bearer {config['token']}"},
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        timeout=30,
    ) as http:

        async def fire(k: int) -> None:
            mid = f"gw-{tag}-{k}"
            body = {"action": "PING", "message_id": mid}
            started[mid] = time.monotonic()
            response = await http.post(f"/api/nodes/{nodes[k % len(nodes)]}/actions", json=body)
            if response.status_code >= 300:
                raise SystemExit(f"bench: the API refused a command: {response.text}")

        sent = await open_loop(rate, float(config["duration"]), fire)
    return {"sent": sent, "started": started}


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
