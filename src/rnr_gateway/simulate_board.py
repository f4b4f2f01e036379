"""What a simulated node sends, and what it does with the commands it is sent.

Payloads: the legacy forms A-F of PROTOCOL §3.1 (``legacy_payload``), and readings that
show the node's outputs (``reading``).

Commands: enhanced nodes run the MicroPython firmware's own rules (``firmware_node``, the file the
boards run): ``received``, then ``executed`` or ``failed``; ``rejected`` for an action
they do not know, ``expired`` past ``expires_at``, ``duplicate`` for a message id already
handled. Legacy nodes send no acks: like the Arduino firmware they act, then report it in
a status event (``relay3_on``, ``light_off``, ``update_failed``, ...) from which the gateway
infers the outcome (PROTOCOL §4.2). Either way the node's outputs change and its readings
and status events show them. A simulated node cannot fetch firmware: ``FIRMWARE_UPDATE``
fails, as it would on a board that cannot reach the URL.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .command_codec import inferred_outcomes

Actuator = Callable[[dict[str, Any]], object]
RELAYS = range(1, 6)
NEW_ACTIONS = frozenset(("SET_INTERVAL", "PING"))  # unknown to the Arduino firmware
INTERVAL_RANGE_S = (1, 86_400)
FIRMWARE = "sim-1.0"  # the ``fw`` of enhanced simulated nodes


def _flag(command: dict[str, Any], key: str) -> bool:
    value = command.get(key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _number(command: dict[str, Any], key: str, low: int, high: int) -> float:
    value = command.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{key} must be a number from {low} to {high}")
    return value


def _whole(command: dict[str, Any], key: str, low: int, high: int) -> int:
    value = command.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{key} must be a whole number from {low} to {high}")
    return value


@dataclass
class Outputs:
    """A simulated board's outputs, as its commands leave them."""

    light: bool = False
    fan: bool = False
    real_model: bool = False
    smart_mode: bool = False
    servo_angle: int = 90
    relays: dict[int, bool] = field(default_factory=lambda: dict.fromkeys(RELAYS, False))
    light_schedule: tuple[int, int] | None = None
    interval_s: float | None = None  # set by SET_INTERVAL; None: the fleet's rate

    def actuators(self) -> dict[str, Actuator]:
        """Action → what carries it out (raises ValueError on a bad parameter)."""
        return {
            "RELAY_CONTROL": self._relay,
            "LIGHT_CONTROL": lambda c: setattr(self, "light", _flag(c, "state")),
            "FAN_CONTROL": lambda c: setattr(self, "fan", _flag(c, "state")),
            "REAL_MODEL_CONTROL": lambda c: setattr(self, "real_model", _flag(c, "state")),
            "SMART_MODE": lambda c: setattr(self, "smart_mode", _flag(c, "enabled")),
            "SERVO_ANGLE": self._servo,
            "SERVO_CONTROL": self._servo,
            "SET_LIGHT_SCHEDULE": self._schedule,
            "SET_INTERVAL": self._interval,
            "FIRMWARE_UPDATE": self._update,
            "STATUS_REQUEST": lambda c: None,
            "PING": lambda c: None,
        }

    def _relay(self, command: dict[str, Any]) -> None:
        relay = _whole(command, "relay", RELAYS.start, RELAYS.stop - 1)
        self.relays[relay] = _flag(command, "state")

    def _servo(self, command: dict[str, Any]) -> None:
        self.servo_angle = round(_number(command, "angle", 0, 180))

    def _schedule(self, command: dict[str, Any]) -> None:
        self.light_schedule = (
            _whole(command, "on_hour", 0, 23),
            _whole(command, "off_hour", 0, 23),
        )

    def _interval(self, command: dict[str, Any]) -> None:
        self.interval_s = float(_number(command, "seconds", *INTERVAL_RANGE_S))

    def _update(self, command: dict[str, Any]) -> None:
        raise RuntimeError(f"a simulated node cannot fetch {str(command.get('url'))[:100]}")

    def status_event(self, n: int) -> str:
        """The state a legacy node reports in its periodic status event (form D)."""
        if n % 2:
            return f"relay3_{'on' if self.relays[3] else 'off'}"
        return f"light_{'on' if self.light else 'off'}"


def reading(node_id: str, rng: random.Random, outputs: Outputs | None = None) -> dict[str, Any]:
    """Form A, the full legacy reading (with the node's outputs, if given)."""
    body = {
        "timestamp": time.strftime("%H:%M:%S"),
        "temperature": round(rng.uniform(18, 32), 1),
        "humidity": round(rng.uniform(30, 80), 1),
        "gas_sensor": rng.randint(800, 1500),
        "status": "online",
        "node_id": node_id,
        "servo_angle": rng.choice((0, 45, 90, 135)),
        "light_state": rng.random() < 0.5,
        "fan_state": rng.random() < 0.3,
        "uptime": int(time.monotonic() * 1000),
        "wifi_rssi": rng.randint(-80, -40),
    }
    if outputs is not None:
        body.update(
            servo_angle=outputs.servo_angle, light_state=outputs.light, fan_state=outputs.fan
        )
    return body


def legacy_payload(
    node_id: str, n: int, rng: random.Random, readings_only: bool, outputs: Outputs
) -> dict[str, Any]:
    """Rotate through the legacy forms the way an Arduino node mixes them."""
    if readings_only or n % 10 not in (3, 6, 9):
        if n % 10 == 5 and not readings_only:
            return {
                "temperature": round(rng.uniform(18, 32), 1),
                "node_id": node_id,
                "timestamp": int(time.monotonic() * 1000),
            }  # form F
        return reading(node_id, rng, outputs)
    if n % 10 == 3:
        return {
            "type": "heartbeat",
            "status": "online",
            "node_id": node_id,
            "uptime": int(time.monotonic() * 1000),
        }  # form C
    if n % 10 == 6:
        return status_event(node_id, outputs.status_event(n // 10), rng)
    return {"test": "ping", "node_id": node_id}  # form E


def status_event(node_id: str, status: str, rng: random.Random) -> dict[str, Any]:
    """Form D, a legacy status event."""
    return {
        "timestamp": "unknown",
        "status": status,
        "free_heap": rng.randint(150_000, 210_000),
        "wifi_rssi": -55,
        "node_id": node_id,
        "signal_strength": 70,
    }


@dataclass(frozen=True)
class LegacyAnswer:
    event: str | None  # the status event to send, if the firmware sends one
    reboot: bool = False


def legacy_answer(outputs: Outputs, raw: bytes) -> LegacyAnswer:
    """What the Arduino firmware does with a command: act, then report it in a status event
    (the one the gateway's inference rules expect for that outcome); no acks."""
    try:
        command = orjson.loads(raw)
        action = command["action"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return LegacyAnswer(None)  # an empty retained clear, or garbage
    if action == "REBOOT":
        return LegacyAnswer("rebooting", reboot=True)
    handler = outputs.actuators().get(action)
    if handler is None or action in NEW_ACTIONS:
        return LegacyAnswer(None)
    try:
        handler(command)
        outcome = "executed"
    except (ValueError, RuntimeError):
        outcome = "failed"
    events = inferred_outcomes(command)
    return LegacyAnswer(next((e for e, o in events.items() if o == outcome), None))
