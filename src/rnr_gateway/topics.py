"""Topic and routing-key rules (PROTOCOL §1, §3). Node ids are validated, never interpolated."""

from __future__ import annotations

import re
from typing import Literal

from .errors import BadMessage

NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
LEGACY_MAC = re.compile(r"[0-9A-F]{12}")
Channel = Literal["data", "status", "ack"]
CHANNELS: frozenset[str] = frozenset(("data", "status", "ack"))


def valid_node_id(node_id: str) -> bool:
    return NODE_ID.fullmatch(node_id) is not None


def parse_routing_key(routing_key: str) -> tuple[str, Channel]:
    """``devices.{id}.{data|status|ack}`` → (node id, channel), or BadMessage."""
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[0] != "devices" or parts[2] not in CHANNELS:
        raise BadMessage("bad_topic", f"routing key {routing_key[:200]!r} is not devices.<id>.*")
    if not valid_node_id(parts[1]):
        raise BadMessage("bad_node_id", f"node id {parts[1][:80]!r} is not allowed")
    return parts[1], parts[2]  # type: ignore[return-value]


def mac_address(node_id: str) -> str | None:
    """Legacy nodes are named by their MAC without colons; give it back with them."""
    if LEGACY_MAC.fullmatch(node_id) is None:
        return None
    return ":".join(node_id[i : i + 2] for i in range(0, 12, 2))


def data_topic(node_id: str) -> str:
    return f"devices/{node_id}/data"


def status_topic(node_id: str) -> str:
    return f"devices/{node_id}/status"


def command_topic(node_id: str) -> str:
    return f"devices/{node_id}/commands"


def ack_topic(node_id: str) -> str:
    return f"devices/{node_id}/ack"
