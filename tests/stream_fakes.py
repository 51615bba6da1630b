"""A stand-in for vLLM's stream of server-sent events, and a way to run a wrapper over it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable


async def recorded_stream(events: list[str], closed: list[bool]) -> AsyncIterator[str]:
    """`events`, one by one; appends True to `closed` when closed."""
    try:
        for event in events:
            yield event
    finally:
        closed.append(True)


def through(
    wrap: Callable[[AsyncIterator[str]], AsyncIterator[str]], events: list[str]
) -> tuple[list[str], list[bool]]:
    """The events `wrap` passes on from a stream of `events`, and whether it closed that stream."""
    closed: list[bool] = []

    async def consume() -> list[str]:
        return [event async for event in wrap(recorded_stream(events, closed))]

    return asyncio.run(consume()), closed
