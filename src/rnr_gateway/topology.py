"""The broker topology of PROTOCOL §2, declared once here.

The same description feeds the gateway's idempotent declaration at start and the broker
definitions file loaded at broker boot (``rnr-gateway definitions``), so the two can
never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEVICE_EXCHANGE = "amq.topic"
DATA_EXCHANGE = "iot_data"
COMMAND_EXCHANGE = "device_management"
DEAD_LETTER_EXCHANGE = "dlx"
# alternate exchange of amq.topic: device messages on topics no queue is bound to (a node
# id with a dot, a misspelt channel) land in failed_messages instead of vanishing
UNROUTED_EXCHANGE = "unrouted"

SENSOR_QUEUE = "sensor_data_enhanced"
COMMAND_QUEUE = "device_commands_enhanced"
STATUS_QUEUE = "device_status_enhanced"
ACK_QUEUE = "device_acks"
FAILED_QUEUE = "failed_messages"


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str = "topic"


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    # (exchange, routing key) pairs
    bindings: tuple[tuple[str, str], ...] = ()


EXCHANGES: tuple[Exchange, ...] = (
    Exchange(DATA_EXCHANGE),
    Exchange(COMMAND_EXCHANGE),
    Exchange(DEAD_LETTER_EXCHANGE),
    Exchange(UNROUTED_EXCHANGE),
)

QUEUES: tuple[Queue, ...] = (
    Queue(
        SENSOR_QUEUE,
        {
            "x-message-ttl": 3_600_000,
            "x-max-length": 50_000,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": "sensor_data.failed",
        },
        ((DEVICE_EXCHANGE, "devices.*.data"), (DATA_EXCHANGE, "devices.*.data")),
    ),
    Queue(
        COMMAND_QUEUE,
        {
            "x-max-priority": 10,
            "x-message-ttl": 300_000,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": "commands.expired",
        },
        ((COMMAND_EXCHANGE, "commands.*"),),
    ),
    Queue(
        STATUS_QUEUE,
        {"x-message-ttl": 60_000},
        ((DEVICE_EXCHANGE, "devices.*.status"), (COMMAND_EXCHANGE, "status.*")),
    ),
    Queue(
        ACK_QUEUE,
        {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
        ((DEVICE_EXCHANGE, "devices.*.ack"),),
    ),
    Queue(
        FAILED_QUEUE,
        {},
        (
            (DEAD_LETTER_EXCHANGE, "#"),
            (UNROUTED_EXCHANGE, "devices.#.data"),
            (UNROUTED_EXCHANGE, "devices.#.status"),
            (UNROUTED_EXCHANGE, "devices.#.ack"),
        ),
    ),
)

# Policies cannot be declared over AMQP: they reach the broker through the definitions.
POLICIES: tuple[dict[str, Any], ...] = (
    {
        "name": "rnr-unrouted-device-messages",
        "pattern": r"^amq\.topic$",
        "apply-to": "exchanges",
        "definition": {"alternate-exchange": UNROUTED_EXCHANGE},
        "priority": 0,
    },
)


def definitions(vhost: str) -> dict[str, Any]:
    """Broker definitions (``rabbitmqctl import_definitions`` / ``load_definitions``)."""
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in QUEUES
        ],
        "policies": [{"vhost": vhost, **policy} for policy in POLICIES],
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for q in QUEUES
            for exchange, key in q.bindings
        ],
    }
