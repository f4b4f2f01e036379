"""A command's PUBACKs, acks and inferred outcomes as outbox steps, applied set-based.

Each becomes one ``outbox.Step``; the steps of a batch are split into rounds with each
command at most once per statement (a ``received`` and an ``executed`` for the same
command arrive together), and every round is one statement, all in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import outbox, store
from .command_codec import Ack, Moved, Status, utcnow
from .dispatch import Pending
from .outbox import Step
from .store import Failed

if TYPE_CHECKING:
    from .db import Conn

ALLOWED_FROM: dict[Status, tuple[Status, ...]] = {
    "received": ("queued", "sent"),
    "executed": ("queued", "sent", "received"),
    "failed": ("queued", "sent", "received"),
    "rejected": ("queued", "sent", "received"),
    "expired": ("queued", "sent", "received"),
}


@dataclass(frozen=True, slots=True)
class Inferred:
    node_id: str
    message_id: str
    outcome: Status
    event: str


@dataclass(frozen=True, slots=True)
class Todo:
    step: Step
    source: Ack | Inferred | Pending


def todo(item: Ack | Inferred | Pending) -> Todo:
    if isinstance(item, Pending):
        return Todo(Step(item.message_id, "sent", "broker PUBACK", ("queued",), True), item)
    if isinstance(item, Inferred):
        step = Step(item.message_id, item.outcome, "inferred", ("sent",), node_id=item.node_id)
        return Todo(step, item)
    target: Status = "executed" if item.status == "duplicate" else item.status
    reason = item.detail or (
        "node had already executed it (duplicate)"
        if item.status == "duplicate"
        else f"node acked {item.status}"
    )
    step = Step(
        item.message_id,
        target,
        reason,
        ALLOWED_FROM[target],
        delivered=True,
        reopen_expired=target != "expired",
        node_id=item.node_id,
        ack=item,
    )
    return Todo(step, item)


def rounds(todos: list[Todo]) -> list[list[Todo]]:
    """Split into statements with each command at most once, keeping each one's order."""
    rounds: list[list[Todo]] = []
    seen: dict[str, int] = {}
    for todo in todos:
        i = seen[todo.step.message_id] = seen.get(todo.step.message_id, -1) + 1
        if i == len(rounds):
            rounds.append([])
        rounds[i].append(todo)
    return rounds


async def apply(
    conn: Conn, rounds: list[list[Todo]], failed: list[Failed]
) -> tuple[list[tuple[Moved, Ack | Inferred | Pending]], list[tuple[Ack, str]]]:
    """Unreadable acks, then each round's transitions (unmatched acks kept): one statement
    per round, in one transaction when there is more than one statement."""
    if len(rounds) + bool(failed) > 1:
        async with conn.transaction():
            return await _apply_rounds(conn, rounds, failed)
    return await _apply_rounds(conn, rounds, failed)


async def _apply_rounds(
    conn: Conn, rounds: list[list[Todo]], failed: list[Failed]
) -> tuple[list[tuple[Moved, Ack | Inferred | Pending]], list[tuple[Ack, str]]]:
    moved: list[tuple[Moved, Ack | Inferred | Pending]] = []
    unmatched: list[tuple[Ack, str]] = []
    if failed:
        await store.write_batch(conn, [], failed)
    for todos in rounds:
        done, why = await outbox.move_many(conn, [t.step for t in todos], utcnow())
        by_id: dict[str, list[Moved]] = {}
        for m in done:
            by_id.setdefault(m.message_id, []).append(m)
        for t in todos:
            if t.step.message_id in by_id:
                moved.extend((m, t.source) for m in by_id[t.step.message_id])
            elif isinstance(t.source, Ack):
                unmatched.append((t.source, why.get(t.step.message_id, "unknown_command")))
    return moved, unmatched
