"""A `steering` field on a websocket (vLLM's realtime transcription route) is refused, never
silently ignored.

`/v1/realtime` is registered only for realtime speech models, which cannot run here, so these
tests mount vLLM's own realtime router on a small app behind the refusal middleware, with a
stand-in for its serving object (a mock of the one speech-model part: it records which models
vLLM's handler asked about). The handshake refusal is also checked on the real server in
test_server.py."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient, WebSocketDenialResponse

from sae_vllm.server import metrics, rejections
from sae_vllm.server.steering_elsewhere import RefuseSteeringElsewhere

MODEL = "speech-model"
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions")
SPEC = {"edits": [{"feature": 3, "op": "set", "value": 4.0}]}
# vLLM answers an unknown event with an error; sent after a message that may get no answer, it
# makes sure the test reads something (a missing refusal fails instead of waiting forever).
SENTINEL = {"type": "no.such.event"}


class StandInRealtimeServing:
    """Mock of vLLM's OpenAIServingRealtime (needs a speech model): answers the model check."""

    def __init__(self) -> None:
        self.models_checked: list[str | None] = []

    def _is_model_supported(self, model: str | None) -> bool:
        self.models_checked.append(model)
        return True


@pytest.fixture()
def realtime() -> tuple[TestClient, StandInRealtimeServing]:
    from vllm.entrypoints.speech_to_text.realtime.api_router import router

    app = FastAPI()
    app.include_router(router)
    serving = StandInRealtimeServing()
    app.state.openai_serving_realtime = serving
    app.add_middleware(RefuseSteeringElsewhere, steered_paths=STEERED_PATHS)
    return TestClient(app), serving


def _rejected(reason: str) -> float:
    return metrics.REJECTED.labels(reason=reason)._value.get()


def test_a_steered_session_update_is_refused_and_not_processed(realtime):
    client, serving = realtime
    before = _rejected(rejections.UNSUPPORTED_ROUTE)
    with client.websocket_connect("/v1/realtime") as socket:
        assert socket.receive_json()["type"] == "session.created"
        socket.send_json({"type": "session.update", "model": MODEL, "steering": SPEC})
        socket.send_json(SENTINEL)
        error = socket.receive_json()
        assert error["type"] == "error"
        assert (error["code"], error["param"]) == ("unsupported_route", "steering")
        assert "not supported in messages of /v1/realtime" in error["error"]
        assert "/v1/completions" in error["error"]
        assert socket.receive_json()["code"] == "unknown_event"
        # vLLM never saw the update: its commit says no model was set.
        socket.send_json({"type": "input_audio_buffer.commit"})
        assert socket.receive_json()["code"] == "model_not_validated"
        assert serving.models_checked == []
        # The same update without the field goes through, and the connection stays usable.
        socket.send_json({"type": "session.update", "model": MODEL})
        socket.send_json(SENTINEL)
        assert socket.receive_json()["code"] == "unknown_event"
        assert serving.models_checked == [MODEL]
    assert _rejected(rejections.UNSUPPORTED_ROUTE) == before + 1


def test_a_steering_field_spelled_with_json_escapes_is_refused_too(realtime):
    client, serving = realtime
    escaped = json.dumps({"type": "session.update", "model": MODEL, "steering": SPEC})
    escaped = escaped.replace('"steering"', '"\\u0073teering"')
    assert json.loads(escaped)["steering"] == SPEC
    with client.websocket_connect("/v1/realtime") as socket:
        assert socket.receive_json()["type"] == "session.created"
        socket.send_text(escaped)
        socket.send_json(SENTINEL)  # answered, so a missed refusal fails instead of waiting
        error = socket.receive_json()
        assert (error["code"], error["param"]) == ("unsupported_route", "steering")
        assert socket.receive_json()["code"] == "unknown_event"
        socket.send_json({"type": "session.update", "model": "caf\u00e9"})  # escapes alone pass
        socket.send_json(SENTINEL)
        assert socket.receive_json()["code"] == "unknown_event"
    assert serving.models_checked == ["caf\u00e9"]


def test_messages_that_only_mention_steering_pass(realtime):
    client, serving = realtime
    messages = [
        {"type": "session.update", "model": "steering"},  # the word as a value
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00\x01").decode()},
        SENTINEL | {"nested": {"steering": SPEC}},  # not at the top level
    ]
    with client.websocket_connect("/v1/realtime") as socket:
        socket.receive_json()
        for message in messages:
            socket.send_json(message)
        assert socket.receive_json()["code"] == "unknown_event"
    assert serving.models_checked == ["steering"]


def run_middleware(app, query_string: bytes, frames: list[dict[str, Any]]) -> list[dict]:
    """Drive the middleware in front of `app` through one websocket whose client sends
    `frames`, without a server (and so without ASGI extensions); returns what it sent."""
    incoming = iter(frames)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/realtime", "query_string": query_string}
    asyncio.run(RefuseSteeringElsewhere(app, STEERED_PATHS)(scope, receive, send))
    return sent


def test_binary_frames_are_checked_too():
    # vLLM's realtime handler reads text frames only (a binary one ends its loop), so this is
    # checked at the ASGI level: the app is handed only the frames without the field.
    steered = json.dumps({"type": "session.update", "steering": SPEC}).encode()
    plain = json.dumps({"type": "session.update", "model": "steering"}).encode()
    handed: list[dict[str, Any]] = []

    async def app(scope, receive, send):
        while (message := await receive())["type"] != "websocket.disconnect":
            handed.append(message)

    frames = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "bytes": steered},
        {"type": "websocket.receive", "bytes": plain},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent = run_middleware(app, b"", frames)
    assert [message.get("bytes") for message in handed] == [None, plain]
    assert len(sent) == 1 and json.loads(sent[0]["text"])["code"] == "unsupported_route"


def test_steering_in_a_websocket_query_is_refused_before_it_opens(realtime):
    client, _ = realtime
    before = _rejected(rejections.MISPLACED)
    steered_url = "/v1/realtime?steering=" + json.dumps(SPEC)
    with pytest.raises(WebSocketDenialResponse) as info, client.websocket_connect(steered_url):
        pass
    assert info.value.status_code == 400
    error = info.value.json()["error"]
    assert (error["reason"], error["param"]) == ("misplaced", "steering")
    assert _rejected(rejections.MISPLACED) == before + 1
    with client.websocket_connect("/v1/realtime?not_steering=1") as socket:
        assert socket.receive_json()["type"] == "session.created"


def test_without_http_denial_the_handshake_is_closed_with_the_reason():
    # A server without ASGI's websocket.http.response extension cannot answer with a 400.
    async def never_called(scope, receive, send):
        raise AssertionError("the app was reached")

    sent = run_middleware(never_called, b"steering=x", [{"type": "websocket.connect"}])
    assert len(sent) == 1 and sent[0]["type"] == "websocket.close"
    assert sent[0]["code"] == 1008 and sent[0]["reason"].startswith("steering: not supported")
    assert len(sent[0]["reason"].encode()) <= 123
