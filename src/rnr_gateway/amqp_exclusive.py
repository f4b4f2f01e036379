"""The exclusive consumers: one gateway holds all of them, any other stands by.

The command queues (``device_commands_enhanced``, ``device_acks``) are consumed with the
broker's exclusive flag, so one process orders a node's commands. The broker refuses an
exclusive consume on a queue that has any consumer; a process that is refused releases
whatever it took and stands by, and ``Amqp.run`` tries again every ``STANDBY_RETRY_S``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractChannel

from .amqp_inbound import Inbound

log = logging.getLogger(__name__)
STANDBY_RETRY_S = 5.0


@dataclass(frozen=True)
class Consumer:
    """A queue to consume and the (synchronous, non-blocking) function each delivery goes to."""

    queue: str
    on_message: Callable[[Inbound], None]
    # consumed with the broker's exclusive flag: the exclusive consumers go together, one
    # process holds all of them and any other stands by, retrying (``Exclusive``)
    exclusive: bool = False


class Exclusive:
    """Whether this process holds the exclusive consumers, and taking them: all or none."""

    def __init__(self) -> None:
        self.held = False
        self.on_change: list[Callable[[bool], None]] = []  # told when ``held`` changes
        self._standby_said = False

    async def take(
        self,
        consumers: Sequence[Consumer],
        consume: Callable[[Consumer], Awaitable[AbstractChannel]],
        release: Callable[[Consumer, AbstractChannel], Awaitable[None]],
    ) -> list[AbstractChannel]:
        """Consume every exclusive queue; refused on one, release the others and stand by."""
        specs = [s for s in consumers if s.exclusive]
        taken: list[AbstractChannel] = []
        try:
            for spec in specs:
                taken.append(await consume(spec))
        except aiormq.exceptions.ChannelAccessRefused as exc:
            for spec, channel in zip(specs, taken, strict=False):
                await release(spec, channel)
            if self.held or not self._standby_said:
                log.warning(
                    "standing by: %s (another gateway holds %s); retrying every %.0f s",
                    reply_text(exc),
                    ", ".join(s.queue for s in specs),
                    STANDBY_RETRY_S,
                )
                self._standby_said = True
            self.set(False)
            return []
        if specs:
            log.info("holding the exclusive consumers on %s", ", ".join(s.queue for s in specs))
            self._standby_said = False
            self.set(True)
        return taken

    def set(self, held: bool) -> None:
        if held != self.held:
            self.held = held
            for callback in self.on_change:
                callback(held)


def reply_text(exc: BaseException) -> str:
    """The broker's reply text carried by an aiormq exception, else its string."""
    for arg in exc.args:
        if isinstance(arg, str) and arg:
            return arg
    return str(exc)
