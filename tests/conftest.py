"""Shared fixtures: every test gets its own RabbitMQ vhost and its own PostgreSQL database,
both real, on loopback. Credentials come from the same env file `make setup` used."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiomqtt
import asyncpg
import pytest
from bench.services import (
    BrokerAdmin,
    create_database,
    drop_database,
    require_admin_url,
    running,
    with_path,
)

from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import (
    AmqpSettings,
    DbSettings,
    HttpSettings,
    MqttSettings,
    Secret,
    Settings,
)
from rnr_gateway.simulate import NODELAY

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = Path(os.environ.get("ENV_FILE", ROOT / ".env"))
T = TypeVar("T")
TOKENS = {"read": "test-read-token", "command": "test-command-token", "admin": "test-admin-token"}


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    if not ENV_FILE.exists():
        pytest.exit(f"{ENV_FILE} is missing: run `make setup` (or `make test`) first", 2)
    return Settings.from_env(env_file=ENV_FILE)


@pytest.fixture(scope="session")
def broker_admin() -> Iterator[BrokerAdmin]:
    try:
        url = require_admin_url(ENV_FILE)
    except SystemExit as exc:
        pytest.exit(str(exc), 2)
    admin = BrokerAdmin(url)
    yield admin
    admin.client.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def vhost(broker_admin: BrokerAdmin, base_settings: Settings, unique: str) -> Iterator[str]:
    """A fresh vhost with the topology loaded as broker definitions (as at broker boot)."""
    name = f"rnr_test_{unique}"
    user = urlsplit(base_settings.amqp.url.value).username or ""
    broker_admin.create_vhost(name, user)
    yield name
    broker_admin.delete_vhost(name)


@pytest.fixture(scope="session")
def template_db(base_settings: Settings) -> Iterator[str]:
    """A migrated database that every test database is cloned from."""
    name = f"rnr_test_template_{os.getpid()}"
    asyncio.run(create_database(base_settings.db.url.value, name))
    yield name
    asyncio.run(drop_database(base_settings.db.url.value, name))


@pytest.fixture
async def database(base_settings: Settings, template_db: str, unique: str) -> AsyncIterator[str]:
    name = f"rnr_test_{unique}"
    admin = await asyncpg.connect(base_settings.db.url.value)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield with_path(base_settings.db.url.value, name)
    # a new connection: a fault test may have restarted PostgreSQL meanwhile
    await drop_database(base_settings.db.url.value, name)


@pytest.fixture
def settings(base_settings: Settings, vhost: str, database: str) -> Settings:
    """Settings pointing at this test's vhost and database, with short test timings."""
    amqp_url = with_path(base_settings.amqp.url.value, vhost)
    mqtt = base_settings.mqtt
    return replace(
        base_settings,
        amqp=AmqpSettings(
            url=Secret(amqp_url),
            prefetch=200,
            reconnect_initial_s=0.2,
            reconnect_max_s=2.0,
            socket_timeout_s=5.0,
            publish_timeout_s=5.0,
        ),
        mqtt=MqttSettings(
            host=mqtt.host,
            port=mqtt.port,
            username=f"{vhost}:{mqtt.username}",
            password=mqtt.password,
            retry_delay_s=0.2,
            connection_timeout_s=5,
        ),
        db=DbSettings(url=Secret(database), pool_size=4, command_timeout_s=5, retry_max_s=1.0),
        http=HttpSettings(
            port=0, tokens=tuple((scope, Secret(tok)) for scope, tok in TOKENS.items())
        ),
        shutdown_timeout_s=10.0,
    )


def env_for(settings: Settings) -> dict[str, str]:
    """Environment for a gateway subprocess running on these settings."""
    env = dict(os.environ)
    env.update(
        RABBITMQ_URL=settings.amqp.url.value,
        DATABASE_URL=settings.db.url.value,
        MQTT_BROKER_HOST=settings.mqtt.host,
        MQTT_BROKER_PORT=str(settings.mqtt.port),
        MQTT_USERNAME=settings.mqtt.username or "",
        MQTT_PASSWORD=settings.mqtt.password.value if settings.mqtt.password else "",
        PREFETCH_COUNT=str(settings.amqp.prefetch),
        AMQP_RECONNECT_INITIAL_S=str(settings.amqp.reconnect_initial_s),
        AMQP_RECONNECT_MAX_S=str(settings.amqp.reconnect_max_s),
        DB_RETRY_MAX_S=str(settings.db.retry_max_s),
        SHUTDOWN_TIMEOUT_S=str(settings.shutdown_timeout_s),
        HTTP_PORT="0",
        API_TOKENS=",".join(f"{scope}:{token}" for scope, token in TOKENS.items()),
        LOG_LEVEL="INFO",
    )
    return env


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with running(Gateway(settings)) as gw:
        yield gw


@contextlib.asynccontextmanager
async def mqtt_client(
    settings: Settings, client_id: str, **kwargs: Any
) -> AsyncIterator[aiomqtt.Client]:
    password = settings.mqtt.password.value if settings.mqtt.password else None
    async with aiomqtt.Client(
        settings.mqtt.host,
        settings.mqtt.port,
        username=settings.mqtt.username,
        password=password,
        identifier=client_id,
        socket_options=NODELAY,
        timeout=10,
        **kwargs,
    ) as client:
        yield client


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    accept: Callable[[T], bool],
    within: float = 20.0,
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` (sync or async) until ``accept`` holds, bounded; returns the last value."""
    deadline = time.monotonic() + within

    async def sample() -> T:
        value = probe()
        return await value if inspect.isawaitable(value) else value  # type: ignore[return-value]

    value = await sample()
    while not accept(value):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s; last value: {value!r}")
        await asyncio.sleep(interval)
        value = await sample()
    return value


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to this test's database, for assertions."""
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()
