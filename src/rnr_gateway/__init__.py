"""rnr-gateway: the RNR IoT Platform's communication layer."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_ALIASES = frozenset(
    (
        "EnhancedRabbitMQClient",
        "RabbitMQClient",
        "EnhancedWorkerService",
        "WorkerService",
        "EnhancedMQTTCommandPublisher",
        "MQTTCommandPublisher",
    )
)


def __getattr__(name: str) -> Any:
    # the original platform's class names, imported on first use only (no import-time cost)
    if name in _ALIASES:
        import importlib

        return getattr(importlib.import_module("rnr_gateway.compat"), name)
    raise AttributeError(f"module 'rnr_gateway' has no attribute {name!r}")
