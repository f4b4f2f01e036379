"""The fleet simulator's configuration."""

from __future__ import annotations

import pytest

from rnr_gateway import simulate
from rnr_gateway.simulate import FleetConfig


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
