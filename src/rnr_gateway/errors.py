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

    def __init__(self, queue: str, vhost: str, detail: str, kind: str = "queue") -> None:
        self.queue, self.vhost, self.detail = queue, vhost, detail
        if kind == "exchange":
            super().__init__(
                f"exchange {queue!r} in vhost {vhost!r} exists with another type or other "
                f"arguments ({detail}). Delete it (rabbitmqadmin -V {vhost} delete exchange "
                f"name={queue}, or in the management UI) and restart the gateway, which "
                "declares it again as PROTOCOL §2 says."
            )
            return
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


class NotFound(GatewayError):
    """Something a request names does not exist (HTTP 404)."""

    code = "not_found"

    def __init__(self, kind: str, key: str, hint: str = "") -> None:
        self.kind, self.key = kind, key
        super().__init__(f"{kind} {key!r} does not exist" + (f"; {hint}" if hint else ""))


class NodeNotFound(NotFound):
    code = "node_not_found"

    def __init__(self, node_ids: list[str]) -> None:
        self.node_ids = node_ids
        shown = ", ".join(node_ids[:10]) + (", ..." if len(node_ids) > 10 else "")
        super().__init__(
            "node", shown, "register it (POST /api/nodes) or let it send a message first"
        )


class CommandNotFound(NotFound):
    code = "command_not_found"

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        super().__init__("command", message_id)


class InvalidCommand(GatewayError):
    """A command body the gateway refuses (HTTP 422); ``field`` names the culprit."""

    code = "invalid_command"

    def __init__(self, field: str, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


class CommandTooLarge(GatewayError):
    """The encoded command is over the limit (HTTP 413)."""

    code = "command_too_large"

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"the encoded command is {size} bytes, over the {limit}-byte limit")


class CommandConflict(GatewayError):
    """The command is in a state that does not allow the request (HTTP 409)."""

    code = "command_conflict"

    def __init__(self, message_id: str, status: str, detail: str) -> None:
        self.message_id, self.status = message_id, status
        super().__init__(f"command {message_id!r} is {status}: {detail}")
