# Types of firmware_node.py, the MicroPython firmware's node logic
# (firmware/micropython/rnr_node.py, linked here so the fleet simulator runs the same
# command rules as the boards). That file stays free of annotations so MicroPython reads it;
# `make check-types` holds this stub to it (mypy.stubtest).

from collections.abc import Callable
from typing import Any, Protocol

FIRMWARE_VERSION: str
SEEN_IDS: int
NTP_RETRY_S: int
NTP_RESYNC_S: int

_Actuator = Callable[[dict[str, Any]], object]

def ntp_interval_s(synced: bool) -> int: ...

class _Storage(Protocol):
    def load(self) -> list[str]: ...
    def save(self, ids: list[str]) -> None: ...

class SeenStore:
    path: str
    tmp: str
    def __init__(self, path: str) -> None: ...
    def load(self) -> list[str]: ...
    def save(self, ids: list[str]) -> None: ...

class Node:
    node_id: str
    boot: int
    seq: int
    reset_due: bool
    seen: list[str]
    def __init__(
        self,
        node_id: str,
        boot: int,
        clock: Callable[[], float | None],
        actuators: dict[str, _Actuator],
        storage: _Storage | None = None,
        publish: Callable[[str], object] | None = None,
        reset: Callable[[], object] | None = None,
    ) -> None: ...
    def topic(self, channel: str) -> str: ...
    def message(self, fields: dict[str, Any]) -> str: ...
    def online(self) -> str: ...
    def will(self, reason: str = "lwt") -> str: ...
    def handle(self, raw: bytes | str) -> list[str]: ...
    def run_pending(self) -> None: ...
