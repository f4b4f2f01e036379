"""The shared services a benchmark (and the test suite) touches: a fresh vhost and
database per scenario, the broker's open-files limit, a gateway run in this event loop,
and the machine description printed with the results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from rnr_gateway import topology
from rnr_gateway.db import migrate
from rnr_gateway.errors import ConfigError
from rnr_gateway.settings import read_env_file

if TYPE_CHECKING:
    from rnr_gateway.gateway import Gateway
    from rnr_gateway.settings import Settings

Say = Callable[[str], None]
ROOT = Path(__file__).resolve().parent.parent


def default_env_file() -> Path:
    """The env file `make setup` prepared: $ENV_FILE, else .env in the project root."""
    return Path(os.environ.get("ENV_FILE", ROOT / ".env"))


def admin_url(env_file: str | Path | None = None) -> str | None:
    """RABBITMQ_ADMIN_URL, the broker's management API with a user that may create vhosts:
    from the environment, else from the env file (as the gateway's own settings)."""
    url = os.environ.get("RABBITMQ_ADMIN_URL", "").strip()
    if url:
        return url
    path = Path(env_file) if env_file is not None else default_env_file()
    try:
        return read_env_file(path).get("RABBITMQ_ADMIN_URL", "").strip() or None
    except ConfigError:
        return None


def require_admin_url(env_file: str | Path | None = None) -> str:
    """RABBITMQ_ADMIN_URL with its credentials, or SystemExit saying where to set it."""
    path = Path(env_file) if env_file is not None else default_env_file()
    url = admin_url(path)
    if url is None:
        raise SystemExit(
            f"RABBITMQ_ADMIN_URL is not set: add RABBITMQ_ADMIN_URL=http://USER:PASSWORD@"
            f"127.0.0.1:15672 to {path} (as in deploy/rnr-gateway.env.example; `make setup` "
            "adds it) or set it in the environment"
        )
    parts = urlsplit(url)
    if not (parts.username and parts.password and parts.port):
        raise SystemExit(
            "RABBITMQ_ADMIN_URL must be http://USER:PASSWORD@HOST:PORT, with a user, "
            f"password and port (set in {path} or the environment)"
        )
    return url


# read once at import; None when unset (BrokerAdmin then says where to set it)
ADMIN_URL = admin_url()


def with_path(url: str, path: str) -> str:
    """The URL with its path (vhost or database name) replaced."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(path, safe="")))


async def child(module: str, config: dict[str, Any]) -> asyncio.subprocess.Process:
    """``python -m module`` with ``config`` as JSON on its standard input (a pipe: tokens and
    passwords never on a command line) and its standard output piped back."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config).encode())
    proc.stdin.close()
    return proc


def process_env(env_file: str, settings: Settings, vhost: str, db_url: str) -> dict[str, str]:
    """The environment of a gateway or simulator process of a benchmark: the env file's
    settings, on its own vhost (``RABBITMQ_URL`` and the MQTT user name) and database,
    HTTP on a free port (the gateway logs which), this tree's code."""
    return {
        **os.environ,
        **read_env_file(Path(env_file)),
        "RABBITMQ_URL": with_path(settings.amqp.url.value, vhost),
        "DATABASE_URL": db_url,
        "MQTT_USERNAME": f"{vhost}:{settings.mqtt.username or ''}",
        "HTTP_PORT": "0",
        "PYTHONPATH": str(ROOT),
    }


class BrokerAdmin:
    """RabbitMQ's management HTTP API."""

    def __init__(self, url: str | None) -> None:
        parts = urlsplit(url or require_admin_url())
        self.client = httpx.Client(
            base_url=urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}")),
            auth=(unquote(parts.username or ""), unquote(parts.password or "")),
            timeout=30,
        )

    def close(self) -> None:
        self.client.close()

    def create_vhost(self, vhost: str, user: str) -> None:
        """A vhost with the topology loaded as definitions (as at broker boot)."""
        self.client.put(f"/api/vhosts/{vhost}").raise_for_status()
        self.client.put(
            f"/api/permissions/{vhost}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()
        defs = topology.definitions(vhost)
        defs.pop("vhosts")
        self.client.post(f"/api/definitions/{vhost}", json=defs).raise_for_status()

    def delete_vhost(self, vhost: str) -> None:
        self.client.delete(f"/api/vhosts/{vhost}")

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}/{name}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def mqtt_connections(self, vhost: str) -> int:
        response = self.client.get(
            f"/api/vhosts/{vhost}/connections", params={"columns": "protocol"}
        )
        response.raise_for_status()
        return sum(1 for c in response.json() if str(c.get("protocol", "")).startswith("MQTT"))

    def overview(self) -> dict[str, Any]:
        response = self.client.get("/api/overview")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.overview()
                return True
            except httpx.HTTPError:
                time.sleep(1)
        return False


async def create_database(admin_url: str, name: str) -> str:
    """CREATE DATABASE, then the gateway's migrations; returns the new database's URL."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_path(admin_url, name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


async def drop_database(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- processes ---------------------------------------------------------------------------
def broker_process() -> psutil.Process | None:
    """The running RabbitMQ node (not a short-lived rabbitmqctl VM)."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.info["name"] == "beam.smp" and " -s rabbit boot" in cmdline:
            return proc
    return None


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]


def open_files_limit(proc: psutil.Process) -> int:
    """The soft limit, read from /proc (prlimit on another process may be refused)."""
    with open(f"/proc/{proc.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 30 if soft == "unlimited" else int(soft)
    raise RuntimeError(f"no open-files limit in /proc/{proc.pid}/limits")


def ensure_broker_file_limit(needed: int, restart: bool, say: Say) -> None:
    """Say clearly when the broker cannot hold ``needed`` sockets; restart it if allowed."""
    proc = broker_process()
    if proc is None:
        raise SystemExit("bench: no running RabbitMQ node found (beam.smp with -s rabbit boot)")
    limit = open_files_limit(proc)
    if limit >= needed:
        say(f"RabbitMQ (pid {proc.pid}) open-files limit {limit}: enough for {needed}")
        return
    say(
        f"WARNING: RabbitMQ (pid {proc.pid}) runs with an open-files limit of {limit}, "
        f"fewer than the {needed} the largest scenario needs (one socket per MQTT node). "
        "/etc/rabbitmq/rabbitmq-env.conf raises it, but only at the broker's next start."
    )
    if not restart:
        raise SystemExit(
            "bench: restart the broker (rabbitmqctl stop; rabbitmq-server -detached; "
            "rabbitmqctl await_startup) or run without --no-restart-broker"
        )
    say("restarting RabbitMQ: rabbitmqctl stop; rabbitmq-server -detached; await_startup")
    subprocess.run(["rabbitmqctl", "-q", "stop"], check=False, capture_output=True)
    subprocess.run(["rabbitmq-server", "-detached"], check=True, capture_output=True)
    # await_startup fails at once (69) until the new node answers at all: try again, bounded
    deadline = time.monotonic() + 120
    while subprocess.run(
        ["rabbitmqctl", "-q", "await_startup", "--timeout", "60"], capture_output=True
    ).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("bench: RabbitMQ did not come back within 120 s of its restart")
        time.sleep(1)
    proc = broker_process()
    limit = open_files_limit(proc) if proc else 0
    say(f"RabbitMQ restarted (pid {proc.pid if proc else '?'}), open-files limit now {limit}")
    if limit < needed:
        raise SystemExit(f"bench: the broker's open-files limit is still {limit} (< {needed})")


# -- machine -----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def machine(admin: BrokerAdmin, db_url: str) -> dict[str, str]:
    overview = await asyncio.to_thread(admin.overview)
    conn = await asyncpg.connect(db_url)
    try:
        pg_version = str(await conn.fetchval("SHOW server_version"))
        sync_commit = str(await conn.fetchval("SHOW synchronous_commit"))
    finally:
        await conn.close()
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu_model(),
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "rabbitmq": f"{overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})",
        "postgresql": f"{pg_version} (synchronous_commit={sync_commit})",
        "python": platform.python_version(),
        "revision": revision(),
    }


def revision() -> str:
    """The commit the gateway ran from, and whether its working tree had changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (src/ with uncommitted changes)" if dirty else head


@contextlib.asynccontextmanager
async def running(gateway: Gateway, within: float = 30) -> AsyncIterator[Gateway]:
    """Run a gateway in this event loop for the block; stop it (staged) afterwards."""
    task = asyncio.create_task(gateway.run(), name="gateway")
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({task, started}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # its exception, if it failed to start
    if not gateway.started.is_set():
        started.cancel()
        gateway.request_stop()
        await asyncio.wait_for(task, 60)
        raise RuntimeError(f"the gateway did not start within {within:g} s")
    try:
        yield gateway
    finally:
        gateway.request_stop()
        await asyncio.wait_for(task, 60)
