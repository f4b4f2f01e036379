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
    _fresh,
    _message_columns,
    _node_columns,
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
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in got] == [
        ("MP-1", T0, "reading", 1.5, 3, 7),
        ("AABBCCDDEEFF", T0 + timedelta(seconds=1), "heartbeat", None, None, None),
        ("AABBCCDDEEFF", T0, "status", None, None, None),
    ]
    assert [orjson.loads(r[1]) for r in got] == [
        {"temperature": 20.5, "boot": 3, "seq": 7, "ts": 1.5, "fw": "1.2"},
        {"type": "heartbeat"},
        {"status": "offline"},
    ]
    assert all(isinstance(r[1], str) for r in got)  # cast to jsonb from text


def test_message_columns_of_nothing() -> None:
    assert _message_columns([]) == [[], [], [], [], [], [], []]


# -- nodes --------------------------------------------------------------------------------
def test_node_columns_aggregate_one_row_per_node_in_sorted_order() -> None:
    batch = [
        accepted("ZZ-9", {"temperature": 1}),
        accepted("AABBCCDDEEFF", {"temperature": 1}),
        accepted("MP-1", {"temperature": 1, "boot": 1, "seq": 1, "fw": "1.0"}),
        accepted("AABBCCDDEEFF", {"type": "heartbeat"}, T0 + timedelta(seconds=2)),
        accepted("MP-1", {"temperature": 2, "boot": 2, "seq": 1}, T0 + timedelta(seconds=1)),
        accepted("AABBCCDDEEFF", {"test": "ping"}, T0 + timedelta(seconds=1)),
    ]
    assert rows(_node_columns(batch)) == [
        # node, mac, last seen, count, status, firmware, last boot
        ("AABBCCDDEEFF", "AA:BB:CC:DD:EE:FF", T0 + timedelta(seconds=2), 3, "online", None, None),
        ("MP-1", None, T0 + timedelta(seconds=1), 2, "online", "1.0", 2),
        ("ZZ-9", None, T0, 1, "online", None, None),
    ]


def test_node_status_follows_the_latest_message() -> None:
    lwt_last = [
        accepted("N1", {"temperature": 1}),
        accepted("N1", b"offline", T0 + timedelta(seconds=1), ch="status"),
    ]
    assert rows(_node_columns(lwt_last))[0][2:5] == (T0 + timedelta(seconds=1), 2, "offline")
    back_online = [
        accepted("N1", b"offline", T0, ch="status"),
        accepted("N1", {"temperature": 1}, T0 + timedelta(seconds=1)),
    ]
    assert rows(_node_columns(back_online))[0][4] == "online"
    older_lwt = [
        accepted("N1", {"temperature": 1}, T0 + timedelta(seconds=5)),
        accepted("N1", {"status": "offline", "reason": "lwt"}, T0, ch="status"),
    ]
    assert rows(_node_columns(older_lwt))[0][2:5] == (T0 + timedelta(seconds=5), 2, "online")


def test_same_time_later_message_wins() -> None:
    batch = [accepted("N1", {"temperature": 1}), accepted("N1", b"offline", ch="status")]
    assert rows(_node_columns(batch))[0][4] == "offline"


def test_firmware_and_boot_keep_the_last_known_value() -> None:
    batch = [
        accepted("N1", {"boot": 4, "seq": 1, "fw": "2.0"}),
        accepted("N1", {"temperature": 1}),  # a message without metadata keeps them
    ]
    assert rows(_node_columns(batch))[0][5:] == ("2.0", 4)


# -- what the insert really added ---------------------------------------------------------
def keyed(node: str, boot: int, seq: int) -> Accepted:
    return accepted(node, {"temperature": 1, "boot": boot, "seq": seq})


def test_fresh_rows_are_the_unkeyed_and_the_first_of_each_inserted_key() -> None:
    a, a_again, b, c = keyed("N1", 1, 1), keyed("N1", 1, 1), keyed("N1", 1, 2), keyed("N2", 1, 1)
    legacy = accepted("AABBCCDDEEFF", {"temperature": 3})
    batch = [a, legacy, a_again, b, c, legacy]
    # the database inserted N1/1/1 (once) and N2/1/1; N1/1/2 was there already
    got = _fresh(batch, {("N1", 1, 1), ("N2", 1, 1)})
    assert [id(r) for r in got] == [id(a), id(legacy), id(c), id(legacy)]


def test_fresh_does_not_consume_its_argument() -> None:
    inserted = {("N1", 1, 1)}
    assert len(_fresh([keyed("N1", 1, 1)], inserted)) == 1
    assert inserted == {("N1", 1, 1)}


def test_a_batch_of_redeliveries_touches_no_node() -> None:
    batch = [keyed("N1", 1, s) for s in range(5)]
    assert _fresh(batch, set()) == []
    assert _node_columns([]) == [[], [], [], [], [], [], []]


def test_node_counts_count_messages_not_deliveries() -> None:
    batch = [keyed("N1", 1, 1), keyed("N1", 1, 1), keyed("N1", 1, 2)]
    fresh = _fresh(batch, {("N1", 1, 1), ("N1", 1, 2)})
    assert rows(_node_columns(fresh))[0][3] == 2


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
