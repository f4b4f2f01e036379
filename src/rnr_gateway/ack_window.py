"""Acks each channel's deliveries oldest first, in as few frames as possible."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from aiormq.exceptions import ChannelInvalidStateError

from .amqp_inbound import Inbound

log = logging.getLogger(__name__)


class AckWindow:
    """Acks each channel's deliveries oldest first, in as few frames as possible.

    One ack frame per delivery costs more CPU than decoding and storing it. A ``multiple``
    ack settles every delivery up to its tag at once, but two writers commit batches out
    of order, so deliveries are released only as an unbroken run from the oldest one not
    yet acked. A channel whose tags show a gap (a delivery that did not come through
    here: another consumer shares the channel), or one with a delivery left unacked
    (``skip``), gets one ack per delivery instead.
    """

    def __init__(self) -> None:
        self._channels: dict[object, _Unacked] = {}
        # writers ack one at a time, so a multiple ack never overtakes an older one
        self._lock = asyncio.Lock()

    def track(self, message: Inbound) -> None:
        channel = channel_of(message)
        if channel is None:
            return
        unacked = self._channels.get(channel)
        if unacked is None:
            for old in [c for c, u in self._channels.items() if u.closed]:
                del self._channels[old]
            unacked = self._channels[channel] = _Unacked(channel)
        unacked.track(message)

    async def ack(self, committed: Sequence[Inbound]) -> tuple[int, int]:
        """Ack what the commit releases; returns (deliveries acked, deliveries whose ack
        was lost with their channel: the broker redelivers those)."""
        acked = lost = 0
        async with self._lock:
            for message, multiple, covered in self.settle(committed):
                try:
                    await message.ack(multiple=multiple)
                except Exception as exc:
                    lost += covered
                    log.debug("ack lost for delivery %s: %s", message.delivery_tag, exc)
                else:
                    acked += covered
        return acked, lost

    def settle(self, committed: Sequence[Inbound]) -> list[tuple[Inbound, bool, int]]:
        """(message, multiple, deliveries covered) for every ack the commit releases."""
        out: list[tuple[Inbound, bool, int]] = []
        touched: dict[int, _Unacked] = {}
        for message in committed:
            unacked = self._channels.get(channel_of(message))
            if unacked is None:
                out.append((message, False, 1))
                continue
            unacked.done.add(message.delivery_tag or 0)
            touched[id(unacked)] = unacked
        for unacked in touched.values():
            out.extend(unacked.release())
        return out

    def skip(self, messages: Sequence[Inbound]) -> None:
        """Deliveries that stay unacked: no multiple ack may ever cover them."""
        for message in messages:
            unacked = self._channels.get(channel_of(message))
            if unacked is not None and message in unacked.pending:
                unacked.shared = True
                unacked.pending.remove(message)


def channel_of(message: Inbound) -> object | None:
    """The channel a delivery came on; None once it is closed (the broker then owns the
    delivery again and redelivers it)."""
    try:
        return message.channel
    except ChannelInvalidStateError:  # closed: its deliveries are the broker's again
        return None


class _Unacked:
    """One channel's deliveries taken but not acked yet, in delivery order."""

    def __init__(self, channel: object) -> None:
        self.channel = channel
        self.pending: deque[Inbound] = deque()
        self.done: set[int] = set()
        self.last_tag = 0
        self.shared = False

    @property
    def closed(self) -> bool:
        return bool(getattr(self.channel, "is_closed", False))

    def track(self, message: Inbound) -> None:
        tag = message.delivery_tag or 0
        if tag != self.last_tag + 1:
            self.shared = True
        self.last_tag = tag
        self.pending.append(message)

    def release(self) -> list[tuple[Inbound, bool, int]]:
        if self.shared:
            out = [(m, False, 1) for m in self.pending if m.delivery_tag in self.done]
            self.pending = deque(m for m in self.pending if m.delivery_tag not in self.done)
            self.done.clear()
            return out
        last, count = None, 0
        while self.pending and self.pending[0].delivery_tag in self.done:
            last = self.pending.popleft()
            self.done.discard(last.delivery_tag or 0)
            count += 1
        return [(last, True, count)] if last is not None else []
