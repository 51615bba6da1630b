"""A steered stream's closing event, and only that event, gains the count of its sequences that
ended before their first steered position; every other byte of the stream passes unchanged. A
completion or chat stream without a usage chunk closes with the chunk ending its last choice.

The events are written as vLLM 0.32 sends them (compact JSON, `data: ` lines, named events on
the Anthropic and Responses routes); test_server.py reads them from a real server."""

from __future__ import annotations

import asyncio
import json

import pytest

from sae_vllm.engine import reach_report
from sae_vllm.spec import SteeringSpec
from server.stream_report import reporting_unreached, with_unreached_count

LATE = SteeringSpec.model_validate(
    {"edits": [{"feature": 3, "op": "set", "value": 2.0}], "window": {"start": 5}}
)
USAGE = '{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2}'
USAGE_CHUNK = (
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
    f'"usage":{USAGE}}}\n\n'
)
CHAT_USAGE_CHUNK = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    f'"choices":[],"usage":{USAGE}}}\n\n'
)
MESSAGE_DELTA = (
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    '"stop_sequence":null},"usage":{"input_tokens":3,"output_tokens":2}}\n\n'
)
RESPONSE_COMPLETED = (
    'event: response.completed\ndata: {"response":{"id":"resp_1","output":[],'
    '"status":"completed"},"sequence_number":9,"type":"response.completed"}\n\n'
)
UNCHANGED = [
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index"'
    ':0,"text":" the","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n',
    # continuous usage stats: every chunk has usage, the closing one alone no choices
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index"'
    f':0,"text":" .","finish_reason":"stop"}}],"usage":{USAGE}}}\n\n',
    'data: {"choices":[{"index":0,"text":"\\"choices\\":[] event: message_delta"}]}\n\n',
    "data: [DONE]\n\n",
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"}}\n\n',
    'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta",'
    '"text":"\\"choices\\":[]"}}\n\n',
    'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    'event: response.output_text.delta\ndata: {"delta":" the","type":"response.output_text.delta"}'
    "\n\n",
    'event: error\ndata: {"error":{"message":"boom"}}\n\n',
    'data: {"choices":[],"usage":null,"sae_steering":{"unreached":7}}\n\n',  # said already
]


def data_of(event: str) -> dict:
    (line,) = [line for line in event.split("\n") if line.startswith("data: ")]
    return json.loads(line.removeprefix("data: "))


@pytest.mark.parametrize(
    "event", [USAGE_CHUNK, CHAT_USAGE_CHUNK, MESSAGE_DELTA, RESPONSE_COMPLETED]
)
@pytest.mark.parametrize("unreached", [0, 3])
def test_the_closing_event_gains_the_count_and_keeps_every_other_byte(event, unreached):
    reported = with_unreached_count(event, unreached)
    assert data_of(reported) == data_of(event) | {"sae_steering": {"unreached": unreached}}
    head, _, tail = event.partition("}\n\n")
    assert reported.startswith(head.removesuffix("}"))  # only the data's last brace moved
    assert reported.endswith("}}\n\n") and tail == ""


@pytest.mark.parametrize("event", UNCHANGED)
def test_every_other_event_passes_unchanged(event):
    assert with_unreached_count(event, 2) == event


def test_usage_chunks_are_told_apart_from_chunks_with_choices_by_their_json():
    for chunk in (USAGE_CHUNK, UNCHANGED[1]):
        reported = with_unreached_count(chunk, 1)
        assert ("sae_steering" in data_of(reported)) == (data_of(chunk)["choices"] == [])


async def _vllm_stream(events: list[str], ends: list[int], closed: list[bool]):
    """A stream whose request's generator starts only once it runs, as the Responses API's
    does: each sequence ends (`ends`: its sampled count) before the closing event."""
    try:
        sequence_ended = reach_report.sequence_end_reporter(LATE, 3, "cmpl-1")
        for event in events[:-2]:
            yield event
        for num_sampled in ends:
            sequence_ended(num_sampled)
        for event in events[-2:]:
            yield event
    finally:
        closed.append(True)


def stream_events(
    ends: list[int], events: list[str] | None = None
) -> tuple[list[str], reach_report.SequenceTally, list[bool]]:
    events = [UNCHANGED[0], UNCHANGED[0], USAGE_CHUNK, UNCHANGED[3]] if events is None else events
    tally, closed = reach_report.SequenceTally(), []

    async def consume() -> list[str]:
        # The request's tally is not open where Starlette iterates the body: only the wrapper
        # opens it there.
        return [
            event async for event in reporting_unreached(_vllm_stream(events, ends, closed), tally)
        ]

    return asyncio.run(consume()), tally, closed


@pytest.mark.parametrize("ends, unreached", [([1, 5], 2), ([1, 9], 1), ([6, 9], 0), ([], 0)])
def test_sequences_ending_while_the_stream_runs_are_counted_in_its_closing_event(ends, unreached):
    # LATE steers from P + 4 on: 5 sampled tokens come from positions P - 1 .. P + 3
    reported, tally, _ = stream_events(ends)
    assert (tally.ended, tally.unreached) == (len(ends), unreached)
    assert reported[:2] == [UNCHANGED[0]] * 2 and reported[3] == UNCHANGED[3]
    assert data_of(reported[2])["sae_steering"] == {"unreached": unreached}


def choice_chunk(index: int, text: str, finish_reason: str | None) -> str:
    finish = "null" if finish_reason is None else f'"{finish_reason}"'
    return (
        'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{'
        f'"index":{index},"text":"{text}","logprobs":null,"finish_reason":{finish},'
        '"stop_reason":null}]}\n\n'
    )


DONE = UNCHANGED[3]


@pytest.mark.parametrize("ends, unreached", [([1, 5], 2), ([6, 9], 0)])
def test_without_a_usage_chunk_the_chunk_ending_the_last_choice_carries_the_count(ends, unreached):
    """Two choices: the first ends while the second runs on; the second's ending chunk, the last
    before [DONE], is the stream's closing event."""
    first_ends, second_runs = choice_chunk(0, " a", "stop"), choice_chunk(1, " b", None)
    second_ends = choice_chunk(1, " c", "length")
    events = [choice_chunk(0, " x", None), first_ends, second_runs, second_ends, DONE]
    reported, _, closed = stream_events(ends, events)
    assert reported[:3] == events[:3] and reported[4] == DONE and closed == [True]
    assert data_of(reported[3]) == data_of(second_ends) | {"sae_steering": {"unreached": unreached}}
    assert reported[3].startswith(second_ends.removesuffix("}\n\n"))


def test_a_usage_chunk_after_the_last_ending_chunk_carries_the_count_alone():
    events = [choice_chunk(0, " a", "stop"), USAGE_CHUNK, DONE]
    reported, _, _ = stream_events([1], events)
    assert reported[0] == events[0] and reported[2] == DONE
    assert data_of(reported[1])["sae_steering"] == {"unreached": 1}


def test_an_ending_chunk_not_followed_by_done_passes_unchanged():
    """An error event after it, or a stream cut short: it was not the closing event."""
    error = 'data: {"error":{"message":"boom","code":500}}\n\n'
    ending = choice_chunk(0, " a", "stop")
    for events in ([ending, error, DONE], [choice_chunk(0, " x", None), ending]):
        reported, _, _ = stream_events([1], events)
        assert reported == events


CHAT_ENDS = (  # as vLLM's chat stream writes it (exclude_unset)
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"content":"."},"logprobs":null,"finish_reason":"stop",'
    '"stop_reason":null}]}\n\n'
)
CONTINUOUS_ENDS = (  # continuous usage stats: a chunk ending its choice carries usage too
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index"'
    f':0,"text":" .","finish_reason":"length"}}],"usage":{USAGE}}}\n\n'
)


def test_a_chat_stream_without_usage_closes_with_its_ending_chunk():
    reported, _, _ = stream_events([1], [CHAT_ENDS, DONE])
    assert data_of(reported[0]) == data_of(CHAT_ENDS) | {"sae_steering": {"unreached": 1}}
    assert reported[1] == DONE


def test_with_continuous_usage_the_usage_chunk_alone_carries_the_count():
    reported, _, _ = stream_events([9], [CONTINUOUS_ENDS, USAGE_CHUNK, DONE])
    assert reported[0] == CONTINUOUS_ENDS and reported[2] == DONE
    assert data_of(reported[1])["sae_steering"] == {"unreached": 0}


def test_a_held_ending_chunk_is_sent_before_an_error_raised_after_it():
    """The chunk ending a choice holds its last text: a stream that raises next still sends it,
    unchanged, then the error."""
    last = choice_chunk(0, " last", "stop")

    async def raising():
        yield choice_chunk(0, " x", None)
        yield last
        raise RuntimeError("engine died")

    async def consume(got: list[str]) -> None:
        async for event in reporting_unreached(raising(), reach_report.SequenceTally()):
            got.append(event)

    got: list[str] = []
    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(consume(got))
    assert got == [choice_chunk(0, " x", None), last]


def test_closing_the_report_closes_the_stream_it_wraps():
    """Starlette stops iterating a stream whose client left; vLLM aborts the request when its
    generator closes, so the wrapper must close what it wraps."""
    closed: list[bool] = []

    async def leave_early() -> None:
        events = [UNCHANGED[0]] * 4
        report = reporting_unreached(
            _vllm_stream(events, [1], closed), reach_report.SequenceTally()
        )
        assert await anext(report) == UNCHANGED[0]
        await report.aclose()
        assert closed == [True]

    asyncio.run(leave_early())
