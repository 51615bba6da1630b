"""A streamed request is counted as taken on once its stream sends something other than an error:
vLLM checks some requests only when their stream starts, and refuses them inside it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from .event_streams import Event, on_first_event

# How vLLM's streams open when it refuses the request there: the OpenAI routes' `data:
# {"error": ...}` chunk, and a named `error` event (Anthropic's Messages API).
_ERROR_OPENINGS = ('data: {"error"', "event: error")


def is_error_event(event: Event) -> bool:
    text = event.decode(errors="replace") if isinstance(event, bytes) else event
    return text.lstrip().startswith(_ERROR_OPENINGS)


def counting_once_taken(
    events: AsyncIterator[Event], count: Callable[[], None]
) -> AsyncIterator[Event]:
    """A stream's events, unchanged; `count()` runs at its first event unless that is an error."""

    def first_event(event: Event) -> None:
        if not is_error_event(event):
            count()

    return on_first_event(events, first_event)
