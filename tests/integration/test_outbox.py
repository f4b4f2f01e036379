"""The outbox's transitions against the real database: the history each command keeps."""

from __future__ import annotations

from typing import Literal

import asyncpg
import pytest

from rnr_gateway import outbox
from rnr_gateway.command_codec import Ack, NewCommand, Options, utcnow
from rnr_gateway.command_steps import ALLOWED_FROM
from rnr_gateway.outbox import IMPLIED_SENT, Step

NODE = "NODE-OUTBOX"


def puback(mid: str) -> Step:
    return Step(mid, "sent", "broker PUBACK", ("queued",), delivered=True)


def ack(mid: str, status: Literal["received", "executed"]) -> Step:
    return Step(
        mid,
        status,
        f"node acked {status}",
        ALLOWED_FROM[status],
        delivered=True,
        reopen_expired=True,
        node_id=NODE,
        ack=Ack(NODE, mid, status, ""),
    )


async def queued(db: asyncpg.Connection, mid: str) -> None:
    new = NewCommand.create(NODE, {"action": "PING"}, Options(5, 300, False), message_id=mid)
    assert await outbox.insert(db, [new], "accepted") == {mid}


async def history(db: asyncpg.Connection, mid: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT status, reason FROM command_events WHERE message_id = $1 ORDER BY id", mid
    )
    return [(r["status"], r["reason"]) for r in rows]


async def test_an_ack_before_the_puback_records_sent_first(db: asyncpg.Connection) -> None:
    await queued(db, "c-early")
    moved, unmatched = await outbox.move_many(db, [ack("c-early", "received")], utcnow())
    assert [(m.status, m.reason) for m in moved] == [
        ("sent", IMPLIED_SENT),
        ("received", "node acked received"),
    ]
    assert unmatched == {}
    # the PUBACK, recorded late, moves nothing and is not an unmatched ack
    assert await outbox.move_many(db, [puback("c-early")], utcnow()) == ([], {})
    moved, _ = await outbox.move_many(db, [ack("c-early", "executed")], utcnow())
    assert [m.status for m in moved] == ["executed"]  # sent is in its history already
    assert await history(db, "c-early") == [
        ("queued", "accepted"),
        ("sent", IMPLIED_SENT),
        ("received", "node acked received"),
        ("executed", "node acked executed"),
    ]
    row = await db.fetchrow(
        "SELECT sent_at, received_at FROM commands WHERE message_id = $1", "c-early"
    )
    assert row is not None and row["sent_at"] == row["received_at"]


async def test_in_order_acks_add_nothing(db: asyncpg.Connection) -> None:
    await queued(db, "c-order")
    for step in (puback("c-order"), ack("c-order", "received"), ack("c-order", "executed")):
        moved, _ = await outbox.move_many(db, [step], utcnow())
        assert [m.status for m in moved] == [step.status]
    assert [s for s, _ in await history(db, "c-order")] == [
        "queued",
        "sent",
        "received",
        "executed",
    ]


async def test_one_statement_mixes_early_and_in_order_acks(db: asyncpg.Connection) -> None:
    await queued(db, "c-a")
    await queued(db, "c-b")
    await outbox.move_many(db, [puback("c-b")], utcnow())
    moved, _ = await outbox.move_many(
        db, [ack("c-a", "executed"), ack("c-b", "received")], utcnow()
    )
    assert sorted((m.message_id, m.status) for m in moved) == [
        ("c-a", "executed"),
        ("c-a", "sent"),
        ("c-b", "received"),
    ]
    assert [s for s, _ in await history(db, "c-a")] == ["queued", "sent", "executed"]
    assert [s for s, _ in await history(db, "c-b")] == ["queued", "sent", "received"]


async def test_the_database_refuses_a_command_the_dispatcher_could_not_encode(
    db: asyncpg.Connection,
) -> None:
    insert = (
        "INSERT INTO commands (message_id, node_id, action, params, priority, ttl_s,"
        " created_at, expires_at, updated_at) VALUES ($1, $2, 'PING', $3, 5, 300, now(),"
        " now() + interval '5 minutes', now())"
    )
    for params in ('{"relay": 3}', '["PING"]'):
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await db.execute(insert, f"bad-{params}", NODE, params)
        assert refused.value.constraint_name == "commands_params_shape"
    await db.execute(insert, "good", NODE, '{"action": "PING"}')
