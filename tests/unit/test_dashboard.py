"""The dashboard page: its script is valid JavaScript, and every command its form offers,
with the parameters it fills in, is one the API accepts and a simulated node carries out."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import orjson
import pytest

from rnr_gateway.command_codec import ACTIONS, validate
from rnr_gateway.simulate_board import Outputs

PAGE = resources.files("rnr_gateway") / "web" / "static" / "index.html"


def script() -> str:
    [code] = re.findall(r"<script>(.*?)</script>", PAGE.read_text(), re.S)
    return code


def offered() -> dict[str, dict[str, object]]:
    """The form's ACTIONS table (a JavaScript object literal), as Python."""
    found = re.search(r"const ACTIONS = \{(.*?)\n\};", script(), re.S)
    assert found is not None
    pairs = re.findall(r"(\w+): (\{[^}]*\})", found[1])
    quoted = {name: re.sub(r"([{,]\s*)(\w+):", r'\1"\2":', body) for name, body in pairs}
    return {name: orjson.loads(body) for name, body in quoted.items()}


def test_the_script_parses(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    path = tmp_path / "dashboard.js"
    path.write_text(script())
    checked = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_every_action_offered_is_valid_and_carried_out_as_filled_in() -> None:
    actions = offered()
    assert set(actions) == set(ACTIONS)  # every action of PROTOCOL §4.1, no other
    act = Outputs().actuators()
    for name, params in actions.items():
        body = {"action": name, **params}
        assert validate(body) == name
        if name in act and name != "FIRMWARE_UPDATE":  # a simulated node cannot fetch
            act[name](body)
