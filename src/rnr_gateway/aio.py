"""Small asyncio helpers shared by the adapters."""

from __future__ import annotations

import asyncio


async def first_of(*events: asyncio.Event, within: float | None = None) -> None:
    """Return once any of the events is set, or after ``within`` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
