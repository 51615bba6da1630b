"""Wrappers over a route's stream of server-sent events: each passes every event on, and
closes the stream it wraps when it is closed (closing vLLM's stream is how a disconnect aborts
its request)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

Event = str | bytes


async def close_stream(events: AsyncIterator[Event]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


async def on_first_event(
    events: AsyncIterator[Event], callback: Callable[[Event], None]
) -> AsyncIterator[Event]:
    """`events`, unchanged; `callback(event)` with the first of them, before it is passed on."""
    first = True
    try:
        async for event in events:
            if first:
                first = False
                callback(event)
            yield event
    finally:
        await close_stream(events)
