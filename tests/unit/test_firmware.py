"""The firmware's command rules, run on CPython."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware" / "micropython" / "rnr_node.py"
spec = importlib.util.spec_from_file_location("rnr_node", FIRMWARE)
assert spec is not None and spec.loader is not None
rnr_node = importlib.util.module_from_spec(spec)
sys.modules["rnr_node"] = rnr_node
spec.loader.exec_module(rnr_node)

from rnr_gateway.codec import decode  # noqa: E402


def make(now: float | None = 1_800_000_000.0) -> tuple[Any, list[dict[str, Any]]]:
    done: list[dict[str, Any]] = []

    def fail(command: dict[str, Any]) -> None:
        raise RuntimeError("relay stuck")

    node = rnr_node.Node("MP-1", 4, lambda: now, {"PING": done.append, "BROKEN": fail})
    return node, done


def statuses(acks: list[str]) -> list[str]:
    return [json.loads(a)["status"] for a in acks]


def test_messages_are_enhanced_and_accepted_by_the_gateway() -> None:
    node, _ = make()
    first = decode("devices.MP-1.data", node.message({"temperature": 21.5}).encode())
    second = decode("devices.MP-1.data", node.message({"temperature": 21.6}).encode())
    assert (first.kind, first.boot, first.seq, first.ts) == ("reading", 4, 0, 1_800_000_000.0)
    assert second.seq == 1 and first.fw == rnr_node.FIRMWARE_VERSION
    no_ntp, _ = make(now=None)
    assert decode("devices.MP-1.data", no_ntp.message({"temperature": 1}).encode()).ts is None
    lwt = decode("devices.MP-1.status", node.will().encode())
    assert lwt.offline


def test_command_rules() -> None:
    node, done = make()
    ok = {"action": "PING", "message_id": "m1", "expires_at": 1_800_000_100}
    assert statuses(node.handle(json.dumps(ok))) == ["received", "executed"]
    assert statuses(node.handle(json.dumps(ok))) == ["duplicate"]
    assert len(done) == 1
    late = {"action": "PING", "message_id": "m2", "expires_at": 1_799_999_999}
    assert statuses(node.handle(json.dumps(late))) == ["expired"]
    assert len(done) == 1  # never executed past expires_at
    assert statuses(node.handle('{"action":"NOPE","message_id":"m3"}')) == ["rejected"]
    assert statuses(node.handle('{"action":"BROKEN","message_id":"m4"}')) == ["received", "failed"]
    assert node.handle("") == [] and node.handle("{}") == []  # a cleared retained copy
