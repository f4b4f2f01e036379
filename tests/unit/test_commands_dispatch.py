"""The per-node scheduler: priority, in-flight slots, offline nodes, resends (pure)."""

from __future__ import annotations

import math

import pytest

from rnr_gateway.dispatch import Pending, Scheduler


def cmd(mid: str, node: str = "A", priority: int = 5) -> Pending:
    return Pending(mid, node, priority, expires_at=math.inf, payload=mid.encode())


def online(*nodes: str) -> set[str]:
    return set(nodes)


def ids(batch: list[Pending]) -> list[str]:
    return [c.message_id for c in batch]


def test_higher_priority_first_then_first_come() -> None:
    s = Scheduler(max_in_flight=10)
    for mid, prio in [("low", 1), ("mid1", 5), ("high", 9), ("mid2", 5)]:
        s.offer(cmd(mid, priority=prio))
    assert ids(s.take(online("A").__contains__)) == ["high", "mid1", "mid2", "low"]


def test_one_in_flight_per_node_until_settled() -> None:
    s = Scheduler()
    for mid in ("a1", "a2", "a3"):
        s.offer(cmd(mid))
    s.offer(cmd("b1", node="B"))
    is_online = online("A", "B").__contains__
    assert sorted(ids(s.take(is_online))) == ["a1", "b1"]
    assert s.take(is_online) == []  # nothing freed, nothing new
    assert s.in_flight == 2 and s.queued == 2
    assert s.settle("A", "a1")
    assert ids(s.take(is_online)) == ["a2"]
    assert not s.settle("A", "a1")  # already settled


def test_n_in_flight() -> None:
    s = Scheduler(max_in_flight=2)
    for mid in ("a1", "a2", "a3"):
        s.offer(cmd(mid))
    assert ids(s.take(lambda n: True)) == ["a1", "a2"]


def test_offline_nodes_wait_and_go_when_woken() -> None:
    s = Scheduler()
    s.offer(cmd("a1"))
    up: set[str] = set()
    assert s.take(up.__contains__) == []
    assert s.take(up.__contains__) == []  # not looked at again until woken
    up.add("A")
    assert s.take(up.__contains__) == []
    s.wake("A")
    assert ids(s.take(up.__contains__)) == ["a1"]


def test_requeue_puts_the_command_back_in_its_place_with_its_id() -> None:
    s = Scheduler()
    first, second = cmd("a1"), cmd("a2")
    s.offer(first)
    s.offer(second)
    [taken] = s.take(lambda n: True)
    s.requeue(taken)
    assert s.queued_for("A") == ["a1", "a2"]
    assert ids(s.take(lambda n: True)) == ["a1"]


def test_offer_is_idempotent_and_remove_drops_queued_only() -> None:
    s = Scheduler()
    assert s.offer(cmd("a1"))
    assert not s.offer(cmd("a1"))
    s.offer(cmd("a2"))
    [taken] = s.take(lambda n: True)
    assert not s.offer(cmd("a1"))  # in flight is known too
    assert s.remove("a1") is None  # in flight: not removed
    assert s.remove("a2") is not None
    assert s.queued == 0 and s.queued_for("A") == []
    assert s.settle("A", taken.message_id)
    assert s.take(lambda n: True) == []


def test_deadlines_settle_overdue_commands() -> None:
    s = Scheduler()
    s.offer(cmd("a1"))
    s.offer(cmd("a2"))
    s.take(lambda n: True)
    assert list(s.overdue(1e12)) == []  # publishing: no deadline until the PUBACK
    s.set_deadline("A", "a1", 10.0)
    assert list(s.overdue(9.0)) == []
    assert list(s.overdue(10.0)) == [("A", "a1")]
    assert ids(s.take(lambda n: True)) == ["a2"]


def test_restored_in_flight_holds_the_slot() -> None:
    s = Scheduler()
    s.hold("A", "old", 5.0)
    s.offer(cmd("a1"))
    assert s.take(lambda n: True) == []
    assert list(s.overdue(5.0)) == [("A", "old")]
    assert ids(s.take(lambda n: True)) == ["a1"]


def test_rejects_zero_slots() -> None:
    with pytest.raises(ValueError):
        Scheduler(0)
