"""LoRA adapters loaded at runtime beside steering variants (VLLM_ALLOW_RUNTIME_LORA_UPDATING):
an adapter may not take a variant's name, which would route its requests to the variant and
run them without the adapter; under any other name it loads and serves as in vLLM."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tiny_model import LORA_RANK, write_lora_and_merged

pytestmark = pytest.mark.server

MODEL = "tiny"
VARIANT = "tiny-steered"
SPEC = {"edits": [{"sae": "res", "feature": 3, "op": "set", "value": 8.0}]}
PROMPT = "w5 w17 w42 w99 w7"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    from tiny_model import build_tiny_llama, write_random_sae

    root = tmp_path_factory.mktemp("server-lora")
    model = build_tiny_llama(root / "model")
    write_random_sae(root / "sae", "relu", layer=1, d_sae=256, seed=1)
    write_lora_and_merged(model, root / "adapter", root / "merged")
    return {"root": root, "model": model, "sae": root / "sae", "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def server(artifacts):
    from sae_vllm.server.process import ServerProcess

    args = [
        str(artifacts["model"]), "--served-model-name", MODEL,
        "--sae", f"res={artifacts['sae']}@1",
        "--steering-variant", f"{VARIANT}={json.dumps(SPEC)}",
        "--enable-lora", "--max-lora-rank", str(LORA_RANK), "--max-loras", "1",
        "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--kv-cache-memory-bytes", str(128 << 20),
    ]  # fmt: skip
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with ServerProcess(args, artifacts["root"] / "server.log", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def complete(client: openai.OpenAI, model: str, **body) -> str:
    response = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, **body
    )
    return response.choices[0].text


def test_an_adapter_may_not_take_a_steering_variants_name(server, client, artifacts):
    steered = complete(client, MODEL, extra_body={"steering": SPEC})
    assert steered != complete(client, MODEL)
    assert complete(client, VARIANT) == steered
    # SageMaker's adapter route loads through the same check
    sagemaker = {"name": VARIANT, "src": str(artifacts["adapter"])}
    response = httpx.post(f"{server.base_url}/adapters", json=sagemaker, timeout=60)
    assert response.status_code == 400, response.text
    load = {"lora_name": VARIANT, "lora_path": str(artifacts["adapter"])}
    response = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=load, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "InvalidUserInput"
    assert f"'{VARIANT}' conflicts with a steering variant" in error["message"]
    assert complete(client, VARIANT) == steered  # still the variant, nothing loaded
    assert [card.id for card in client.models.list().data].count(VARIANT) == 1


def test_an_adapter_under_another_name_loads_and_serves(server, client, artifacts):
    load = {"lora_name": "adapter", "lora_path": str(artifacts["adapter"])}
    response = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=load, timeout=60)
    assert response.status_code == 200, response.text
    adapted = complete(client, "adapter")
    assert adapted != complete(client, MODEL)  # the adapter changes the text
    assert complete(client, "adapter", extra_body={"steering": SPEC}) != adapted
