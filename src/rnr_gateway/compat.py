"""Names from the original platform, kept importable for code written against it.

    from rnr_gateway import EnhancedRabbitMQClient   # the AMQP adapter (amqp.Amqp)

Each name is the real component, not a wrapper; constructors take the new arguments.
"""

from __future__ import annotations

from .amqp import Amqp
from .ingest import Ingest
from .mqtt import Mqtt

EnhancedRabbitMQClient = RabbitMQClient = Amqp
EnhancedWorkerService = WorkerService = Ingest
EnhancedMQTTCommandPublisher = MQTTCommandPublisher = Mqtt
