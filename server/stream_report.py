"""A steered stream's closing event says how many of its sequences came back unsteered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sae_vllm.engine import reach_report
from sae_vllm.engine.reach_report import SequenceTally

from .event_streams import Event, close_stream

REPORT_FIELD = "sae_steering"  # {"unreached": N}, added to the closing event's data
_DATA = "data: "
_DONE = "data: [DONE]\n\n"  # the last event of a completion or chat stream
# Events sent once every sequence has ended: Anthropic's message_delta and the Responses API's
# response.completed, by name; completions and chat have the usage chunk (below), or without
# one the chunk ending their last choice (told by the [DONE] after it: reporting_unreached).
_CLOSING_EVENT_NAMES = ("message_delta", "response.completed")


def _is_usage_chunk(data: dict) -> bool:
    """The chunk a completion or chat stream sends last when its client asked for usage."""
    return data.get("choices") == [] and "usage" in data


def _data_index(lines: list[str]) -> int | None:
    """The index of an event's `data: ` line among its lines (None without one)."""
    return next((i for i, line in enumerate(lines) if line.startswith(_DATA)), None)


def _data_of(lines: list[str]) -> Any:
    """The JSON an event's data line holds (None without one, or for "[DONE]" and non-JSON)."""
    index = _data_index(lines)
    if index is None:
        return None
    try:
        return json.loads(lines[index].removeprefix(_DATA))
    except ValueError:
        return None


def _is_closing(event: str) -> bool:
    """Whether `event` is a stream's closing event told by itself: a usage chunk,
    message_delta or response.completed."""
    if "event: " not in event and '"choices":[]' not in event:  # most chunks: cheap to tell
        return False
    lines = event.split("\n")
    names = {line.removeprefix("event: ") for line in lines if line.startswith("event: ")}
    if names and names.isdisjoint(_CLOSING_EVENT_NAMES):
        return False
    data = _data_of(lines)
    return (
        isinstance(data, dict)
        and bool(data)
        and REPORT_FIELD not in data
        and bool(names or _is_usage_chunk(data))
    )


def _ends_a_choice(event: str) -> bool:
    """Whether `event` is a completion or chat chunk that ends one of its choices."""
    if '"finish_reason":"' not in event:  # most chunks: cheap to tell
        return False
    data = _data_of(event.split("\n"))
    choices = data.get("choices") if isinstance(data, dict) else None
    return isinstance(choices, list) and any(
        isinstance(choice, dict) and choice.get("finish_reason") for choice in choices
    )


def _with_report(event: str, unreached: int) -> str:
    """`event` with `"sae_steering": {"unreached": unreached}` added to its data (a JSON object),
    the rest of it kept byte for byte."""
    lines = event.split("\n")
    index = _data_index(lines)
    assert index is not None  # callers pass events whose data is a JSON object
    data_text = lines[index].rstrip()
    report = json.dumps({REPORT_FIELD: {"unreached": unreached}}, separators=(",", ":"))
    lines[index] = data_text[:-1] + "," + report[1:]  # both objects: join "{...}" and "{...}"
    return "\n".join(lines)


def with_unreached_count(event: str, unreached: int) -> str:
    """`event` with `"sae_steering": {"unreached": unreached}` added to its data when it is a
    closing event told by itself (a usage chunk, message_delta, response.completed), else
    `event` unchanged. The rest of its data is kept byte for byte."""
    return _with_report(event, unreached) if _is_closing(event) else event


async def reporting_unreached(
    events: AsyncIterator[Event], tally: SequenceTally
) -> AsyncIterator[Event]:
    """A steered stream's events, its closing event carrying how many of its sequences ended
    before their first steered position. `tally` stays open while the stream runs: a stream's
    sequences, and the Responses API's generator, start only then.

    A completion or chat stream without a usage chunk closes with the chunk that ends its last
    choice: each chunk that ends a choice waits for the next event, and gains the count when
    that event is `data: [DONE]` (every sequence has ended by then; with several choices, one's
    last chunk so waits for the next chunk of another)."""
    counted = _counted(events, tally)
    try:
        with reach_report.tallying(tally):
            async for event in counted:
                yield event
    finally:
        await counted.aclose()
        await close_stream(events)


async def _counted(events: AsyncIterator[Event], tally: SequenceTally) -> AsyncIterator[Event]:
    """`events`, the closing one with the tally's count (see reporting_unreached)."""
    ending_chunk: str | None = None
    try:
        async for event in events:
            if ending_chunk is not None:
                if event == _DONE:
                    ending_chunk = _with_report(ending_chunk, tally.unreached)
                yield ending_chunk
                ending_chunk = None
            if isinstance(event, str):
                if _ends_a_choice(event):
                    ending_chunk = event
                    continue
                event = with_unreached_count(event, tally.unreached)
            yield event
    except Exception:
        if ending_chunk is not None:  # its choice's last text, sent as it would have been
            yield ending_chunk
        raise
    if ending_chunk is not None:  # a stream cut short: no [DONE], so not the last
        yield ending_chunk
