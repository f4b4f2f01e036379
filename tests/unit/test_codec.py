"""Payload classification (PROTOCOL §3.1): every legacy form, the enhanced metadata and the
payloads that must become failed messages with a stable reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from rnr_gateway.codec import MAX_DEPTH, MAX_PAYLOAD_BYTES, classify, decode
from rnr_gateway.errors import BadMessage

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "legacy-payloads.json"
LEGACY: dict[str, Any] = json.loads(FIXTURES.read_text()) if FIXTURES.exists() else {}
needs_fixtures = pytest.mark.skipif(
    not LEGACY, reason=f"shared fixtures not found at {FIXTURES} (../shared beside the repo)"
)

# What each form of the shared fixture file is, by the rules of PROTOCOL §3.1.
FORM_KINDS = {
    "A_full_reading": "reading",
    "A_full_reading_truncated_v6": "reading",
    "B_minimal_reading": "reading",  # free_heap, but a temperature too
    "C_heartbeat": "heartbeat",
    "D_status_event": "event",
    "D_status_event_rebooting": "event",
    "E_test_ping": "ping",
    "F_temperature_only": "reading",
    "script_reading_iso": "reading",  # signal_strength, but a temperature too
    "script_status_json": "reading",  # test_mode is not test; nothing else matches
}
NODE = "AABBCCDDEEFF"
DATA = f"devices.{NODE}.data"
STATUS = f"devices.{NODE}.status"


def fixture_forms() -> list[str]:
    return sorted(LEGACY.get("forms", {}))


@needs_fixtures
def test_every_fixture_form_has_an_expected_kind() -> None:
    assert sorted(FORM_KINDS) == fixture_forms(), "a form was added to or removed from fixtures"


@needs_fixtures
@pytest.mark.parametrize("form", sorted(FORM_KINDS))
def test_legacy_form_is_classified_and_kept_whole(form: str) -> None:
    body = LEGACY["forms"][form]
    raw = orjson.dumps(body)
    decoded = decode(f"devices.{LEGACY['node_id']}.data", raw)
    assert decoded.kind == FORM_KINDS[form]
    assert decoded.node_id == LEGACY["node_id"] and decoded.channel == "data"
    assert decoded.data == body  # every field kept, unknown ones too, timestamp raw
    assert (decoded.boot, decoded.seq, decoded.ts, decoded.fw) == (None, None, None, None)
    assert classify(body) == FORM_KINDS[form]


@needs_fixtures
def test_fixture_topics_are_the_ones_the_node_id_gives() -> None:
    node = LEGACY["node_id"]
    assert LEGACY["data_topic"].replace("/", ".") == f"devices.{node}.data"
    assert LEGACY["status_topic"].replace("/", ".") == f"devices.{node}.status"


@needs_fixtures
def test_legacy_lwt_bare_string_is_an_offline_status() -> None:
    raw = LEGACY["status_topic_payloads"]["G_lwt_bare_string"].encode()
    decoded = decode(STATUS, raw)
    assert (decoded.kind, decoded.status, decoded.offline) == ("status", "offline", True)
    assert decoded.data == {"status": "offline"}


@needs_fixtures
def test_legacy_json_online_status() -> None:
    body = LEGACY["status_topic_payloads"]["json_online"]
    decoded = decode(STATUS, orjson.dumps(body))
    assert (decoded.kind, decoded.status, decoded.offline) == ("status", "online", False)
    assert decoded.data == body


# -- classification order -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"type": "heartbeat", "test": "ping", "temperature": 1}, "heartbeat"),
        ({"test": "ping", "free_heap": 1}, "ping"),
        ({"test": False}, "ping"),  # present, whatever its value
        ({"free_heap": 1}, "event"),
        ({"signal_strength": 60, "status": "light_on"}, "event"),
        ({"free_heap": 1, "temperature": 20}, "reading"),
        ({"type": "other"}, "reading"),
        ({}, "reading"),
        ({"humidity": 50}, "reading"),
    ],
)
def test_classification_order(body: dict[str, Any], kind: str) -> None:
    assert classify(body) == kind
    assert decode(DATA, orjson.dumps(body)).kind == kind


def test_anything_on_the_status_channel_is_a_status() -> None:
    body = {"status": "offline", "reason": "lwt", "temperature": 4}
    decoded = decode(STATUS, orjson.dumps(body))
    assert (decoded.kind, decoded.channel, decoded.offline) == ("status", "status", True)


@pytest.mark.parametrize("raw", [b"offline", b" offline\n", b"online", b"online\r\n"])
def test_bare_status_words(raw: bytes) -> None:
    decoded = decode(STATUS, raw)
    assert decoded.kind == "status"
    assert decoded.status == raw.strip().decode()
    assert decoded.offline is (raw.strip() == b"offline")


def test_bare_offline_on_the_data_topic_is_a_status_too() -> None:
    decoded = decode(DATA, b"offline")
    assert (decoded.kind, decoded.channel, decoded.offline) == ("status", "data", True)


@pytest.mark.parametrize("raw", [b"OFFLINE", b"off", b'"offline"'])
def test_other_bare_words_are_not_statuses(raw: bytes) -> None:
    with pytest.raises(BadMessage) as info:
        decode(STATUS, raw)
    assert info.value.reason in ("bad_json", "wrong_type")


# -- enhanced metadata --------------------------------------------------------------------
def test_enhanced_metadata_is_extracted_and_kept_in_the_data() -> None:
    body = {"temperature": 20.5, "boot": 3, "seq": 7, "ts": 1764280000.5, "fw": "1.2.0"}
    decoded = decode("devices.MP-0001.data", orjson.dumps(body))
    assert (decoded.boot, decoded.seq, decoded.ts, decoded.fw) == (3, 7, 1764280000.5, "1.2.0")
    assert decoded.data == body and decoded.kind == "reading"


def test_integer_ts_is_a_float_and_long_firmware_is_cut() -> None:
    decoded = decode(DATA, orjson.dumps({"ts": 1764280000, "fw": "x" * 100, "seq": 0, "boot": 0}))
    assert decoded.ts == 1764280000.0 and isinstance(decoded.ts, float)
    assert decoded.fw == "x" * 64
    assert (decoded.boot, decoded.seq) == (0, 0)


def test_metadata_limits_are_inclusive() -> None:
    decoded = decode(DATA, orjson.dumps({"boot": 2**31 - 1, "seq": 2**63 - 1}))
    assert (decoded.boot, decoded.seq) == (2**31 - 1, 2**63 - 1)


def test_null_metadata_is_absent_metadata() -> None:
    decoded = decode(DATA, b'{"boot": null, "seq": null, "ts": null, "fw": null}')
    assert (decoded.boot, decoded.seq, decoded.ts, decoded.fw) == (None, None, None, None)


@pytest.mark.parametrize(
    "body",
    [
        {"boot": "1", "seq": 1},
        {"boot": 1, "seq": "x"},
        {"boot": 1, "seq": -1},
        {"boot": -1, "seq": 1},
        {"boot": 1, "seq": 1.5},
        {"boot": True, "seq": 1},
        {"boot": 1, "seq": False},
        {"boot": 2**31, "seq": 1},  # does not fit the INTEGER column
        {"boot": 1, "seq": 2**63},  # does not fit the BIGINT column
        {"boot": 1, "seq": [1]},
        {"ts": "12:00:01"},
        {"ts": True},
        {"ts": {"s": 1}},
        {"fw": 1.2},
        {"fw": ["1", "2"]},
    ],
)
def test_wrong_metadata_types_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, orjson.dumps(body))
    assert info.value.reason == "wrong_type"


def test_legacy_timestamps_of_any_type_are_kept_raw() -> None:
    for stamp in ("14:30:25", "unknown", 8123456, "2026-11-27T14:30:25Z", None, 1.5):
        decoded = decode(DATA, orjson.dumps({"temperature": 1, "timestamp": stamp}))
        assert decoded.data["timestamp"] == stamp
        assert decoded.ts is None


# -- node ids -----------------------------------------------------------------------------
def test_body_node_id_that_agrees_with_the_topic_is_fine() -> None:
    assert decode(DATA, orjson.dumps({"node_id": NODE, "temperature": 1})).node_id == NODE


@pytest.mark.parametrize("body_id", ["OTHER", NODE.lower(), "", 123, ["x"], f"{NODE} "])
def test_body_node_id_that_disagrees_is_refused(body_id: object) -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, orjson.dumps({"node_id": body_id, "temperature": 1}))
    assert info.value.reason == "node_id_mismatch"
    assert len(str(info.value)) < 300


def test_a_huge_mismatching_node_id_is_cut_in_the_detail() -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, orjson.dumps({"node_id": "Z" * 10_000}))
    assert info.value.reason == "node_id_mismatch"
    assert len(info.value.detail) < 200


@pytest.mark.parametrize(
    ("routing_key", "reason"),
    [
        ("devices.bad node.data", "bad_node_id"),
        ("devices.-x.data", "bad_node_id"),
        ("devices..data", "bad_node_id"),
        ("devices.N1.commands", "bad_topic"),
        ("sensors.N1.data", "bad_topic"),
        ("devices.N1.ack", "unexpected_channel"),
    ],
)
def test_bad_topics_are_refused_before_the_body_is_read(routing_key: str, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        decode(routing_key, b"{not json")
    assert info.value.reason == reason


# -- payloads that can never be stored ----------------------------------------------------
def test_oversize_is_refused_and_the_limit_is_inclusive() -> None:
    pad = MAX_PAYLOAD_BYTES - len(b'{"p":""}')
    exact = b'{"p":"' + b"x" * pad + b'"}'
    assert len(exact) == MAX_PAYLOAD_BYTES
    assert decode(DATA, exact).data["p"] == "x" * pad
    with pytest.raises(BadMessage) as info:
        decode(DATA, exact + b" ")
    assert info.value.reason == "oversize"
    assert str(MAX_PAYLOAD_BYTES) in info.value.detail


def test_oversize_is_checked_before_parsing() -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, b"{" * (MAX_PAYLOAD_BYTES + 1))
    assert info.value.reason == "oversize"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b'{"temperature": 1',
        b'{"temperature": NaN}',
        b'{"temperature": 1e400}',  # infinity: not representable in JSON or jsonb
        b"\xef\xbb\xbf{}",  # byte order mark
        b'{"t": "\xff\xfe"}',  # not UTF-8
        b'{"t": "\\ud800"}',  # a lone surrogate
        b'{"t": "a\x00b"}',  # a raw NUL byte inside a string
    ],
)
def test_bad_json_is_refused(raw: bytes) -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, raw)
    assert info.value.reason == "bad_json"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"temperature": "\\u0000"}',
        b'{"\\u0000": 1}',
        b'{"a": [{"b": "x\\u0000y"}]}',
        b'{"p": "\\\\\\u0000"}',  # an escaped backslash, then a real NUL
    ],
)
def test_nul_characters_are_refused(raw: bytes) -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, raw)
    assert (info.value.reason, "\\u0000" in info.value.detail) == ("bad_json", True)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    decoded = decode(DATA, b'{"path": "C:\\\\u0000"}')
    assert decoded.data == {"path": "C:\\u0000"}


@pytest.mark.parametrize(
    ("raw", "what"),
    [(b"[1, 2, 3]", "list"), (b'"reading"', "str"), (b"42", "int"), (b"null", "NoneType")],
)
def test_json_that_is_not_an_object_is_refused(raw: bytes, what: str) -> None:
    with pytest.raises(BadMessage) as info:
        decode(DATA, raw)
    assert info.value.reason == "wrong_type"
    assert what in info.value.detail


def nested(levels: int) -> bytes:
    """An object whose deepest container is ``levels`` deep (the object itself is 1)."""
    inner = levels - 1
    return b'{"x": ' + b"[" * inner + b"]" * inner + b"}"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert decode(DATA, nested(MAX_DEPTH)).kind == "reading"
    wide = {f"k{i}": [{"a": [1]}] for i in range(100)}  # many brackets, shallow
    assert decode(DATA, orjson.dumps(wide)).data == wide


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 254, 300, 1000])
def test_nesting_too_deep_to_store_is_refused(levels: int) -> None:
    raw = nested(levels)
    with pytest.raises(BadMessage) as info:
        decode(DATA, raw)
    assert info.value.reason == "wrong_type"


def test_big_integers_in_readings_survive_a_round_trip() -> None:
    # what decode accepts must encode again for the insert
    raw = b'{"a": 18446744073709551615, "b": 99999999999999999999999, "c": -1e308}'
    assert orjson.loads(orjson.dumps(decode(DATA, raw).data)) == orjson.loads(raw)
