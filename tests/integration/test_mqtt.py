"""The gateway's MQTT command client against the real broker (MQTT plugin): first connect
fails with a clear error, publish waits for the PUBACK, a lost connection is replaced by
a new client, and an unconfirmed publish says so."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from rnr_gateway.errors import DependencyUnavailable
from rnr_gateway.metrics import Metrics
from rnr_gateway.mqtt import Mqtt, PublishUnconfirmed
from rnr_gateway.settings import MqttSettings, Settings
from tests.conftest import env_for, eventually, mqtt_client
from tests.e2e.tcpproxy import TcpProxy


@contextlib.asynccontextmanager
async def running(mqtt: Mqtt) -> AsyncIterator[Mqtt]:
    """As the gateway does: connect on entering, then ``run`` owns the connection."""
    async with mqtt:
        assert mqtt.connected.is_set()
        task = asyncio.create_task(mqtt.run())
        try:
            yield mqtt
        finally:
            mqtt.request_stop()
            await asyncio.wait_for(task, 10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_first_connect_gives_up_after_max_retries_with_a_clear_error(
    settings: Settings,
) -> None:
    broken = replace(settings.mqtt, port=free_port(), max_retries=2, retry_delay_s=0.05)
    mqtt = Mqtt(broken, Metrics())
    with pytest.raises(DependencyUnavailable) as raised:
        async with asyncio.timeout(10), mqtt:
            pass
    assert raised.value.system == "mqtt"
    assert "after 3 attempts" in str(raised.value) and "MQTT_BROKER_HOST" in str(raised.value)
    assert mqtt.stats()["connection_attempts"] == 3 and not mqtt.connected.is_set()


async def test_publish_returns_after_the_puback_and_the_subscriber_has_it(
    settings: Settings,
) -> None:
    async with mqtt_client(settings, "listener") as listener:
        await listener.subscribe("devices/N1/commands", qos=1)
        async with running(Mqtt(settings.mqtt, Metrics())) as mqtt:
            await mqtt.publish("devices/N1/commands", b'{"action":"PING"}')
            async with asyncio.timeout(5):
                message = await anext(aiter(listener.messages))
            stats = mqtt.stats()
    assert message.payload == b'{"action":"PING"}' and message.qos == 1
    assert stats["commands_sent"] == 1 and stats["commands_failed"] == 0
    assert stats["success_rate_percent"] == 100.0 and stats["pending_publishes"] == 0


async def test_lost_connection_is_replaced_and_unconfirmed_publish_is_reported(
    settings: Settings,
) -> None:
    async with TcpProxy(settings.mqtt.host, settings.mqtt.port) as proxy:
        via: MqttSettings = replace(
            settings.mqtt, host="127.0.0.1", port=proxy.listen_port, publish_timeout_s=0.5
        )
        metrics = Metrics()
        async with running(Mqtt(via, metrics)) as mqtt:
            proxy.swallow_replies = True
            with pytest.raises(PublishUnconfirmed):
                await mqtt.publish("devices/N2/commands", b"{}")  # no PUBACK within 0.5 s
            proxy.swallow_replies = False
            proxy.drop_all()
            await eventually(lambda: proxy.connections, lambda n: n >= 2, within=10)
            await eventually(mqtt.connected.is_set, bool, within=10)
            await mqtt.publish("devices/N2/commands", b"{}")
            stats = mqtt.stats()
    assert stats["commands_sent"] == 1 and stats["commands_failed"] == 1
    assert stats["success_rate_percent"] == 50.0 and stats["connection_attempts"] >= 2
    assert metrics.value("rnr_reconnects_total", {"system": "mqtt"}) >= 1


async def test_retry_now_ends_the_reconnect_wait_at_once(settings: Settings) -> None:
    async with TcpProxy(settings.mqtt.host, settings.mqtt.port) as proxy:
        # a 60 s backoff: only retry_now can bring the connection back within the test
        via = replace(settings.mqtt, host="127.0.0.1", port=proxy.listen_port, retry_delay_s=60)
        async with running(Mqtt(via, Metrics())) as mqtt:
            restored: list[bool] = []
            mqtt.on_restored.append(lambda: restored.append(True))
            proxy.refuse = True
            proxy.drop_all()
            await eventually(mqtt.connected.is_set, lambda up: not up, within=10)
            await asyncio.sleep(1)
            assert not mqtt.connected.is_set() and proxy.connections == 1  # waiting it out
            proxy.refuse = False
            mqtt.retry_now()  # what the AMQP side does when it gets through to the broker
            await eventually(mqtt.connected.is_set, bool, within=10)
            assert restored == [True]  # and the AMQP side is told in turn
    assert proxy.connections == 2


async def test_gateway_process_exits_69_when_mqtt_never_answers(settings: Settings) -> None:
    env = env_for(settings)
    env.update(MQTT_BROKER_PORT=str(free_port()), MQTT_MAX_RETRIES="1", MQTT_RETRY_DELAY="0.05")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rnr_gateway",
        "run",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode()
    assert proc.returncode == 69, text
    assert "mqtt at 127.0.0.1:" in text and "after 2 attempts" in text
    assert "Traceback" not in text
