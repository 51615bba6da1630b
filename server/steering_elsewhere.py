"""Refuse a `steering` field where it cannot apply, so it is never silently ignored: on routes
other than the steered ones (in a JSON body or a form), in a websocket's messages, and as a
query parameter on any route.

vLLM's request models accept unknown fields, so without this a steered request sent to, say,
/v1/chat/completions/batch would come back unsteered with a 200; so would one whose spec went
into the URL (`extra_query` in the openai client) instead of the body, into the form of an
audio upload (`/v1/audio/transcriptions` on a speech model with a steerable decoder), or into
a `session.update` of vLLM's realtime transcription websocket (`/v1/realtime`). Likewise a
steering variant named in the body of a route that takes its model from a header instead
(SageMaker's `/invocations`), where it would run unsteered. A spec in the extra_args such a
route hands the engine (`vllm_xargs`; the tokens-in route's `sampling_params.extra_args`) would
be steered there without the steered routes' header and counts, and sae-vllm's internal
extra_args keys would steer it wrongly: both are refused too. And on the steered routes, a spec
object in `vllm_xargs` (where vLLM takes JSON text only) gets this 400 saying so, not vLLM's
validation dump (or, on `/invocations`, its "no suitable handler")."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match

from sae_vllm.config import EXTRA_ARGS_KEY, internal_keys_in
from sae_vllm.spec import SpecErrorReason

from . import metrics, rejections
from .errors import error_response_for
from .protocol import WebSocketErrorEvent
from .steering import STEERING_FIELD, XARGS, XARGS_FIELD, reserved_key_message

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_DENIAL_EXTENSION = "websocket.http.response"  # ASGI: the server can answer a handshake with HTTP
_POLICY_VIOLATION = 1008  # websocket close code
_MAX_CLOSE_REASON_BYTES = 123  # websocket protocol limit
_XARGS_OBJECT_MESSAGE = (
    f"{XARGS_FIELD}: must be the spec as JSON text (vLLM's {XARGS} hold strings, numbers and "
    f"lists of them); send a spec object as the top-level `{STEERING_FIELD}` field instead, "
    "or leave both out for no steering"
)


class RefuseSteeringElsewhere:
    """ASGI middleware: a POST body (JSON or form) with a top-level `steering` field on any
    path other than the steered ones, and a `steering` query parameter on any path (websocket
    handshakes included), get a 400; a websocket message (a JSON object) with a top-level
    `steering` field is answered with an error event and not passed on.

    A spec in the extra_args a body hands the engine (`vllm_xargs.sae_steering`, vLLM's
    low-level way, a form's `vllm_xargs` text included; the tokens-in route's
    `sampling_params.extra_args`) counts as the field on the other routes too, and sae-vllm's
    internal keys there get a 400 (`reserved`). `steered_paths` are the routes that apply the
    field; the routes in `self_checked_paths` admit or refuse it themselves (both are named in
    the refusal). Bodies on both pass, but for one whose `vllm_xargs.sae_steering` is an object (or
    a list holding one), which gets a 400 saying to send JSON text. `model_headers` maps a route
    to the header it takes its model from (its body's `model` is replaced): a body there whose
    `model` is one of `variants`, without that header, gets a 400 too. A body is refused only on
    a path one of `routes` serves (None: every path); others get the app's own answer (a 404,
    a redirect to the path with or without a trailing slash).

    JSON bodies in UTF-16 or UTF-32, which the routes read as they do UTF-8, are read so too."""

    def __init__(
        self,
        app: Callable,
        steered_paths: Collection[str],
        self_checked_paths: Collection[str] = (),
        model_headers: Mapping[str, str] | None = None,
        variants: Collection[str] = (),
        routes: Sequence[BaseRoute] | None = None,
    ):
        self.app = app
        self.passed_paths = frozenset(steered_paths) | frozenset(self_checked_paths)
        self.model_headers = {
            path: header.lower().encode("latin-1") for path, header in (model_headers or {}).items()
        }
        self.variants = frozenset(variants)
        self.routes = routes
        self.instead = (
            f"use {', '.join(sorted(self.passed_paths))}"
            if steered_paths
            else "this server's model does not generate text"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _query_names_steering(scope.get("query_string", b"")):
            message = (
                f"{STEERING_FIELD}: send it at the top level of the JSON body, not in the query"
            )
            await _refuse(message, rejections.MISPLACED, scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        model_header = self.model_headers.get(path) if self.variants else None
        if model_header is not None and model_header not in dict(scope["headers"]):
            body, receive = await _buffer(receive)
            model = (_json_object_naming(_as_utf8(body), "model") or {}).get("model")
            if isinstance(model, str) and model in self.variants:
                message = (
                    f"model: '{model}' is a steering variant, and {scope['path']} takes its model "
                    f"from the {model_header.decode()} header, not from the body"
                )
                await _refuse(message, rejections.MISPLACED, scope, receive, send, param="model")
                return
        if path in self.passed_paths:
            body, receive = await _buffer(receive)
            if _xargs_hold_a_spec_object(_as_utf8(body)):
                param = XARGS_FIELD
                reason = SpecErrorReason.INVALID_TYPE
                await _refuse(_XARGS_OBJECT_MESSAGE, reason, scope, receive, send, param)
                return
            await self.app(scope, receive, send)
            return
        body, replay = await _buffer(receive)
        found = await _steering_found(scope, body)
        if found is not None and self._routes(scope):
            param, reason = found
            if reason == rejections.RESERVED:
                message = reserved_key_message(param)
            else:
                message = f"{param}: not supported on {scope['path']} ({self.instead})"
            await _refuse(message, reason, scope, receive, send, param)
            return
        await self.app(scope, replay, send)

    def _routes(self, scope: Scope) -> bool:
        """Whether a route of the app serves the request's path (with any method)."""
        if self.routes is None:
            return True
        return any(route.matches(scope)[0] is not Match.NONE for route in self.routes)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _query_names_steering(scope.get("query_string", b"")):
            message = f"{STEERING_FIELD}: not supported in a websocket's query ({self.instead})"
            await _deny_handshake(message, rejections.MISPLACED, scope, receive, send)
            return
        refusal = WebSocketErrorEvent(
            error=f"{STEERING_FIELD}: not supported in messages of {scope['path']} "
            f"({self.instead}); this message was not processed",
            code=rejections.UNSUPPORTED_ROUTE,
            param=STEERING_FIELD,
        ).model_dump_json()

        async def receive_unsteered() -> Message:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive" or not _message_names_steering(message):
                    return message
                metrics.record_rejected(rejections.UNSUPPORTED_ROUTE)
                await send({"type": "websocket.send", "text": refusal})

        await self.app(scope, receive_unsteered, send)


async def _deny_handshake(
    message: str, reason: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """Refuse a websocket before it opens: a 400 with the error body where the server can send
    one, else a policy-violation close with the message as its reason."""
    await receive()  # websocket.connect
    if _DENIAL_EXTENSION in scope.get("extensions", {}):
        await _refuse(message, reason, scope, receive, send)
        return
    metrics.record_rejected(reason)
    close_reason = message.encode()[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
    await send({"type": "websocket.close", "code": _POLICY_VIOLATION, "reason": close_reason})


def _message_names_steering(message: Message) -> bool:
    text = message.get("text")
    return _json_object_names_steering(
        _as_utf8(message.get("bytes") or b"") if text is None else text
    )


async def _refuse(
    message: str,
    reason: str,
    scope: Scope,
    receive: Receive,
    send: Send,
    param: str = STEERING_FIELD,
) -> None:
    metrics.record_rejected(reason)
    response = error_response_for(
        _route_path(scope), HTTPStatus.BAD_REQUEST, message, param=param, reason=reason
    )
    await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app's routes match: the request's, less the app's root path where the
    request carries it (`--root-path` behind a proxy that does not strip it), as Starlette's
    routing takes it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


async def _buffer(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body, and a receive callable that hands it on unchanged."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


# How a name can be spelled without its letters: a JSON string's \u escapes, a URL's %XX
_ESCAPES = ("\\u", "%")
_ESCAPE_BYTES = tuple(escape.encode() for escape in _ESCAPES)


def _may_spell(text: str | bytes, name: str) -> bool:
    """Whether `text` may hold `name`, plainly or escaped: only such text need be parsed."""
    if isinstance(text, bytes):
        return name.encode() in text or any(escape in text for escape in _ESCAPE_BYTES)
    return name in text or any(escape in text for escape in _ESCAPES)


def _query_names_steering(query_string: bytes) -> bool:
    if not _may_spell(query_string, STEERING_FIELD):  # the usual case: no parsing
        return False
    return STEERING_FIELD in parse_qs(query_string.decode("latin-1"))


async def _steering_found(scope: Scope, body: bytes) -> tuple[str, str] | None:
    """Steering a request body carries where a route that does not steer would pass it on or
    drop it, as (param, reason): `steering` (in JSON or a form) or a spec in extra_args (see
    _extra_args_of), unsupported_route; another key sae-vllm keeps for itself there, reserved;
    None when it carries none."""
    if not _may_spell(body, STEERING_FIELD) and b"\x00" not in body[:4]:
        return None  # the usual case: no parsing (a UTF-16 or UTF-32 body has NULs up front)
    content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith(_FORM_CONTENT_TYPES):
        data = await _form_fields(scope, body)
    else:
        text = _as_utf8(body)
        names = (f'"{STEERING_FIELD}"', f'"{EXTRA_ARGS_KEY}')  # the second: internal keys too
        data = _json_object(text) if any(_may_spell(text, name) for name in names) else None
    if data is None:
        return None
    if STEERING_FIELD in data:
        return STEERING_FIELD, rejections.UNSUPPORTED_ROUTE
    for where, extra_args in _extra_args_of(data):
        if EXTRA_ARGS_KEY in extra_args:
            return f"{where}.{EXTRA_ARGS_KEY}", rejections.UNSUPPORTED_ROUTE
        reserved = internal_keys_in(extra_args)
        if reserved:
            return f"{where}.{sorted(reserved)[0]}", rejections.RESERVED
    return None


# Where a body hands the engine SamplingParams.extra_args: `vllm_xargs` (the OpenAI routes; in
# a form, the JSON text of the audio routes' field) and `sampling_params.extra_args` (vLLM's
# tokens-in /inference/v1/generate).
_EXTRA_ARGS_FIELDS = ((XARGS,), ("sampling_params", "extra_args"))


def _extra_args_of(data: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(field path, extra_args) for each place in `data` that hands the engine extra_args."""
    found = []
    for path in _EXTRA_ARGS_FIELDS:
        value: Any = data
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, str):  # a form's JSON text
            value = _json_object(value)
        if isinstance(value, Mapping):
            found.append((".".join(path), value))
    return found


def _as_utf8(body: bytes) -> bytes:
    """A JSON body in UTF-8: one in UTF-16 or UTF-32 (which the routes' JSON parser reads as it
    does UTF-8, telling them by their NULs) re-encoded, so that a name's letters show in it;
    any other body unchanged."""
    if b"\x00" not in body[:4]:
        return body
    encoding = json.detect_encoding(body)
    if not encoding.startswith(("utf-16", "utf-32")):
        return body
    try:
        return body.decode(encoding).encode("utf-8", "surrogatepass")
    except UnicodeError:  # not text: the route answers it
        return body


def _json_object(text: str | bytes) -> dict | None:
    """The JSON object `text` holds (None when it holds something else or is not JSON)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: vLLM answers it
        return None
    return data if isinstance(data, dict) else None


def _json_object_naming(text: str | bytes, field: str) -> dict | None:
    """The JSON object `text` holds, when its text may name `field` (None otherwise, or when it
    is not a JSON object); the usual text, which does not name it, is not parsed."""
    return _json_object(text) if _may_spell(text, f'"{field}"') else None


# A JSON string's escape of an ASCII character: how a key can be spelled without its letters
_JSON_ASCII_ESCAPE = re.compile(rb"\\u00[0-7][0-9a-fA-F]")


def _json_may_name(body: bytes, name: str) -> bool:
    """Whether JSON text `body` may hold `name`, plainly or escaped (unlike _may_spell, a '%'
    or a non-ASCII escape, common in prompts, is no reason to parse it)."""
    return name.encode() in body or _JSON_ASCII_ESCAPE.search(body) is not None


def _xargs_hold_a_spec_object(body: bytes) -> bool:
    """Whether JSON `body` has a spec object, or a list holding one, or null in vllm_xargs
    (vLLM would refuse each with a dump of its type errors)."""
    if not (_json_may_name(body, XARGS) and _json_may_name(body, EXTRA_ARGS_KEY)):
        return False  # the usual body: no parsing
    data = _json_object(body)
    xargs = data.get(XARGS) if data is not None else None
    if not (isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs):
        return False
    spec = xargs[EXTRA_ARGS_KEY]
    items = spec if isinstance(spec, list) else [spec]
    return any(item is None or isinstance(item, dict | list) for item in items)


def _json_object_names_steering(text: str | bytes) -> bool:
    data = _json_object_naming(text, STEERING_FIELD)  # audio chunks among the texts: no parsing
    return data is not None and STEERING_FIELD in data


async def _form_fields(scope: Scope, body: bytes) -> dict[str, Any] | None:
    """A form body's text fields (None when it is malformed: the route answers as it would)."""

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form()
    except (HTTPException, MultiPartException):
        return None
    try:
        return {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
