"""The refusal middleware on the steered routes themselves: a body reaches the route whole and
unchanged whatever its shape, and a spec object in `vllm_xargs` is refused before vLLM's
validation (which would answer with a dump of type errors). And where it sits: inside the
app's other middleware.

Driven at the ASGI level, with a small app that echoes the body it received in place of vLLM's
routes (they need an engine; test_server.py sends the same bodies to the real server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sae_vllm.server.steering_elsewhere import RefuseSteeringElsewhere

STEERED = "/v1/completions"
INVOCATIONS = "/invocations"
SPEC = {"edits": [{"feature": 3, "op": "set", "value": 4.0}]}


class EchoApp:
    """Answers 200 with the body it read, and records the message read after it."""

    def __init__(self) -> None:
        self.after_body: list[dict] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.after_body.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"".join(chunks)})


def post(path: str, parts: list[bytes], headers: list[tuple[bytes, bytes]] = ()) -> tuple:
    """POST `parts` (the body, in that many messages) through the middleware: (status, body,
    what the app read after the body)."""
    app = EchoApp()
    middleware = RefuseSteeringElsewhere(
        app,
        steered_paths=(STEERED,),
        self_checked_paths=(INVOCATIONS,),
        model_headers={INVOCATIONS: "X-Amzn-SageMaker-Adapter-Identifier"},
        variants=("a-variant",),
    )
    incoming = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ] + [{"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers]}  # fmt: skip
    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, app.after_body


def body_of(data: Any) -> bytes:
    return json.dumps(data).encode()


PASSING = [
    body_of({"prompt": "100% sure", "vllm_xargs": {"sae_steering": json.dumps(SPEC)}}),
    body_of({"prompt": "hi", "vllm_xargs": {"sae_steering": ["a", 1]}}),  # vLLM's list of scalars
    body_of({"prompt": "hi", "vllm_xargs": 5, "sae_steering": {}}),  # not where vLLM reads xargs
    b"vllm_xargs sae_steering: not JSON",
    b'{"vllm_xargs": {"sae_steering": ' + b"[" * 5000 + b"]" * 5000 + b"}}",  # too deep to parse
    b"",
]


@pytest.mark.parametrize("path", [STEERED, INVOCATIONS])
@pytest.mark.parametrize("body", PASSING)
def test_every_other_body_reaches_the_route_whole_in_any_number_of_messages(path, body):
    for parts in ([body], [body[:7], body[7:20], body[20:]]):
        status, echoed, after = post(path, parts)
        assert (status, echoed) == (200, body)
        assert after == [{"type": "http.disconnect"}]  # the client's next message, as sent


@pytest.mark.parametrize("path", [STEERED, INVOCATIONS])
@pytest.mark.parametrize(
    "xargs_spec", [SPEC, [SPEC], ["a", [1]]], ids=["object", "list-of-objects", "nested-list"]
)
def test_a_spec_object_in_vllm_xargs_is_refused_naming_the_field(path, xargs_spec):
    body = body_of({"prompt": "hi", "vllm_xargs": {"sae_steering": xargs_spec}})
    status, answer, _ = post(path, [body[:10], body[10:]])
    error = json.loads(answer)["error"]
    assert status == 400 and error["reason"] == "invalid_type"
    assert error["param"] == "vllm_xargs.sae_steering" and "as JSON text" in error["message"]


def test_a_key_spelled_with_json_escapes_is_read_as_vllm_reads_it():
    escaped = b'{"vllm\\u005fxargs": {"sae\\u005fsteering": {"edits": []}}}'
    assert post(STEERED, [escaped])[0] == 400


def test_the_invocations_model_header_check_and_the_xargs_check_read_one_body():
    """/invocations buffers its body for the variant check first, then for this one."""
    header = [(b"x-amzn-sagemaker-adapter-identifier", b"m")]
    body = body_of({"model": "a-variant", "vllm_xargs": {"sae_steering": SPEC}})

    def reason(answer: tuple) -> str:
        return json.loads(answer[1])["error"]["reason"]

    assert reason(post(INVOCATIONS, [body[:5], body[5:]])) == "misplaced"  # the variant in it
    assert reason(post(INVOCATIONS, [body], header)) == "invalid_type"  # the header given
    plain = body_of({"model": "a-variant", "prompt": "hi"})
    assert post(INVOCATIONS, [plain[:5], plain[5:]], header)[:2] == (200, plain)


class Recording:
    """A middleware that records its name in `seen` as a request passes it."""

    def __init__(self, app: Any, name: str, seen: list[str]) -> None:
        self.app, self.name, self.seen = app, name, seen

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append(self.name)
        await self.app(scope, receive, send)


@pytest.mark.parametrize("built", [False, True], ids=["stack-not-built", "stack-built"])
def test_the_added_middleware_runs_inside_the_apps_own(built):
    """vLLM's app has built its middleware stack by the time sae-vllm adds its own (test_server:
    the API key is checked first); either way the new one runs last, before the routes."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sae_vllm.server.middleware_order import add_innermost_middleware

    seen: list[str] = []
    app = FastAPI()
    app.get("/ping")(lambda: seen.append("route") or "pong")
    app.add_middleware(Recording, name="vllm's first", seen=seen)
    app.add_middleware(Recording, name="vllm's last", seen=seen)
    if built:
        app.middleware_stack = app.build_middleware_stack()
    add_innermost_middleware(app, Recording, {"name": "added", "seen": seen})
    assert TestClient(app).get("/ping").json() == "pong"
    assert seen == ["vllm's last", "vllm's first", "added", "route"]
