"""The gateway's error hierarchy. Library exceptions are translated at adapter edges."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """One or more settings are invalid; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


class DependencyUnavailable(GatewayError):
    """An external system (broker, database) could not be reached."""

    def __init__(self, system: str, target: str, cause: str) -> None:
        self.system, self.target, self.cause = system, target, cause
        super().__init__(f"{system} at {target} is unavailable: {cause}")


class TopologyMismatch(GatewayError):
    """A queue already exists with arguments other than the ones the gateway declares."""

    def __init__(self, queue: str, vhost: str, detail: str) -> None:
        self.queue, self.vhost, self.detail = queue, vhost, detail
        super().__init__(
            f"queue {queue!r} in vhost {vhost!r} exists with different arguments ({detail}). "
            f"Drain it, then delete it (rabbitmqctl delete_queue -p {vhost} {queue}) and "
            "restart the gateway, which declares it again with the arguments of PROTOCOL §2."
        )


class BadMessage(GatewayError):
    """A message that can never be processed; ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class PortInUse(GatewayError):
    def __init__(self, host: str, port: int, cause: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({cause}); set HTTP_PORT to a free port")
