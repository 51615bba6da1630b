"""A streamed request is counted as taken on once its stream sends something other than an error:
vLLM checks some requests only when their stream starts, and refuses them inside it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

# How vLLM's streams open when it refuses the request there: the OpenAI routes' `data:
# {"error": ...}` chunk, and a named `error` event (Anthropic's Messages API).
_ERROR_OPENINGS = ('data: {"error"', "event: error")


def is_error_event(event: str | bytes) -> bool:
    text = event.decode(errors="replace") if isinstance(event, bytes) else event
    return text.lstrip().startswith(_ERROR_OPENINGS)


async def counting_once_taken(
    events: AsyncIterator[str | bytes], count: Callable[[], None]
) -> AsyncIterator[str | bytes]:
    """A stream's events, unchanged; `count()` runs at its first event unless that is an error."""
    first = True
    try:
        async for event in events:
            if first:
                first = False
                if not is_error_event(event):
                    count()
            yield event
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()  # as the server would have closed vLLM's stream (a disconnect aborts)
