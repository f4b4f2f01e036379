"""The load: ``rnr_gateway.simulate.run_fleet`` in its own process, readings only, every
node an enhanced one (so every payload carries its publish time ``ts``), QoS forced.

    python -m bench.fleet --nodes 100 --qos 1 --rate 0     (MQTT_* from the environment)

Prints ``sent <monotonic> <count>`` once a second, so the bench can tell the offered load
in its measurement window (CLOCK_MONOTONIC is shared by every process on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time

from rnr_gateway.settings import Settings
from rnr_gateway.simulate import FleetConfig, run_fleet

SENT = re.compile(r"(\d+) messages sent")


def emit(line: str) -> None:
    found = SENT.search(line)
    if found:
        print(f"sent {time.monotonic():.3f} {found.group(1)}", flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def main(args: argparse.Namespace) -> None:
    config = FleetConfig.from_settings(
        Settings.from_env(),
        nodes=args.nodes,
        rate_hz=args.rate,
        qos=args.qos,
        legacy_share=0,
        readings_only=True,
        commands=False,  # the ingest load alone
        node_prefix=args.prefix,
        progress_interval_s=1.0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    report = await run_fleet(config, stop, progress=emit)
    print(f"sent {time.monotonic():.3f} {report.sent}", flush=True)
    print(f"fleet: {report.sent} sent, {report.errors} errors", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench.fleet")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--qos", type=int, choices=(0, 1), required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="per node; 0 = full rate")
    parser.add_argument("--prefix", default="BENCH")
    asyncio.run(main(parser.parse_args()))
