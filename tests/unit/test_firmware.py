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


class Board:
    """One node's surroundings: a flash file, the acks published, the actions and resets."""

    def __init__(self, path: Path, now: float | None = 1_800_000_000.0) -> None:
        self.path = str(path / "seen.json")
        self.now = now
        self.events: list[tuple[str, str]] = []  # ("ack", status) | ("run", action) | ("reset", "")

    def boot(self) -> Any:
        def fail(command: dict[str, Any]) -> None:
            self.events.append(("run", command["action"]))
            raise RuntimeError("relay stuck")

        def publish(ack: str) -> None:
            self.events.append(("ack", json.loads(ack)["status"]))

        return rnr_node.Node(
            "MP-1",
            1,
            lambda: self.now,
            {"PING": lambda c: self.events.append(("run", c["action"])), "BROKEN": fail},
            storage=rnr_node.SeenStore(self.path),
            publish=publish,
            reset=lambda: self.events.append(("reset", "")),
        )

    def stored(self) -> list[str]:
        with open(self.path) as f:
            ids: list[str] = json.load(f)
        return ids


def command(message_id: str, action: str = "PING", **extra: Any) -> str:
    return json.dumps({"action": action, "message_id": message_id, **extra})


def test_seen_ids_survive_a_reboot(tmp_path: Path) -> None:
    board = Board(tmp_path)
    assert statuses(board.boot().handle(command("m1"))) == ["received", "executed"]
    rebooted = board.boot()  # a new Node on the same flash
    assert statuses(rebooted.handle(command("m1"))) == ["duplicate"]
    assert board.events.count(("run", "PING")) == 1


def test_reboot_is_acked_before_the_reset_and_not_repeated(tmp_path: Path) -> None:
    board = Board(tmp_path)
    node = board.boot()
    acks = node.handle(command("r1", "REBOOT"))
    assert [json.loads(a)["detail"] for a in acks] == ["", "rebooting"]
    # inside the MQTT callback nothing resets: the PUBACK must go out first
    assert board.events == [("ack", "received"), ("ack", "executed")]
    assert board.stored() == ["r1"]  # in flash before the reset
    node.run_pending()
    node.run_pending()
    assert board.events[2:] == [("reset", "")]
    # after the boot the broker redelivers it (and the retained copy arrives again)
    node = board.boot()
    assert statuses(node.handle(command("r1", "REBOOT"))) == ["duplicate"]
    assert statuses(node.handle(command("r1", "REBOOT"))) == ["duplicate"]
    node.run_pending()
    assert board.events.count(("reset", "")) == 1


def test_reboot_is_refused_when_its_id_cannot_be_stored(tmp_path: Path) -> None:
    board = Board(tmp_path / "missing-dir")  # every save fails
    node = board.boot()
    assert statuses(node.handle(command("r1", "REBOOT"))) == ["received", "failed"]
    node.run_pending()
    assert ("reset", "") not in board.events


def test_expires_at_without_a_clock_is_rejected(tmp_path: Path) -> None:
    board = Board(tmp_path, now=None)
    node = board.boot()
    acks = node.handle(command("m1", expires_at=1_800_000_300))
    assert statuses(acks) == ["rejected"]
    assert "clock not set" in json.loads(acks[0])["detail"]
    assert ("run", "PING") not in board.events
    assert statuses(node.handle(command("m2"))) == ["received", "executed"]
    assert board.events.count(("run", "PING")) == 1
    # refused for good: a later copy, once the clock is set, is not run either
    board.now = 1_800_000_000.0
    assert statuses(node.handle(command("m1", expires_at=1_800_000_300))) == ["duplicate"]
    assert statuses(node.handle(command("m3", expires_at="soon"))) == ["rejected"]


def test_received_is_published_before_the_action_runs(tmp_path: Path) -> None:
    board = Board(tmp_path)
    node = board.boot()
    node.handle(command("m1"))
    assert board.events == [("ack", "received"), ("run", "PING"), ("ack", "executed")]
    board.events.clear()
    node.handle(command("m2", "BROKEN"))
    assert board.events == [("ack", "received"), ("run", "BROKEN"), ("ack", "failed")]


def test_persisted_ids_are_bounded(tmp_path: Path) -> None:
    board = Board(tmp_path)
    node = board.boot()
    ids = [f"m{n}" for n in range(rnr_node.SEEN_IDS + 5)]
    for message_id in ids:
        node.handle(command(message_id))
    assert board.stored() == ids[-rnr_node.SEEN_IDS :]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seen.json"]  # no temp file left
    node = board.boot()
    assert statuses(node.handle(command(ids[-1]))) == ["duplicate"]
    assert statuses(node.handle(command(ids[0]))) == ["received", "executed"]  # forgotten


def test_seen_store_survives_a_bad_or_interrupted_write(tmp_path: Path) -> None:
    path = str(tmp_path / "seen.json")
    store = rnr_node.SeenStore(path)
    assert store.load() == []
    with open(path, "w") as f:
        f.write('["m1", "m2"')  # torn write
    assert store.load() == []
    store.save(["m1", "m2"])
    Path(path).rename(path + ".tmp")  # FAT: the old file removed, the rename cut short
    assert store.load() == ["m1", "m2"]


def test_ntp_is_retried_until_it_answers_then_resynced_hourly() -> None:
    assert rnr_node.ntp_interval_s(False) == 60
    assert rnr_node.ntp_interval_s(True) == 3600
