"""The column builders behind the set-based batch writes (no database here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from rnr_gateway.codec import decode
from rnr_gateway.store import (
    MAX_FAILED_BODY,
    Accepted,
    Failed,
    _failed_columns,
    _message_columns,
    _unique,
    fingerprint,
)

T0 = datetime(2026, 11, 27, 14, 30, tzinfo=UTC)


def accepted(
    node: str, body: dict[str, Any] | bytes, at: datetime = T0, ch: str = "data"
) -> Accepted:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Accepted(decode(f"devices.{node}.{ch}", raw), at)


def failed(
    body: bytes, *, source: str = "sensor_data_enhanced", key: str = "devices.X.data"
) -> Failed:
    return Failed(source, key, {"x-mqtt-publish-qos": 1}, body, "bad_json", "not JSON")


def rows(cols: list[list[Any]]) -> list[tuple[Any, ...]]:
    assert len({len(c) for c in cols}) == 1, "columns of different lengths"
    return list(zip(*cols, strict=True))


# -- sensor_data --------------------------------------------------------------------------
def test_message_columns() -> None:
    batch = [
        accepted("MP-1", {"temperature": 20.5, "boot": 3, "seq": 7, "ts": 1.5, "fw": "1.2"}),
        accepted("AABBCCDDEEFF", {"type": "heartbeat"}, T0 + timedelta(seconds=1)),
        accepted("AABBCCDDEEFF", b"offline", ch="status"),
    ]
    got = rows(_message_columns(batch))
    assert [(r[0], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in got] == [
        ("MP-1", T0, "reading", 1.5, 3, 7, "online", "1.2", None),
        (
            "AABBCCDDEEFF",
            T0 + timedelta(seconds=1),
            "heartbeat",
            None,
            None,
            None,
            "online",
            None,
            "AA:BB:CC:DD:EE:FF",
        ),
        ("AABBCCDDEEFF", T0, "status", None, None, None, "offline", None, "AA:BB:CC:DD:EE:FF"),
    ]
    assert [orjson.loads(r[1]) for r in got] == [
        {"temperature": 20.5, "boot": 3, "seq": 7, "ts": 1.5, "fw": "1.2"},
        {"type": "heartbeat"},
        {"status": "offline"},
    ]
    assert all(isinstance(r[1], str) for r in got)  # cast to jsonb from text
    # the body goes in as it came, byte for byte
    raw = b'{"temperature":  20.5,"unit":"\\u00b0C"}'
    assert rows(_message_columns([accepted("N1", raw)]))[0][1] == raw.decode()


def test_message_columns_of_nothing() -> None:
    assert _message_columns([]) == [[] for _ in range(11)]


# -- in-batch repeats ---------------------------------------------------------------------
def keyed(node: str, boot: int, seq: int) -> Accepted:
    return accepted(node, {"temperature": 1, "boot": boot, "seq": seq})


def test_unique_drops_repeats_of_a_key_and_keeps_unkeyed_rows() -> None:
    a, a_again, b, c = keyed("N1", 1, 1), keyed("N1", 1, 1), keyed("N1", 1, 2), keyed("N2", 1, 1)
    legacy = accepted("AABBCCDDEEFF", {"temperature": 3})
    got = _unique([a, legacy, a_again, b, c, legacy])
    assert [id(r) for r in got] == [id(a), id(legacy), id(b), id(c), id(legacy)]
    plain = [a, b, c]
    assert _unique(plain) is plain


# -- failed messages ----------------------------------------------------------------------
def test_fingerprint_depends_on_source_key_and_body() -> None:
    base = fingerprint("q", "devices.X.data", b"{")
    assert base == fingerprint("q", "devices.X.data", b"{")
    assert len(base) == 32
    others = {
        fingerprint("dlx", "devices.X.data", b"{"),
        fingerprint("q", "devices.Y.data", b"{"),
        fingerprint("q", "devices.X.data", b"{ "),
        fingerprint("q", "devices.X.data\0{", b""),  # the separator cannot be forged
    }
    assert base not in others and len(others) == 4


def test_failed_duplicates_in_one_batch_are_one_row_with_their_count() -> None:
    batch = [
        failed(b"{bad"),
        failed(b"[1]"),
        failed(b"{bad"),
        failed(b"{bad", key="devices.Y.data"),
        failed(b"{bad"),
    ]
    got = rows(_failed_columns(batch))
    assert [(r[2], r[4], r[8]) for r in got] == [
        ("devices.X.data", b"{bad", 3),
        ("devices.X.data", b"[1]", 1),
        ("devices.Y.data", b"{bad", 1),
    ]
    assert len({r[0] for r in got}) == 3


def test_failed_columns_bound_the_body_and_detail_and_encode_headers() -> None:
    big = b"x" * (MAX_FAILED_BODY + 1)
    row = Failed(
        "amq.topic",
        "devices.N1.data",
        {"x-death": [{"time": T0, "count": 1}], "raw": b"\x01"},
        big,
        "oversize",
        "d" * 5000,
    )
    ((fp, source, key, headers, body, truncated, reason, detail, count),) = rows(
        _failed_columns([row])
    )
    assert fp == fingerprint("amq.topic", "devices.N1.data", big)  # of the whole body
    assert (source, key, reason, count) == ("amq.topic", "devices.N1.data", "oversize", 1)
    assert (len(body), truncated, len(detail)) == (MAX_FAILED_BODY, True, 1000)
    decoded = orjson.loads(headers)
    assert decoded["x-death"][0]["count"] == 1 and isinstance(decoded["raw"], str)
    exact = rows(_failed_columns([failed(b"y" * MAX_FAILED_BODY)]))[0]
    assert (len(exact[4]), exact[5]) == (MAX_FAILED_BODY, False)
