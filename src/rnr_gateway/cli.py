"""``rnr-gateway run | migrate | prune | simulate | check | definitions``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import orjson

from . import log as logconf
from . import topology
from .db import Database, migrate
from .errors import ConfigError, DependencyUnavailable, GatewayError, TopologyMismatch
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("rnr_gateway")
T = TypeVar("T")

# exit codes systemd can act on (sysexits.h); RestartPreventExitStatus=78 in the unit
EXIT_OK, EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_CONFIG = 0, 1, 69, 78


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "definitions":
        sys.stdout.write(
            orjson.dumps(topology.definitions(args.vhost), option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )
        return EXIT_OK
    try:
        settings = Settings.from_env(env_file=args.env_file)
    except ConfigError as exc:
        print(f"rnr-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logconf.configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(COMMANDS[args.command](settings, args))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # (an exception group when a task of the gateway failed)
        return exit_code(exc)


# The first of these that an error is decides the exit code; its message is the log line.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (TopologyMismatch, EXIT_CONFIG),
    (DependencyUnavailable, EXIT_UNAVAILABLE),
    (GatewayError, EXIT_FAILURE),
)


def exit_code(exc: BaseException) -> int:
    """One clear log line and the exit code for what stopped the process: the error itself,
    or, when tasks failed, the first of their errors that is not a cancellation."""
    while isinstance(exc, BaseExceptionGroup):
        errors = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (errors or list(exc.exceptions))[0]
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_OK
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            log.error("%s", exc)
            return code
    log.error("stopped by an unexpected error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnr-gateway", description=__doc__)
    parser.add_argument("--env-file", help="a NAME=value file read before the environment")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="also run a built-in fleet simulator of N nodes",
    )
    run.add_argument(
        "--simulate-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="messages per second per simulated node (default 1)",
    )
    sub.add_parser("migrate", help="apply pending database migrations")
    prune = sub.add_parser(
        "prune", help="delete rows older than RETENTION_DAYS now (or --days), with progress"
    )
    prune.add_argument("--days", type=float, metavar="N", help="instead of RETENTION_DAYS")
    sub.add_parser("check", help="check settings and that every dependency answers")
    sim = sub.add_parser("simulate", help="run a fleet of simulated nodes over MQTT")
    from .simulate import add_arguments

    add_arguments(sim)
    defs = sub.add_parser("definitions", help="print the broker definitions (JSON)")
    defs.add_argument("--vhost", default="rnr_iot_vhost")
    return parser


async def _with_signals(work: Awaitable[T], on_stop: Callable[[], None]) -> T:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    try:
        return await work
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from .gateway import Extra, Gateway

    extras: dict[str, Extra] = {}
    if args.simulate:
        from .simulate import FleetConfig, run_fleet

        config = FleetConfig.from_settings(
            settings, nodes=args.simulate, rate_hz=args.simulate_rate
        )

        async def simulator(gateway: Gateway) -> None:
            await run_fleet(config, stop=gateway.stopping)  # ends before the gateway does

        extras["simulator"] = simulator
    gateway = Gateway(settings, extras=extras)

    def stop() -> None:
        log.info("stop requested")
        gateway.request_stop()

    await _with_signals(gateway.run(), stop)
    return EXIT_OK


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    async with Database(settings.db, Metrics()) as db, db.pool.acquire() as conn:
        applied = await migrate(conn)
    log.info("database schema up to date (%d migration(s) applied now)", len(applied))
    return EXIT_OK


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    from .retention import Retention

    days = settings.retention.days if args.days is None else args.days
    if days <= 0:
        log.error(
            "nothing to prune: RETENTION_DAYS is unset or 0 (keep everything);"
            " give --days N with N > 0"
        )
        return EXIT_CONFIG
    metrics = Metrics()
    async with Database(settings.db, metrics) as db, db.pool.acquire() as conn:
        retention = Retention(replace(settings.retention, days=days), db, metrics)
        counts = await _with_signals(retention.prune_once(conn), retention.request_stop)
    if counts is None:
        log.error("a gateway is pruning this database now; run this again when it is done")
        return EXIT_UNAVAILABLE
    if not any(counts.values()):
        log.info("retention: nothing older than %g day(s)", days)
    return EXIT_OK


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from .amqp import Amqp

    metrics = Metrics()
    async with Database(settings.db, metrics):
        pass
    async with Amqp(settings.amqp, metrics):
        pass
    log.info("settings valid; PostgreSQL and RabbitMQ answer")
    return EXIT_OK


async def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from .simulate import config_from_args, run_fleet

    config = config_from_args(args, settings)
    stop = asyncio.Event()
    await _with_signals(run_fleet(config, stop=stop, progress=print_progress), stop.set)
    return EXIT_OK


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


COMMANDS = {
    "run": cmd_run,
    "migrate": cmd_migrate,
    "prune": cmd_prune,
    "check": cmd_check,
    "simulate": cmd_simulate,
}
