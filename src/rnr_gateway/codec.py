"""Payload classification (PROTOCOL §3.1): legacy forms A-G and the enhanced format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .errors import BadMessage
from .topics import Channel, parse_routing_key

Kind = Literal["reading", "event", "heartbeat", "ping", "status"]
MAX_PAYLOAD_BYTES = 65_536
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
BARE_STATUS = {b"offline": "offline", b"online": "online"}
# payloads are flat; the JSON encoder that stores them gives up at 254 levels
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Decoded:
    node_id: str
    channel: Channel
    kind: Kind
    data: dict[str, Any]
    boot: int | None = None
    seq: int | None = None
    ts: float | None = None
    fw: str | None = None
    # the body as received when it is the JSON object itself: stored without re-encoding
    text: str | None = field(default=None, compare=False, repr=False)

    @property
    def status(self) -> str | None:
        value = self.data.get("status")
        return value if isinstance(value, str) else None

    @property
    def offline(self) -> bool:
        return self.kind == "status" and self.status == "offline"


def decode(routing_key: str, body: bytes) -> Decoded:
    """Classify one device message, or raise BadMessage with a stable reason."""
    node_id, channel = parse_routing_key(routing_key)
    if channel == "ack":
        raise BadMessage("unexpected_channel", "acks are not ingested as data")
    if len(body) > MAX_PAYLOAD_BYTES:
        raise BadMessage("oversize", f"{len(body)} bytes > {MAX_PAYLOAD_BYTES}")
    bare = BARE_STATUS.get(body.strip())
    if bare is not None:
        return Decoded(node_id, channel, "status", {"status": bare})
    data = _load_object(body)
    body_id = data.get("node_id")
    if body_id is not None and body_id != node_id:
        raise BadMessage(
            "node_id_mismatch", f"body node_id {str(body_id)[:80]!r} != topic node {node_id!r}"
        )
    kind = "status" if channel == "status" else classify(data)
    return Decoded(
        node_id,
        channel,
        kind,
        data,
        boot=_integer(data, "boot", INT32_MAX),
        seq=_integer(data, "seq", INT64_MAX),
        ts=_number(data, "ts"),
        fw=_text(data, "fw"),
        text=body.decode(),  # orjson has checked it is UTF-8
    )


def classify(data: dict[str, Any]) -> Kind:
    if data.get("type") == "heartbeat":
        return "heartbeat"
    if "test" in data:
        return "ping"
    if ("free_heap" in data or "signal_strength" in data) and "temperature" not in data:
        return "event"
    return "reading"


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadMessage("bad_json", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage("wrong_type", f"payload is a JSON {type(data).__name__}, not an object")
    # each scan runs only when the raw bytes make it possible at all
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _too_deep(data):
        raise BadMessage("wrong_type", f"payload is nested deeper than {MAX_DEPTH} levels")
    # valid JSON, but PostgreSQL's jsonb cannot hold NUL characters (an escaped backslash
    # before "u0000" is not one)
    if b"\\u0000" in body and _has_nul(data):
        raise BadMessage("bad_json", "payload contains a \\u0000 character")
    return data


def _too_deep(data: dict[str, Any]) -> bool:
    level: list[Any] = [data]
    for _ in range(MAX_DEPTH):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _integer(data: dict[str, Any], key: str, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise BadMessage("wrong_type", f"{key} must be an integer 0..{high}, got {value!r:.40}")
    return value


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadMessage("wrong_type", f"{key} must be a number, got {value!r:.40}")
    return float(value)


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMessage("wrong_type", f"{key} must be a string, got {value!r:.40}")
    return value[:64]
