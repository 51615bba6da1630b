"""The steering of Responses API responses, remembered by id for later fetches."""

from __future__ import annotations

import pytest

from sae_vllm.engine.reach_report import SequenceTally
from server.stored_responses import (
    StoredResponses,
    StoredSteering,
    field_of,
    remembering_response_id,
)
from stream_fakes import through

CREATED = (
    'event: response.created\ndata: {"response":{"id":"resp_7","status":"queued"},'
    '"sequence_number":0,"type":"response.created"}\n\n'
)
DELTA = 'event: response.output_text.delta\ndata: {"delta":" the"}\n\n'


def test_the_newest_responses_are_remembered_and_the_oldest_forgotten():
    stored = StoredResponses(capacity=3)
    steerings = [StoredSteering(i % 2 == 0, SequenceTally(ended=i)) for i in range(5)]
    for i, steering in enumerate(steerings):
        stored.remember(f"resp_{i}", steering)
    assert len(stored) == 3
    assert [stored.recall(f"resp_{i}") for i in range(5)] == [None, None, *steerings[2:]]
    stored.remember("resp_2", steerings[2])  # remembered again: now the newest
    stored.remember("resp_5", steerings[0])
    assert stored.recall("resp_2") is steerings[2] and stored.recall("resp_3") is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id": "resp_1", "status": "completed"}', "resp_1"),
        (memoryview(b'{"id": "resp_1"}'), "resp_1"),
        (b'{"id": 7}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"", None),
    ],
)
def test_a_bodys_id_is_read_only_when_it_is_a_string(body, expected):
    assert field_of(body, "id") == expected


def run(events: list[str]) -> tuple[list[str], list[str], list[bool]]:
    remembered: list[str] = []
    passed, closed = through(
        lambda stream: remembering_response_id(stream, remembered.append), events
    )
    return passed, remembered, closed


@pytest.mark.parametrize(
    ("events", "remembered"),
    [
        ([CREATED, DELTA, DELTA], ["resp_7"]),
        ([DELTA, CREATED], []),  # only the first event names the response
        (['data: {"error": {"message": "bad"}}\n\n'], []),
        (["event: response.created\ndata: not json\n\n"], []),
        ([], []),
    ],
)
def test_a_stream_names_its_response_in_its_first_event(events, remembered):
    assert run(events) == (events, remembered, [True])
