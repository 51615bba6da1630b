"""The steering of Responses API responses a client may fetch again (`GET /v1/responses/{id}`,
how a background response is polled or its stream resumed), so each fetch can say it too."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sae_vllm.engine.reach_report import SequenceTally

from .event_streams import Event, on_first_event

REMEMBERED = 10_000  # the newest responses; vLLM's own store keeps every response it stores
FINISHED = ("completed", "incomplete")  # statuses of a response whose sequences have all ended


@dataclass(frozen=True)
class StoredSteering:
    """Whether a response was steered, and its sequences (counted as they end)."""

    steered: bool
    sequences: SequenceTally


class StoredResponses:
    """The steering of the newest responses, by response id."""

    def __init__(self, capacity: int = REMEMBERED):
        self._capacity = capacity
        self._by_id: OrderedDict[str, StoredSteering] = OrderedDict()

    def remember(self, response_id: str, steering: StoredSteering) -> None:
        self._by_id[response_id] = steering
        self._by_id.move_to_end(response_id)
        while len(self._by_id) > self._capacity:
            self._by_id.popitem(last=False)

    def recall(self, response_id: str) -> StoredSteering | None:
        return self._by_id.get(response_id)

    def __len__(self) -> int:
        return len(self._by_id)


def field_of(body: bytes | memoryview, name: str) -> str | None:
    """A response body's top-level string field `name`; None when it has none."""
    value = _json_object(body).get(name)
    return value if isinstance(value, str) else None


def remembering_response_id(
    events: AsyncIterator[Event], remember: Callable[[str], None]
) -> AsyncIterator[Event]:
    """A Responses API stream's events, unchanged; `remember(id)` with the response's id, which
    its first event (`response.created`) carries."""

    def first_event(event: Event) -> None:
        text = event.decode(errors="replace") if isinstance(event, bytes) else event
        response = _json_object(text.split("data: ", 1)[-1]).get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            remember(response["id"])

    return on_first_event(events, first_event)


def _json_object(text: str | bytes | memoryview) -> dict:
    try:
        data = json.loads(bytes(text) if isinstance(text, memoryview) else text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
