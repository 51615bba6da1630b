"""A streamed request counts as taken on at its first event, unless vLLM refused it there."""

from __future__ import annotations

import asyncio

import pytest

from server.stream_admission import counting_once_taken, is_error_event
from stream_fakes import through

OPENAI_ERROR = 'data: {"error": {"message": "logprobs: at most 20", "code": 400}}\n\n'
ANTHROPIC_ERROR = (
    'event: error\ndata: {"type":"error","error":{"type":"invalid_request_error"}}\n\n'
)
CHUNK = 'data: {"id":"cmpl-1","choices":[{"index":0,"text":" the"}]}\n\n'
MESSAGE_START = 'event: message_start\ndata: {"type":"message_start"}\n\n'
# a generated text that says "error" is no error
TEXT_ERROR = 'data: {"id":"cmpl-1","choices":[{"index":0,"text":"data: {\\"error\\""}]}\n\n'


@pytest.mark.parametrize("event", [OPENAI_ERROR, ANTHROPIC_ERROR, OPENAI_ERROR.encode()])
def test_vllms_refusals_in_a_stream_are_errors(event):
    assert is_error_event(event)


@pytest.mark.parametrize("event", [CHUNK, MESSAGE_START, TEXT_ERROR, "data: [DONE]\n\n", b""])
def test_other_events_are_not(event):
    assert not is_error_event(event)


def consume(events: list[str]) -> tuple[list[str], int, list[bool]]:
    counted: list[None] = []
    passed, closed = through(
        lambda stream: counting_once_taken(stream, lambda: counted.append(None)), events
    )
    return passed, len(counted), closed


@pytest.mark.parametrize(
    ("events", "count"),
    [
        ([CHUNK, CHUNK, "data: [DONE]\n\n"], 1),
        ([MESSAGE_START, ANTHROPIC_ERROR], 1),  # taken on, then failed: it was taken on
        ([OPENAI_ERROR, "data: [DONE]\n\n"], 0),
        ([ANTHROPIC_ERROR], 0),
        ([], 0),
    ],
)
def test_the_request_is_counted_once_unless_its_stream_opens_with_an_error(events, count):
    passed, counted, closed = consume(events)
    assert (passed, counted, closed) == (events, count, [True])


def test_closing_the_wrapper_closes_the_stream_it_wraps():
    closed: list[bool] = []

    async def stream():
        try:
            while True:
                yield CHUNK
        finally:
            closed.append(True)

    async def leave_early() -> None:
        wrapped = counting_once_taken(stream(), lambda: None)
        assert await anext(wrapped) == CHUNK
        await wrapped.aclose()
        assert closed == [True]

    asyncio.run(leave_early())
