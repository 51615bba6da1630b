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

import httpx
import pytest
from starlette.routing import Route

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


def post(
    path: str,
    parts: list[bytes],
    headers: list[tuple[bytes, bytes]] = (),
    routes: list[Route] | None = None,
    root_path: str = "",
) -> tuple:
    """POST `parts` (the body, in that many messages) through the middleware: (status, body,
    what the app read after the body)."""
    app = EchoApp()
    middleware = RefuseSteeringElsewhere(
        app,
        steered_paths=(STEERED,),
        self_checked_paths=(INVOCATIONS,),
        model_headers={INVOCATIONS: "X-Amzn-SageMaker-Adapter-Identifier"},
        variants=("a-variant",),
        routes=routes,
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

    if not any(name == b"content-type" for name, _ in headers):
        headers = [(b"content-type", b"application/json"), *headers]
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": list(headers), "root_path": root_path}  # fmt: skip
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
    "xargs_spec",
    [SPEC, [SPEC], ["a", [1]], None],
    ids=["object", "list-of-objects", "nested-list", "null"],
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


OTHER = "/v1/chat/completions/batch"  # a route that generates but does not steer


def error_of(answer: tuple) -> dict:
    return json.loads(answer[1])["error"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_json_body_in_utf16_or_utf32_is_read_as_the_routes_read_it(encoding):
    """The checks looked for the field's ASCII bytes only: such a body passed unread, and a
    spec in it ran unsteered, or on a route that does not steer, steered uncounted."""

    def encoded(data: dict) -> bytes:
        return json.dumps(data).encode(encoding)

    error = error_of(post(OTHER, [encoded({"messages": [], "steering": SPEC})]))
    assert (error["reason"], error["param"]) == ("unsupported_route", "steering")
    error = error_of(post(INVOCATIONS, [encoded({"model": "a-variant", "prompt": "hi"})]))
    assert error["reason"] == "misplaced"
    error = error_of(post(STEERED, [encoded({"vllm_xargs": {"sae_steering": SPEC}})]))
    assert error["reason"] == "invalid_type"
    plain = encoded({"prompt": "steering", "vllm_xargs": {"sae_steering": json.dumps(SPEC)}})
    assert post(STEERED, [plain])[:2] == (200, plain)
    binary = b"\x00\x00\xff\xfe" + bytes(range(256)) * 4  # not text in any encoding: passes
    assert post(OTHER, [binary])[:2] == (200, binary)


def test_a_spec_in_vllm_xargs_is_refused_on_a_route_that_does_not_steer():
    """vLLM hands a route's vllm_xargs to the engine, which steered it without a header or a
    count; a top-level `steering` there was refused already."""
    body = body_of({"messages": [], "vllm_xargs": {"sae_steering": json.dumps(SPEC)}})
    error = error_of(post(OTHER, [body]))
    assert (error["reason"], error["param"]) == ("unsupported_route", "vllm_xargs.sae_steering")
    assert error["message"] == (
        f"vllm_xargs.sae_steering: not supported on {OTHER} (use {INVOCATIONS}, {STEERED})"
    )
    other_keys = body_of({"messages": [], "vllm_xargs": {"steering": 2, "my_plugin": 1}})
    assert post(OTHER, [other_keys])[:2] == (200, other_keys)
    reserved = body_of({"messages": [], "vllm_xargs": {"sae_steering_generation_start": 3}})
    error = error_of(post(OTHER, [reserved]))
    assert (error["param"], error["reason"]) == (
        "vllm_xargs.sae_steering_generation_start",
        "reserved",
    )


def test_a_spec_in_sampling_params_extra_args_is_refused_on_the_tokens_in_route():
    """vLLM's /inference/v1/generate takes SamplingParams whole, extra_args included."""
    generate = "/inference/v1/generate"
    for extra_args, param, reason in [
        ({"sae_steering": json.dumps(SPEC)}, "sampling_params.extra_args.sae_steering",
         "unsupported_route"),
        ({"sae_steering_drops_generation": True},
         "sampling_params.extra_args.sae_steering_drops_generation", "reserved"),
    ]:  # fmt: skip
        body = body_of({"token_ids": [1, 2], "sampling_params": {"extra_args": extra_args}})
        error = error_of(post(generate, [body]))
        assert (error["param"], error["reason"]) == (param, reason)
    plain = body_of({"token_ids": [1, 2], "sampling_params": {"extra_args": {"x": "steering"}}})
    assert post(generate, [plain])[:2] == (200, plain)


def test_the_app_root_path_is_left_out_of_the_paths_the_checks_compare():
    """With --root-path behind a proxy that keeps the prefix, the steered route itself said
    "steering: not supported on /api/v1/completions (use /v1/completions)"."""
    body = body_of({"prompt": "hi", "steering": SPEC})
    assert post(f"/api{STEERED}", [body], root_path="/api")[:2] == (200, body)
    error = error_of(post(f"/api{OTHER}", [body], root_path="/api"))
    assert error["reason"] == "unsupported_route"
    assert post(f"/apix{STEERED}", [body], root_path="/api")[0] == 400  # not under the root


def test_a_path_no_route_serves_gets_the_apps_answer_not_the_refusal():
    """Without a route there, the app answers 404 (or redirects a trailing slash to the route,
    where the spec is steered): the steering refusal would say the wrong thing."""
    routes = [Route(OTHER, lambda request: None, methods=["POST"])]
    body = body_of({"prompt": "hi", "steering": SPEC})
    for path in (f"{STEERED}/", "/v1//completions", "/v1/embeddings"):
        assert post(path, [body], routes=routes)[:2] == (200, body)  # the echo app's answer
    assert error_of(post(OTHER, [body], routes=routes))["reason"] == "unsupported_route"
    assert post(OTHER, [body])[0] == 400  # no routes given: every path is served


TRANSCRIPTIONS = "/v1/audio/transcriptions"  # a speech model's form route (none runs here)


@pytest.mark.parametrize(
    ("multipart", "name"), [(True, "steering"), (False, "steering"), (False, "%73teering")]
)
def test_steering_in_a_form_is_refused_on_a_route_that_takes_forms(multipart, name):
    """Form routes (vLLM's audio uploads) never read `steering`: they would ignore it."""
    routes = [Route(TRANSCRIPTIONS, lambda request: None, methods=["POST"])]
    audio = {"file": ("clip.wav", b"RIFF\x00\x00\x00\x00WAVE", "audio/wav")}
    if multipart:
        request = httpx.Request("POST", "http://x", data={name: json.dumps(SPEC)}, files=audio)
    else:
        content = f"model=m&{name}={json.dumps(SPEC)}".encode()
        request = httpx.Request(
            "POST",
            "http://x",
            content=content,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    headers = [(b"content-type", request.headers["content-type"].encode())]
    body = request.read()
    error = error_of(post(TRANSCRIPTIONS, [body], headers, routes=routes))
    assert (error["param"], error["reason"]) == ("steering", "unsupported_route")
    xargs = {"vllm_xargs": json.dumps({"sae_steering": json.dumps(SPEC)})}  # the field's JSON
    request = httpx.Request("POST", "http://x", data=xargs, files=audio if multipart else None)
    form_headers = [(b"content-type", request.headers["content-type"].encode())]
    error = error_of(post(TRANSCRIPTIONS, [request.read()], form_headers, routes=routes))
    assert (error["param"], error["reason"]) == ("vllm_xargs.sae_steering", "unsupported_route")
    plain = httpx.Request("POST", "http://x", data={"prompt": "steering"}, files=audio)
    plain_headers = [(b"content-type", plain.headers["content-type"].encode())]
    assert post(TRANSCRIPTIONS, [plain.read()], plain_headers, routes=routes)[0] == 200
