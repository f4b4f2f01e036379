"""The broker definitions (PROTOCOL §2) loaded at broker boot and declared by the gateway."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from rnr_gateway import cli, topology

VHOST = "rnr_iot_vhost"


@pytest.fixture
def defs() -> dict[str, Any]:
    return topology.definitions(VHOST)


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def test_sections_and_vhost(defs: dict[str, Any]) -> None:
    assert set(defs) == {"vhosts", "exchanges", "queues", "policies", "bindings"}
    assert defs["vhosts"] == [{"name": VHOST}]
    for section in ("exchanges", "queues", "policies", "bindings"):
        assert defs[section], section
        assert {item["vhost"] for item in defs[section]} == {VHOST}, section


def test_exchanges(defs: dict[str, Any]) -> None:
    exchanges = by_name(defs["exchanges"])
    assert {"iot_data", "device_management", "dlx"} <= set(exchanges)
    assert "amq.topic" not in exchanges  # built in; the broker refuses to declare amq.*
    for ex in exchanges.values():
        assert (ex["type"], ex["durable"], ex["auto_delete"], ex["internal"]) == (
            "topic",
            True,
            False,
            False,
        )


def test_queues_and_their_arguments(defs: dict[str, Any]) -> None:
    queues = by_name(defs["queues"])
    assert queues["sensor_data_enhanced"]["arguments"] == {
        "x-message-ttl": 3_600_000,
        "x-max-length": 50_000,
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "sensor_data.failed",
    }
    assert queues["device_commands_enhanced"]["arguments"] == {
        "x-max-priority": 10,
        "x-message-ttl": 300_000,
        "x-dead-letter-exchange": "dlx",
        "x-dead-letter-routing-key": "commands.expired",
    }
    assert queues["device_status_enhanced"]["arguments"] == {"x-message-ttl": 60_000}
    assert queues["device_acks"]["arguments"] == {"x-dead-letter-exchange": "dlx"}
    assert queues["failed_messages"]["arguments"] == {}
    for q in queues.values():
        assert (q["durable"], q["auto_delete"]) == (True, False), q["name"]


def test_bindings(defs: dict[str, Any]) -> None:
    got = {(b["source"], b["routing_key"], b["destination"]) for b in defs["bindings"]}
    assert {
        ("amq.topic", "devices.*.data", "sensor_data_enhanced"),
        ("iot_data", "devices.*.data", "sensor_data_enhanced"),
        ("device_management", "commands.*", "device_commands_enhanced"),
        ("amq.topic", "devices.*.status", "device_status_enhanced"),
        ("device_management", "status.*", "device_status_enhanced"),
        ("amq.topic", "devices.*.ack", "device_acks"),
        ("dlx", "#", "failed_messages"),
    } <= got
    names = {q["name"] for q in defs["queues"]}
    exchanges = {e["name"] for e in defs["exchanges"]} | {"amq.topic"}
    for b in defs["bindings"]:
        assert b["destination_type"] == "queue" and b["destination"] in names, b
        assert b["source"] in exchanges, b
        assert b["arguments"] == {}
    assert len(got) == len(defs["bindings"]), "a binding is listed twice"


def test_every_dead_letter_exchange_exists_and_reaches_failed_messages(
    defs: dict[str, Any],
) -> None:
    exchanges = {e["name"] for e in defs["exchanges"]}
    to_failed = {
        b["source"]
        for b in defs["bindings"]
        if b["destination"] == "failed_messages" and b["routing_key"] == "#"
    }
    for q in defs["queues"]:
        dlx = q["arguments"].get("x-dead-letter-exchange")
        if dlx is not None:
            assert dlx in exchanges and dlx in to_failed, q["name"]


def test_unrouted_device_messages_are_caught(defs: dict[str, Any]) -> None:
    (policy,) = [p for p in defs["policies"] if p["apply-to"] == "exchanges"]
    assert policy["pattern"] == r"^amq\.topic$"
    alternate = policy["definition"]["alternate-exchange"]
    assert alternate in {e["name"] for e in defs["exchanges"]}
    caught = {b["routing_key"] for b in defs["bindings"] if b["source"] == alternate}
    assert {"devices.#.data", "devices.#.status", "devices.#.ack"} <= caught


def test_definitions_are_a_fresh_copy_each_time() -> None:
    first = topology.definitions("a")
    first["queues"][0]["arguments"]["x-max-length"] = 1
    assert topology.QUEUES[0].arguments.get("x-max-length") != 1
    assert topology.definitions("b")["queues"][0]["vhost"] == "b"


def test_cli_prints_the_same_definitions(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["definitions", "--vhost", "other_vhost"]) == cli.EXIT_OK
    printed = orjson.loads(capsys.readouterr().out)
    assert printed == topology.definitions("other_vhost")
