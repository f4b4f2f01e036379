"""Node ids, routing keys and topics (PROTOCOL §1, §3)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from rnr_gateway.errors import BadMessage
from rnr_gateway.topics import (
    ack_topic,
    command_topic,
    data_topic,
    mac_address,
    parse_routing_key,
    status_topic,
    valid_node_id,
)


@pytest.mark.parametrize(
    "node_id",
    ["A", "0", "AABBCCDDEEFF", "SIM-0001", "node_1", "a-b_c-9", "N" + "x" * 63, "9_", "Z-"],
)
def test_valid_node_ids(node_id: str) -> None:
    assert valid_node_id(node_id)


@pytest.mark.parametrize(
    "node_id",
    [
        "",
        "-lead",
        "_lead",
        "N" + "x" * 64,  # 65 characters
        "has space",
        "dot.ted",
        "sla/sh",
        "plus+",
        "hash#",
        "star*",
        "quote'",
        "semi;colon",
        "ünïcode",
        "AABB\n",
        "\nAABB",
        "AABB\x00",
        "%2e",
    ],
)
def test_invalid_node_ids(node_id: str) -> None:
    assert not valid_node_id(node_id)


@pytest.mark.parametrize("channel", ["data", "status", "ack"])
def test_routing_key_gives_node_and_channel(channel: str) -> None:
    assert parse_routing_key(f"devices.SIM-0001.{channel}") == ("SIM-0001", channel)


@pytest.mark.parametrize(
    "routing_key",
    [
        "",
        "devices",
        "devices.N1",
        "devices.N1.data.extra",
        "devices.N1.commands",
        "devices.N1.Data",
        "device.N1.data",
        "x.devices.N1.data",
        "devices.N1.",
    ],
)
def test_routing_keys_outside_the_scheme_are_bad_topics(routing_key: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_routing_key(routing_key)
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize("node_id", ["", "bad node", "-x", "x" * 65, "a*b", "a#b"])
def test_bad_node_id_in_a_routing_key(node_id: str) -> None:
    with pytest.raises(BadMessage) as info:
        parse_routing_key(f"devices.{node_id}.data")
    assert info.value.reason == "bad_node_id"


def test_details_of_huge_routing_keys_are_bounded() -> None:
    for key in ("devices." + "x" * 10_000 + ".data", "q" * 10_000):
        with pytest.raises(BadMessage) as info:
            parse_routing_key(key)
        assert len(info.value.detail) < 300


@pytest.mark.parametrize(
    ("node_id", "mac"),
    [
        ("AABBCCDDEEFF", "AA:BB:CC:DD:EE:FF"),
        ("0123456789AB", "01:23:45:67:89:AB"),
        ("aabbccddeeff", None),  # legacy nodes use upper case
        ("AABBCCDDEEF", None),
        ("AABBCCDDEEFF0", None),
        ("AABBCCDDEEFG", None),
        ("SIM-0001", None),
        ("AA:BB:CC:DD:EE:FF", None),
    ],
)
def test_mac_address_of_legacy_node_ids(node_id: str, mac: str | None) -> None:
    assert mac_address(node_id) == mac


def test_topics() -> None:
    assert data_topic("N1") == "devices/N1/data"
    assert status_topic("N1") == "devices/N1/status"
    assert command_topic("N1") == "devices/N1/commands"
    assert ack_topic("N1") == "devices/N1/ack"


@pytest.mark.parametrize("topic", [data_topic, status_topic, ack_topic])
def test_topics_a_node_publishes_on_parse_back(topic: Callable[[str], str]) -> None:
    routing_key = topic("AABBCCDDEEFF").replace("/", ".")  # what the MQTT plugin does
    node_id, channel = parse_routing_key(routing_key)
    assert node_id == "AABBCCDDEEFF" and routing_key.endswith(channel)
