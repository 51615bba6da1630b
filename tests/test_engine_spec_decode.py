"""Steering under speculative decoding: draft tokens the target model verifies are steered like
any other token, so outputs equal the HF float64 reference decoded one token at a time.

The engine runs vLLM's n-gram proposer (3 draft tokens per step); the prompts repeat short
patterns so that many drafts are proposed and accepted."""

from __future__ import annotations

import pytest

from engine_harness import PROMPTS, make_llm, steered_params, stop_llm, tiny_artifacts
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 40
SPECULATIVE = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
CASES = [
    (("relu", 5, "set", 6.0, "generated"), [1, *([5, 6, 7, 8] * 10)]),
    (("jumprelu", 3, "add", 3.0, "all"), PROMPTS[1]),
    (("topk", 7, "scale", 2.0, "prompt"), [1, *([9, 10, 11] * 12)]),
    (("relu", 9, "ablate", None, "all"), PROMPTS[0]),
    (None, [1, *([20, 21] * 15)]),  # unsteered, in the same batch
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("spec-decode"))


@pytest.fixture(scope="module")
def llm(artifacts):
    engine = make_llm(
        artifacts, in_process=True, speculative_config=SPECULATIVE, disable_log_stats=False
    )
    yield engine
    stop_llm(engine)


def accepted_draft_tokens(llm) -> int:
    metrics = llm.get_metrics()
    return int(sum(m.value for m in metrics if m.name == "vllm:spec_decode_num_accepted_tokens"))


def test_verified_draft_tokens_are_steered(llm, artifacts):
    from vllm import SamplingParams

    params = [
        steered_params(artifacts, [case[:4]], case[4], max_tokens=MAX_TOKENS, ignore_eos=True)
        if case
        else SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for case, _ in CASES
    ]
    before = accepted_draft_tokens(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for _, p in CASES], params, use_tqdm=False)
    assert accepted_draft_tokens(llm) - before >= 20, "too few drafts accepted to test anything"

    reference = HFReference(artifacts.model_dir)
    for (case, prompt), output in zip(CASES, outputs, strict=True):
        tokens = list(output.outputs[0].token_ids)
        unsteered, _ = reference.greedy(prompt, MAX_TOKENS, [], "generated")
        if case is None:
            assert tokens == unsteered
            continue
        sae, feature, op, value, apply_to = case
        edit = Edit(artifacts.saes[sae], feature, op, value)
        expected, _ = reference.greedy(prompt, MAX_TOKENS, [edit], apply_to)
        assert tokens == expected, case
        assert tokens != unsteered, f"{case}: steering has no visible effect"
