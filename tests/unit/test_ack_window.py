"""Ordered multiple acks: never cover a delivery that is not committed, or not ours."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from rnr_gateway.ack_window import AckWindow


class Channel:
    is_closed = False


@dataclass(eq=False)
class Msg:
    channel: Any
    delivery_tag: int


def tracked(window: AckWindow, channel: Channel, tags: range) -> list[Msg]:
    out = [Msg(channel, tag) for tag in tags]
    for m in out:
        window.track(m)  # type: ignore[arg-type]
    return out


def acks(result: list[tuple[Any, bool, int]]) -> list[tuple[int, bool, int]]:
    return [(m.delivery_tag, multiple, covered) for m, multiple, covered in result]


def test_one_multiple_ack_per_batch_committed_in_order() -> None:
    window, ch = AckWindow(), Channel()
    msgs = tracked(window, ch, range(1, 7))
    assert acks(window.settle(msgs[:3])) == [(3, True, 3)]  # type: ignore[arg-type]
    assert acks(window.settle(msgs[3:])) == [(6, True, 3)]  # type: ignore[arg-type]


def test_a_later_batch_waits_for_the_earlier_one() -> None:
    window, ch = AckWindow(), Channel()
    msgs = tracked(window, ch, range(1, 7))
    assert window.settle(msgs[3:]) == []  # type: ignore[arg-type]
    assert acks(window.settle(msgs[:3])) == [(6, True, 6)]  # type: ignore[arg-type]


def test_a_gap_in_tags_means_a_shared_channel_and_single_acks() -> None:
    window, ch = AckWindow(), Channel()
    first = tracked(window, ch, range(1, 3))
    later = tracked(window, ch, range(4, 6))  # tag 3 went to another consumer
    result = acks(window.settle([*later, *first]))  # type: ignore[list-item]
    assert sorted(result) == [(1, False, 1), (2, False, 1), (4, False, 1), (5, False, 1)]


def test_skipped_deliveries_are_never_covered() -> None:
    window, ch = AckWindow(), Channel()
    msgs = tracked(window, ch, range(1, 5))
    window.skip(msgs[:2])  # type: ignore[arg-type]
    assert acks(window.settle(msgs[2:])) == [(3, False, 1), (4, False, 1)]  # type: ignore[arg-type]


async def test_acks_are_sent_oldest_first_whatever_the_commit_order() -> None:
    sent: list[tuple[int, bool]] = []

    class Acked(Msg):
        async def ack(self, multiple: bool = False) -> None:
            await asyncio.sleep(0)  # the frame's write yields to the other writer
            sent.append((self.delivery_tag, multiple))

    window, ch = AckWindow(), Channel()
    msgs = [Acked(ch, tag) for tag in range(1, 7)]
    for m in msgs:
        window.track(m)  # type: ignore[arg-type]
    results = await asyncio.gather(
        window.ack(msgs[:3]),  # type: ignore[arg-type]
        window.ack(msgs[3:]),  # type: ignore[arg-type]
    )
    assert sent == [(3, True), (6, True)]
    assert sorted(results) == [(3, 0), (3, 0)]


def test_channels_are_independent_and_closed_ones_forgotten() -> None:
    window, a, b = AckWindow(), Channel(), Channel()
    on_a = tracked(window, a, range(1, 3))
    a.is_closed = True
    on_b = tracked(window, b, range(1, 3))
    assert acks(window.settle(on_b)) == [(2, True, 2)]  # type: ignore[arg-type]
    assert acks(window.settle(on_a)) == [(1, False, 1), (2, False, 1)]  # type: ignore[arg-type]


def test_a_delivery_of_a_closed_channel_is_recognised_without_raising() -> None:
    import aiormq

    from rnr_gateway.ack_window import channel_of as _channel

    class Closed:
        delivery_tag = 1

        @property
        def channel(self) -> object:  # what aio-pika does once the channel is closed
            raise aiormq.exceptions.ChannelInvalidStateError

    assert _channel(Closed()) is None  # type: ignore[arg-type]
