"""Offline detection with an injected clock: exact detection times, no sleeping."""

from __future__ import annotations

import asyncio

import pytest

from rnr_gateway.metrics import Metrics
from rnr_gateway.presence import Presence, Transition
from rnr_gateway.settings import PresenceSettings

PROBATION_S = PresenceSettings().new_node_threshold_s


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    threshold: float = 15.0, interval: float = 5.0
) -> tuple[Presence, Clock, list[Transition]]:
    clock = Clock()
    presence = Presence(
        PresenceSettings(threshold, interval),
        db=None,
        metrics=Metrics(),  # type: ignore[arg-type]
        clock=clock,
    )
    seen: list[Transition] = []
    presence.add_listener(seen.append)
    return presence, clock, seen


def tick_until(presence: Presence, clock: Clock, end: float, step: float = 5.0) -> None:
    while clock.now + step <= end:
        clock.now += step
        presence.check()


def test_fast_reporter_goes_offline_after_threshold_plus_at_most_one_check() -> None:
    presence, clock, seen = make()
    start = clock.now
    for _ in range(10):  # every 2 s: interval learned, threshold stays at 15 s
        presence.heard("N1", clock.now)
        clock.now += 2
    last = clock.now - 2
    tick_until(presence, clock, last + 40)
    offline = [t for t in seen if t.status == "offline"]
    assert len(offline) == 1
    assert offline[0].reason == "timeout"
    assert last + 15 <= offline[0].at <= last + 15 + 5
    assert [t.status for t in seen] == ["online", "offline"]
    assert seen[0].at == start


def test_lwt_is_immediate_and_pushed_once() -> None:
    presence, clock, seen = make()
    presence.heard("N1", clock.now)
    presence.went_offline("N1", "lwt", clock.now + 1)
    presence.went_offline("N1", "lwt", clock.now + 2)  # retained LWT seen twice
    tick_until(presence, clock, clock.now + 120)
    assert [(t.status, t.reason) for t in seen] == [("online", "message"), ("offline", "lwt")]


def test_thirty_second_reporter_never_flaps() -> None:
    presence, clock, seen = make()
    for _ in range(40):  # 20 minutes of a legacy minimal node
        presence.heard("SLOW", clock.now)
        tick_until(presence, clock, clock.now + 30, step=5.0)
    assert [t.status for t in seen] == ["online"]
    assert presence.threshold(presence.nodes["SLOW"]) == pytest.approx(75.0)


def test_new_node_silent_after_first_message_goes_offline_after_probation() -> None:
    presence, clock, seen = make()
    first = clock.now
    presence.heard("ONCE", first)
    tick_until(presence, clock, first + PROBATION_S + 10)
    assert [t.status for t in seen] == ["online", "offline"]
    assert first + PROBATION_S <= seen[1].at <= first + PROBATION_S + 5


def test_node_back_after_timeout_is_online_again_with_reason_message() -> None:
    presence, clock, seen = make()
    for _ in range(3):
        presence.heard("N", clock.now)
        clock.now += 5
    tick_until(presence, clock, clock.now + 30)
    presence.heard("N", clock.now)
    assert [(t.status, t.reason) for t in seen] == [
        ("online", "message"),
        ("offline", "timeout"),
        ("online", "message"),
    ]


def test_tick_cost_ignores_silent_offline_nodes() -> None:
    presence, clock, _ = make()
    for i in range(10_000):
        presence.heard(f"N{i}", clock.now)
    tick_until(presence, clock, clock.now + PROBATION_S + 5)
    assert presence.counts() == (0, 10_000)
    assert presence._heap == []  # nothing left to look at for offline nodes
    presence.heard("N1", clock.now)
    assert len(presence._heap) == 1


def test_counts_follow_every_transition_and_forget() -> None:
    presence, clock, _ = make()
    presence.heard("A", clock.now)
    presence.heard("B", clock.now)
    presence.heard("B", clock.now + 1)
    assert presence.counts() == (2, 0)
    presence.went_offline("A", "lwt", clock.now + 1)
    presence.went_offline("A", "status", clock.now + 1)  # already offline: no change
    assert presence.counts() == (1, 1)
    presence.forget("B")
    presence.forget("missing")
    assert presence.counts() == (0, 1)
    presence.heard("A", clock.now + 2)
    presence.went_offline("C", "lwt", clock.now + 2)  # never heard: unknown -> offline
    assert presence.counts() == (1, 1)
    clock.now += PROBATION_S + 10
    presence.check()
    assert presence.counts() == (0, 2)
    presence.forget("A")
    assert presence.counts() == (0, 1)


def test_stored_lwt_and_status_messages_map_to_reasons() -> None:
    from datetime import UTC, datetime

    from rnr_gateway.codec import decode
    from rnr_gateway.store import Accepted

    presence, clock, seen = make()
    now = datetime.fromtimestamp(clock.now, UTC)
    presence.on_stored(
        [
            Accepted(decode("devices.A.status", b'{"status":"online"}'), now),
            Accepted(decode("devices.A.status", b"offline"), now),
            Accepted(decode("devices.B.data", b'{"temperature":1}'), now),
            Accepted(decode("devices.B.status", b'{"status":"offline","reason":"shutdown"}'), now),
        ]
    )
    assert [(t.node_id, t.status, t.reason) for t in seen] == [
        ("A", "online", "status"),
        ("A", "offline", "lwt"),
        ("B", "online", "message"),
        ("B", "offline", "status"),
    ]


async def test_restart_restores_state_and_flags_silent_nodes_as_startup() -> None:
    class FakeDb:  # the one query load() makes; the real one is covered end to end
        async def retrying(self, work: object, stop: asyncio.Event) -> list[dict[str, object]]:
            return rows

    clock = Clock()
    rows = [
        {
            "node_id": "KEPT",
            "status": "online",
            "last_seen": clock.now - 3,
            "report_interval_s": 2.0,
        },
        {
            "node_id": "GONE",
            "status": "online",
            "last_seen": clock.now - 600,
            "report_interval_s": 2.0,
        },
        {
            "node_id": "OFF",
            "status": "offline",
            "last_seen": clock.now - 900,
            "report_interval_s": None,
        },
    ]
    presence = Presence(PresenceSettings(15, 5), FakeDb(), Metrics(), clock)  # type: ignore[arg-type]
    seen: list[Transition] = []
    presence.add_listener(seen.append)
    await presence.load()
    presence.check()
    assert seen == []  # one check interval of grace for the broker's backlog
    presence.heard("KEPT", clock.now + 1)  # backlog ingested: KEPT kept reporting
    tick_until(presence, clock, clock.now + 10)
    assert [(t.node_id, t.status, t.reason) for t in seen] == [("GONE", "offline", "startup")]
    assert presence.is_online("KEPT") and not presence.is_online("OFF")


def test_a_tick_taken_in_chunks_ends_as_one_tick_does() -> None:
    whole, whole_clock, whole_seen = make()
    chunked, chunked_clock, chunked_seen = make()
    for presence, clock in ((whole, whole_clock), (chunked, chunked_clock)):
        for i in range(250):  # 200 fall silent, 50 keep reporting
            presence.heard(f"N{i}", clock.now)
        clock.now += PROBATION_S + 1
        for i in range(200, 250):
            presence.heard(f"N{i}", clock.now)
        clock.now += 1
    whole.check()
    now = chunked_clock.now
    rounds = 0
    while True:
        rounds += 1
        assert len(chunked.check(now, limit=30)) <= 30
        if not chunked.due(now):
            break
    assert rounds == 9  # 250 due entries (200 go offline, 50 are re-armed), 30 at a time
    assert [(t.node_id, t.status, t.at) for t in chunked_seen] == [
        (t.node_id, t.status, t.at) for t in whole_seen
    ]
    assert sum(t.status == "offline" for t in whole_seen) == 200
    assert whole.counts() == chunked.counts() == (50, 200)


async def test_silence_while_the_database_is_out_of_reach_is_not_a_timeout() -> None:
    class Pool:  # what the ticker asks before calling nodes silent (real: tests/e2e)
        down = True

        async def fetch(self, query: str, node_ids: list[str]) -> list[dict[str, object]]:
            if self.down:
                raise OSError("connection refused")
            return [{"node_id": "N", "status": "online", "seen": None, "reason": None}]

    class FakeDb:
        pool = Pool()

        async def retrying(self, work: object, stop: asyncio.Event) -> None:
            return None  # the writer's flush

    clock = Clock()
    presence = Presence(PresenceSettings(15, 0.01), FakeDb(), Metrics(), clock)  # type: ignore[arg-type]
    seen: list[Transition] = []
    presence.add_listener(seen.append)
    presence.heard("N", clock.now)
    clock.now += 2 * PROBATION_S  # long silent here: ingest commits nothing meanwhile
    ticker = asyncio.create_task(presence.run())
    try:
        for _ in range(20):  # some twenty checks with the database out of reach
            clock.now += 0.01
            await asyncio.sleep(0.01)
        assert presence.is_online("N")
        FakeDb.pool.down = False  # back, and it has heard nothing newer either
        for _ in range(200):
            if not presence.is_online("N"):
                break
            clock.now += 0.01
            await asyncio.sleep(0.01)
        assert [(t.status, t.reason) for t in seen] == [
            ("online", "message"),
            ("offline", "timeout"),
        ]
    finally:
        presence.request_stop()
        await asyncio.wait_for(ticker, 5)


def test_a_node_s_transitions_never_go_back_in_time() -> None:
    presence, clock, seen = make()
    presence.heard("N", clock.now)
    presence.heard("N", clock.now + 5)
    presence.heard("N", clock.now + 10)  # reporting every 5 s: threshold 15 s
    clock.now += 30
    presence.check()  # timed out at clock.now
    # a message received a moment before that, whose batch committed just after it
    presence.heard("N", clock.now - 0.01)
    assert [(t.status, t.reason) for t in seen] == [
        ("online", "message"),
        ("offline", "timeout"),
        ("online", "message"),
    ]
    assert seen[2].at == seen[1].at == clock.now  # back at the timeout's moment


@pytest.mark.parametrize("every_s", [70.0, 120.0, 300.0])
def test_a_reporter_slower_than_probation_is_timed_out_once_then_never_flaps(
    every_s: float,
) -> None:
    presence, clock, seen = make()
    for _ in range(20):
        presence.heard("SLOWER", clock.now)
        tick_until(presence, clock, clock.now + every_s, step=5.0)
    # its first gap outlasts the 60 s probation: one timeout, and that gap is learned
    assert [(t.status, t.reason) for t in seen] == [
        ("online", "message"),
        ("offline", "timeout"),
        ("online", "message"),
    ]
    assert presence.threshold(presence.nodes["SLOWER"]) == pytest.approx(2.5 * every_s)


def test_an_lwt_gap_is_not_learned_and_a_long_pause_counts_three_intervals_at_most() -> None:
    presence, clock, _ = make()
    for _ in range(10):
        presence.heard("N", clock.now)
        clock.now += 2.0
    presence.went_offline("N", "lwt", clock.now)
    clock.now += 3600  # off for an hour (its LWT said so): not its reporting interval
    presence.heard("N", clock.now)
    assert presence.nodes["N"].interval_s == pytest.approx(2.0)
    clock.now += 600  # a pause of the gateway's own (a backlog after an outage)
    presence.heard("N", clock.now)
    assert presence.nodes["N"].interval_s == pytest.approx(0.3 * 6.0 + 0.7 * 2.0)
    assert presence.threshold(presence.nodes["N"]) == 15.0  # still the floor


async def test_restart_gap_is_not_learned_and_restored_nodes_wait_for_the_backlog() -> None:
    class FakeDb:
        async def retrying(self, work: object, stop: asyncio.Event) -> list[dict[str, object]]:
            return rows

    clock = Clock()
    rows = [
        {"node_id": n, "status": "online", "last_seen": clock.now - 600, "report_interval_s": 2.0}
        for n in ("KEPT", "GONE")
    ]
    presence = Presence(PresenceSettings(15, 5), FakeDb(), Metrics(), clock)  # type: ignore[arg-type]
    seen: list[Transition] = []
    presence.add_listener(seen.append)
    waiting = [5000]

    async def backlog() -> int:
        return waiting[0]

    presence.backlog = backlog
    await presence.load()

    async def tick() -> None:  # what the ticker does, with the clock stepped
        clock.now += 5
        silent = presence._overdue(clock.now, None)
        silent = await presence._after_backlog(silent, clock.now)
        presence._expire(silent, clock.now)

    for _ in range(6):  # 30 s of draining the backlog kept while this gateway was down
        await tick()
    assert seen == []
    # meanwhile neither is shown online, nor called offline before its messages are in
    assert presence.status("KEPT") == presence.status("GONE") == "unknown"
    presence.heard("KEPT", clock.now)  # its messages came out of the backlog
    assert presence.nodes["KEPT"].interval_s == 2.0  # the 10 min restart is no interval
    assert presence.status("KEPT") == "online"  # heard again: shown as it is
    waiting[0] = 0
    await tick()
    assert [(t.node_id, t.status, t.reason) for t in seen] == [("GONE", "offline", "startup")]
    assert presence.status("GONE") == "offline"
