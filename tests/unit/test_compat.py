from rnr_gateway.amqp import Amqp
from rnr_gateway.ingest import Ingest
from rnr_gateway.mqtt import Mqtt


def test_seed_class_names_are_the_real_components() -> None:
    from rnr_gateway import (
        EnhancedMQTTCommandPublisher,
        EnhancedRabbitMQClient,
        EnhancedWorkerService,
        MQTTCommandPublisher,
        RabbitMQClient,
        WorkerService,
    )

    assert EnhancedRabbitMQClient is RabbitMQClient is Amqp
    assert EnhancedWorkerService is WorkerService is Ingest
    assert EnhancedMQTTCommandPublisher is MQTTCommandPublisher is Mqtt


def test_unknown_names_still_fail() -> None:
    import pytest

    import rnr_gateway

    with pytest.raises(AttributeError):
        _ = rnr_gateway.NoSuchThing
