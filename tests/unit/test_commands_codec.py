"""Command validation, encoding, ack decoding and legacy inference rules (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from rnr_gateway.command_codec import (
    decode_ack,
    encode,
    inferred_outcomes,
    validate,
    validate_options,
)
from rnr_gateway.errors import BadMessage, CommandTooLarge, InvalidCommand

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "legacy-payloads.json"
LEGACY: dict[str, Any] = json.loads(FIXTURES.read_text()) if FIXTURES.exists() else {}
LEGACY_COMMANDS: dict[str, dict[str, Any]] = LEGACY.get("legacy_commands") or {
    "RELAY_CONTROL": {"action": "RELAY_CONTROL", "relay": 3, "state": True}
}


@pytest.mark.parametrize("body", list(LEGACY_COMMANDS.values()), ids=list(LEGACY_COMMANDS))
def test_every_legacy_command_is_valid(body: dict[str, Any]) -> None:
    assert validate(body) == body["action"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "action", "required"),
        ({"action": "relay_control", "relay": 1, "state": True}, "action", "'RELAY_CONTROL'"),
        ({"action": "RELAY_CONTROL", "relay": 6, "state": True}, "relay", "1-5"),
        ({"action": "RELAY_CONTROL", "relay": "3", "state": True}, "relay", "integer"),
        ({"action": "RELAY_CONTROL", "relay": True, "state": True}, "relay", "integer"),
        ({"action": "RELAY_CONTROL", "relay": 2}, "state", "required"),
        ({"action": "LIGHT_CONTROL", "state": "on"}, "state", "true or false"),
        ({"action": "SERVO_ANGLE", "angle": 181}, "angle", "between 0 and 180"),
        ({"action": "SET_LIGHT_SCHEDULE", "on_hour": 24, "off_hour": 6}, "on_hour", "0-23"),
        ({"action": "FIRMWARE_UPDATE", "url": "ftp://x"}, "url", "http"),
        ({"action": "PING", "nested": {"a": 1}}, "nested", "flat"),
        ({"action": "PING", "message_id": "has space"}, "message_id", "A-Z"),
        ({"action": "PING", "note": "a\x00b"}, "note", "NUL"),
        ({"action": "PING", "a\x00": 1}, "a\x00", "NUL"),
    ],
)
def test_invalid_commands_name_the_field(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidCommand) as raised:
        validate(body)
    assert raised.value.field == field
    assert words in raised.value.reason


def test_unknown_upper_case_actions_pass_for_the_node_to_judge() -> None:
    assert validate({"action": "SET_COLOUR", "rgb": "ff0000"}) == "SET_COLOUR"


@pytest.mark.parametrize(
    ("priority", "ttl", "retain", "field"),
    [(11, 10, False, "priority"), (True, 10, False, "priority"), (5, 0, False, "ttl_s"),
     (5, float("inf"), False, "ttl_s"), (5, 10, "yes", "retain")],
)  # fmt: skip
def test_invalid_options(priority: Any, ttl: Any, retain: Any, field: str) -> None:
    with pytest.raises(InvalidCommand) as raised:
        validate_options(priority, ttl, retain)
    assert raised.value.field == field


def test_encoding_keeps_the_body_and_sets_the_gateway_fields() -> None:
    created = datetime(2026, 11, 27, 14, 0, 0, 400_000, tzinfo=UTC)
    body = {"relay": 3, "action": "RELAY_CONTROL", "state": True, "priority": 1, "x": None}
    payload = encode(body, "abc", created, created + timedelta(seconds=300), 7)
    doc = orjson.loads(payload)
    assert next(iter(doc)) == "action"
    assert doc == {
        "action": "RELAY_CONTROL",
        "relay": 3,
        "state": True,
        "x": None,
        "message_id": "abc",
        "cmd_timestamp": int(created.timestamp()),
        "expires_at": int(created.timestamp()) + 301,  # rounded up: never early on a node
        "priority": 7,
    }
    assert len(payload) <= 256  # a legacy node parses it


def test_encoded_size_limit() -> None:
    now = datetime.now(UTC)
    body = {"action": "PING", "blob": "x" * 10_200}
    with pytest.raises(CommandTooLarge) as raised:
        encode(body, "id", now, now, 5, limit=10_240)
    assert raised.value.size > 10_240 and raised.value.limit == 10_240


def test_ack_decoding() -> None:
    ack = decode_ack("devices.N-1.ack", b'{"message_id":"m1","status":"executed","detail":"ok"}')
    assert (ack.node_id, ack.message_id, ack.status, ack.detail) == ("N-1", "m1", "executed", "ok")
    for body, reason in [
        (b"nope", "bad_json"),
        (b"[]", "wrong_type"),
        (b'{"message_id":"m1","status":"done"}', "bad_ack"),
        (b'{"status":"executed"}', "bad_ack"),
    ]:
        with pytest.raises(BadMessage) as raised:
            decode_ack("devices.N-1.ack", body)
        assert raised.value.reason == reason
    with pytest.raises(BadMessage):
        decode_ack("devices.N-1.data", b'{"message_id":"m1","status":"executed"}')
    nul = decode_ack(
        "devices.N-1.ack", b'{"message_id":"m1","status":"failed","detail":"a\\u0000"}'
    )
    assert nul.detail == "a\ufffd"  # storable text, and the ack still counts


def test_inference_rules_match_the_legacy_fixture() -> None:
    events: dict[str, str] = LEGACY.get("legacy_status_events_after_commands") or {
        "RELAY_CONTROL relay 3 true": "relay3_on"
    }
    commands = {
        "RELAY_CONTROL relay 3 true": {"action": "RELAY_CONTROL", "relay": 3, "state": True},
        "LIGHT_CONTROL true": {"action": "LIGHT_CONTROL", "state": True},
        "FAN_CONTROL false": {"action": "FAN_CONTROL", "state": False},
        "SERVO_ANGLE": {"action": "SERVO_ANGLE", "angle": 90},
        "REAL_MODEL_CONTROL true": {"action": "REAL_MODEL_CONTROL", "state": True},
        "REBOOT": {"action": "REBOOT"},
        "STATUS_REQUEST": {"action": "STATUS_REQUEST"},
    }
    for name, event in events.items():
        assert inferred_outcomes(commands[name]) == {event: "executed"}, name
    assert inferred_outcomes({"action": "RELAY_CONTROL", "relay": 3, "state": False}) == {
        "relay3_off": "executed"
    }
    assert inferred_outcomes({"action": "FIRMWARE_UPDATE", "url": "http://x"}) == {
        "update_failed": "failed"
    }
    assert inferred_outcomes({"action": "SMART_MODE", "enabled": True}) == {}
