"""AMQP and MQTT nudge each other's reconnect only when one broker is behind both."""

from __future__ import annotations

from rnr_gateway.gateway import Gateway, same_broker
from rnr_gateway.settings import AmqpSettings, DbSettings, MqttSettings, Secret, Settings


def settings(amqp_url: str, mqtt_host: str) -> Settings:
    return Settings(
        amqp=AmqpSettings(url=Secret(amqp_url)),
        mqtt=MqttSettings(host=mqtt_host, port=1884, username=None, password=None),
        db=DbSettings(url=Secret("postgresql://u@127.0.0.1/db")),
    )


def test_same_host_under_its_loopback_names() -> None:
    assert same_broker(settings("amqp://u:p@127.0.0.1:5672/v", "127.0.0.1"))
    assert same_broker(settings("amqp://u:p@localhost/v", "127.0.0.1"))
    assert same_broker(settings("amqp://u:p@rabbit.lan:5672/v", "rabbit.lan"))
    assert not same_broker(settings("amqp://u:p@rabbit.lan:5672/v", "127.0.0.1"))


def test_the_gateway_wires_the_nudge_both_ways_only_for_one_broker() -> None:
    one = Gateway(settings("amqp://u:p@127.0.0.1:5672/v", "localhost"))
    assert one.mqtt.retry_now in one.amqp.on_restored
    assert one.amqp.retry_now in one.mqtt.on_restored
    two = Gateway(settings("amqp://u:p@rabbit.lan:5672/v", "127.0.0.1"))
    assert not two.amqp.on_restored and not two.mqtt.on_restored
