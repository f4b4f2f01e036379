"""Command wire shapes (PROTOCOL §4): validation, encoding, acks, legacy inference rules.

Pure functions only; the outbox and the dispatcher build on them.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import orjson

from .dispatch import Pending
from .errors import BadMessage, CommandTooLarge, InvalidCommand
from .topics import parse_routing_key

Status = Literal[
    "queued", "sent", "received", "executed", "failed", "rejected", "expired", "cancelled"
]
AckStatus = Literal["received", "executed", "failed", "rejected", "expired", "duplicate"]
ACK_STATUSES: frozenset[str] = frozenset(
    ("received", "executed", "failed", "rejected", "expired", "duplicate")
)
TERMINAL: frozenset[str] = frozenset(("executed", "failed", "rejected", "expired", "cancelled"))
ACTION = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# set by the gateway in the encoded command, whatever the body says
RESERVED = ("message_id", "cmd_timestamp", "expires_at", "priority")
MAX_TTL_S = 7 * 86_400.0
MAX_ACK_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Options:
    priority: int = 5
    ttl_s: float = 300.0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    node_id: str
    message_id: str
    status: AckStatus
    detail: str


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_message_id() -> str:
    """16 URL-safe characters (96 bits): short, because legacy nodes parse ≤ 256 bytes."""
    return secrets.token_urlsafe(12)


# -- validation ----------------------------------------------------------------------------
Check = Callable[[Any], str | None]  # None when fine, else what is wrong


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be an integer {low}-{high}, got {value!r:.40}"
        return None

    return check


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number {low:g}-{high:g}, got {value!r:.40}"
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}, got {value!r:.40}"
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r:.40}"


def _url(value: Any) -> str | None:
    if isinstance(value, str) and re.fullmatch(r"https?://\S{1,2000}", value):
        return None
    return f"must be an http(s) URL, got {value!r:.60}"


HOUR = _integer(0, 23)
# required parameters of the actions PROTOCOL §4.1 names; other actions pass unchecked
# (a node that does not know an action acks ``rejected``)
ACTIONS: dict[str, dict[str, Check]] = {
    "REBOOT": {},
    "STATUS_REQUEST": {},
    "PING": {},
    "FIRMWARE_UPDATE": {"url": _url},
    "SERVO_ANGLE": {"angle": _number(0, 180)},
    "SERVO_CONTROL": {"angle": _number(0, 180)},
    "LIGHT_CONTROL": {"state": _boolean},
    "FAN_CONTROL": {"state": _boolean},
    "RELAY_CONTROL": {"relay": _integer(1, 5), "state": _boolean},
    "REAL_MODEL_CONTROL": {"state": _boolean},
    "SMART_MODE": {"enabled": _boolean},
    "SET_LIGHT_SCHEDULE": {"on_hour": HOUR, "off_hour": HOUR},
    "SET_INTERVAL": {"seconds": _number(1, 86_400)},
}


def validate(body: Mapping[str, Any]) -> str:
    """Check a command body (flat, ``action`` upper case, known actions' parameters).

    Returns the action; raises InvalidCommand naming the field and what is wrong.
    """
    if not isinstance(body, Mapping):
        raise InvalidCommand("body", "must be a JSON object")
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise InvalidCommand("action", "is required (e.g. RELAY_CONTROL)")
    if ACTION.fullmatch(action) is None:
        hint = f" (did you mean {action.upper()!r}?)" if ACTION.fullmatch(action.upper()) else ""
        raise InvalidCommand(
            "action", f"{action[:64]!r} must be upper case letters, digits and _{hint}"
        )
    for key, value in body.items():
        if not isinstance(key, str) or not key:
            raise InvalidCommand("body", "parameter names must be non-empty strings")
        if isinstance(value, dict | list):
            raise InvalidCommand(key, "parameters must be flat (no objects or arrays)")
        if "\x00" in key or (isinstance(value, str) and "\x00" in value):
            raise InvalidCommand(
                key[:64], "contains a NUL character (\\u0000), which is not stored"
            )
    message_id = body.get("message_id")
    if message_id is not None and (
        not isinstance(message_id, str) or MESSAGE_ID.fullmatch(message_id) is None
    ):
        raise InvalidCommand("message_id", "must be 1-64 characters of A-Z a-z 0-9 _ -")
    for name, check in ACTIONS.get(action, {}).items():
        if name not in body:
            raise InvalidCommand(name, f"is required for {action}")
        problem = check(body[name])
        if problem:
            raise InvalidCommand(name, problem)
    return action


def validate_options(priority: Any, ttl_s: Any, retain: Any) -> Options:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
        raise InvalidCommand("priority", f"must be an integer 0-10, got {priority!r:.40}")
    if (
        isinstance(ttl_s, bool)
        or not isinstance(ttl_s, int | float)
        or not math.isfinite(ttl_s)
        or not 0 < ttl_s <= MAX_TTL_S
    ):
        raise InvalidCommand(
            "ttl_s", f"must be seconds > 0 and <= {MAX_TTL_S:g}, got {ttl_s!r:.40}"
        )
    if not isinstance(retain, bool):
        raise InvalidCommand("retain", f"must be true or false, got {retain!r:.40}")
    return Options(priority, float(ttl_s), retain)


# -- encoding ------------------------------------------------------------------------------
def encode(
    params: Mapping[str, Any],
    message_id: str,
    created_at: datetime,
    expires_at: datetime,
    priority: int,
    limit: int | None = None,
) -> bytes:
    """The compact command a node receives: the body as given plus the gateway's fields."""
    doc: dict[str, Any] = {"action": params["action"]}
    doc.update((k, v) for k, v in params.items() if k not in RESERVED)
    doc["message_id"] = message_id
    doc["cmd_timestamp"] = int(created_at.timestamp())
    doc["expires_at"] = math.ceil(expires_at.timestamp())
    doc["priority"] = priority
    payload = orjson.dumps(doc)
    if limit is not None and len(payload) > limit:
        raise CommandTooLarge(len(payload), limit)
    return payload


# -- acks ----------------------------------------------------------------------------------
def decode_ack(routing_key: str, body: bytes) -> Ack:
    """``devices.{id}.ack`` + ``{"message_id","status","detail"}`` → Ack, or BadMessage."""
    node_id, channel = parse_routing_key(routing_key)
    if channel != "ack":
        raise BadMessage("bad_topic", f"{routing_key[:200]!r} is not an ack topic")
    if len(body) > MAX_ACK_BYTES:
        raise BadMessage("oversize", f"ack of {len(body)} bytes > {MAX_ACK_BYTES}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadMessage("bad_json", f"ack is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage("wrong_type", "ack must be a JSON object")
    message_id, status = data.get("message_id"), data.get("status")
    if not isinstance(message_id, str) or MESSAGE_ID.fullmatch(message_id) is None:
        raise BadMessage("bad_ack", f"message_id {message_id!r:.80} is missing or malformed")
    if status not in ACK_STATUSES:
        raise BadMessage("bad_ack", f"status {status!r:.40} is not one of {sorted(ACK_STATUSES)}")
    detail = data.get("detail")
    # a NUL character is not text PostgreSQL stores: replaced, the ack still counts
    text = str(detail).replace("\x00", "\ufffd")[:500] if detail else ""
    return Ack(node_id, message_id, cast(AckStatus, status), text)


# -- records ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CommandEvent:
    status: Status
    reason: str
    at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "at": self.at.isoformat()}


@dataclass(frozen=True, slots=True)
class CommandRecord:
    message_id: str
    node_id: str
    action: str
    params: dict[str, Any]
    priority: int
    ttl_s: float
    retain: bool
    broadcast_id: str | None
    status: Status
    reason: str
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    received_at: datetime | None
    finished_at: datetime | None
    attempts: int
    updated_at: datetime
    events: tuple[CommandEvent, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (timestamps ISO 8601), for HTTP responses."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif name == "events":
                value = [e.to_json() for e in value]
            out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class NewCommand:
    message_id: str
    node_id: str
    action: str
    params: dict[str, Any]
    options: Options
    created_at: datetime
    expires_at: datetime
    broadcast_id: str | None = None
    source: str = "api"

    @classmethod
    def create(
        cls,
        node_id: str,
        body: Mapping[str, Any],
        options: Options,
        *,
        message_id: str | None = None,
        broadcast_id: str | None = None,
        source: str = "api",
    ) -> NewCommand:
        """A new command as of now (``body`` already validated)."""
        created = utcnow()
        return cls(
            message_id or new_message_id(),
            node_id,
            str(body["action"]),
            dict(body),
            options,
            created,
            created + timedelta(seconds=options.ttl_s),
            broadcast_id,
            source,
        )

    def encode(self, limit: int | None = None) -> bytes:
        return encode(
            self.params,
            self.message_id,
            self.created_at,
            self.expires_at,
            self.options.priority,
            limit,
        )

    def record(self) -> CommandRecord:
        """The record as inserted (queued), without reading it back."""
        o = self.options
        return CommandRecord(
            self.message_id,
            self.node_id,
            self.action,
            self.params,
            o.priority,
            o.ttl_s,
            o.retain,
            self.broadcast_id,
            "queued",
            "accepted",
            self.created_at,
            self.expires_at,
            None,
            None,
            None,
            0,
            self.created_at,
        )

    def pending(self, payload: bytes) -> Pending:
        o = self.options
        exp = self.expires_at.timestamp()
        return Pending(self.message_id, self.node_id, o.priority, exp, payload, o.retain)


def pending_of(r: CommandRecord) -> Pending:
    """A queued command from the outbox, encoded again (same id, same times)."""
    payload = encode(r.params, r.message_id, r.created_at, r.expires_at, r.priority)
    return Pending(r.message_id, r.node_id, r.priority, r.expires_at.timestamp(), payload, r.retain)


@dataclass(frozen=True, slots=True)
class Moved:
    """A committed transition: what the on_status callback and metrics get."""

    message_id: str
    node_id: str
    status: Status
    reason: str
    at: datetime
    retain: bool
    attempts: int


# -- legacy inference (PROTOCOL §4.2, fixtures legacy_status_events_after_commands) --------
def inferred_outcomes(params: Mapping[str, Any]) -> dict[str, Status]:
    """Status events a legacy node sends after carrying out this command → the outcome."""
    action = params.get("action")
    state = params.get("state")
    on_off = ("on" if state else "off") if isinstance(state, bool) else None
    if action == "RELAY_CONTROL" and on_off and isinstance(params.get("relay"), int):
        return {f"relay{params['relay']}_{on_off}": "executed"}
    for prefix, act in (("light", "LIGHT"), ("fan", "FAN"), ("real_model", "REAL_MODEL")):
        if action == f"{act}_CONTROL" and on_off:
            return {f"{prefix}_{on_off}": "executed"}
    simple: dict[str, dict[str, Status]] = {
        "SERVO_ANGLE": {"servo_updated_wifi": "executed"},
        "SERVO_CONTROL": {"servo_updated_wifi": "executed"},
        "REBOOT": {"rebooting": "executed"},
        "STATUS_REQUEST": {"online": "executed"},
        "FIRMWARE_UPDATE": {"update_failed": "failed"},
    }
    return simple.get(str(action), {})
