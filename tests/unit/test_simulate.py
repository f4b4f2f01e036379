"""The fleet simulator: its configuration, and what its boards do with commands."""

from __future__ import annotations

import random
import re

import orjson
import pytest

from rnr_gateway import simulate
from rnr_gateway.command_codec import inferred_outcomes
from rnr_gateway.simulate import FleetConfig
from rnr_gateway.simulate_board import (
    LegacyAnswer,
    Outputs,
    legacy_answer,
    reading,
    status_event,
)


def test_each_run_is_a_new_boot_so_its_readings_are_not_taken_for_duplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(simulate.time, "time", lambda: 1_790_000_000.0)
    first = FleetConfig(host="127.0.0.1", port=1884)
    monkeypatch.setattr(simulate.time, "time", lambda: 1_790_000_042.0)
    second = FleetConfig(host="127.0.0.1", port=1884)
    assert second.boot - first.boot == 42
    assert 0 < first.boot < 2**31  # the boot column is an int4
    assert FleetConfig(host="127.0.0.1", port=1884, boot=7).boot == 7


# -- what a simulated board does with commands ------------------------------------------
def test_outputs_follow_commands_and_bad_parameters_are_refused() -> None:
    outputs = Outputs()
    act = outputs.actuators()
    act["RELAY_CONTROL"]({"relay": 3, "state": True})
    act["LIGHT_CONTROL"]({"state": True})
    act["SERVO_ANGLE"]({"angle": 135})
    act["SET_INTERVAL"]({"seconds": 30})
    act["SET_LIGHT_SCHEDULE"]({"on_hour": 6, "off_hour": 22})
    assert outputs.relays[3] and outputs.light and outputs.servo_angle == 135
    assert outputs.interval_s == 30.0 and outputs.light_schedule == (6, 22)
    for action, params, message in [
        ("RELAY_CONTROL", {"relay": 9, "state": True}, "relay must be a whole number from 1 to 5"),
        ("RELAY_CONTROL", {"relay": 2, "state": "on"}, "state must be true or false"),
        ("SERVO_ANGLE", {"angle": True}, "angle must be a number from 0 to 180"),
        ("SET_INTERVAL", {"seconds": 0}, "seconds must be a number from 1 to 86400"),
        ("SET_LIGHT_SCHEDULE", {"on_hour": 6.5, "off_hour": 1}, "on_hour must be a whole"),
    ]:
        with pytest.raises(ValueError, match=message):
            act[action](params)
    with pytest.raises(RuntimeError, match=re.escape("cannot fetch http://x/fw.bin")):
        act["FIRMWARE_UPDATE"]({"url": "http://x/fw.bin"})
    assert not outputs.relays[2]  # a refused command changes nothing

    rng = random.Random(1)
    body = reading("N1", rng, outputs)
    assert (body["servo_angle"], body["light_state"], body["fan_state"]) == (135, True, False)
    assert status_event("N1", outputs.status_event(1), rng)["status"] == "relay3_on"
    assert outputs.status_event(0) == "light_on"


def test_a_legacy_board_reports_what_it_did_in_the_status_event_the_gateway_infers_from() -> None:
    outputs = Outputs()

    def answer(command: dict[str, object]) -> LegacyAnswer:
        return legacy_answer(outputs, orjson.dumps(command))

    relay = {"action": "RELAY_CONTROL", "relay": 3, "state": True, "message_id": "m1"}
    assert answer(relay) == LegacyAnswer("relay3_on")
    assert inferred_outcomes(relay) == {"relay3_on": "executed"}
    assert answer({"action": "FAN_CONTROL", "state": False}) == LegacyAnswer("fan_off")
    update = {"action": "FIRMWARE_UPDATE", "url": "http://x/fw.bin"}
    assert answer(update) == LegacyAnswer("update_failed")  # a simulated board cannot fetch it
    assert answer({"action": "RELAY_CONTROL", "relay": 7, "state": True}) == LegacyAnswer(None)
    assert answer({"action": "SET_INTERVAL", "seconds": 5}) == LegacyAnswer(None)  # new firmware
    assert outputs.interval_s is None
    assert answer({"action": "REBOOT"}) == LegacyAnswer("rebooting", reboot=True)
    assert legacy_answer(outputs, b"") == LegacyAnswer(None)  # a retained copy cleared
    assert legacy_answer(outputs, b"[1]") == LegacyAnswer(None)
