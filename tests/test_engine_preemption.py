"""Steering survives preemption: a request evicted for KV space and recomputed stays steered.

The engine gets 6 KV blocks of 32 tokens, so six 100-token requests cannot run together: vLLM
preempts some, frees their rows (the worker sees them in `preempted_req_ids`) and later
recomputes their prompt and generated tokens as a fresh prefill. Every steered token must come
out as if the request had run alone, and equal the HF float64 reference; with and without
vLLM's async scheduling (its default on CUDA), under which a request can be preempted with
the output of a step still to come."""

from __future__ import annotations

import pytest

from engine_harness import (
    ENGINE_MODES,
    make_llm,
    settled_row_stats,
    steered_params,
    stop_llm,
    tiny_artifacts,
)
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine

PROMPT_LEN = 40
MAX_TOKENS = 60
KV_BLOCKS = 6  # 192 tokens; one request needs 4 blocks, six need 24
CASES = [
    ("relu", 3, "set", 12.0, "all"),
    ("jumprelu", 4, "add", 6.0, "all"),
    ("topk", 5, "scale", 3.0, "generated"),
    ("relu", 6, "set", 12.0, "generated"),
    ("jumprelu", 7, "add", 6.0, "prompt"),
    ("topk", 8, "scale", 3.0, "prompt"),
]
PROMPTS = [[1, *[(i * 13 + j * 7) % 300 + 4 for i in range(PROMPT_LEN)]] for j in range(len(CASES))]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("preemption"))


@pytest.fixture(scope="module", params=["eager", "async"])
def llm(artifacts, request):
    engine = make_llm(
        artifacts,
        in_process=True,
        **ENGINE_MODES[request.param],
        num_gpu_blocks_override=KV_BLOCKS,
        block_size=32,  # the CPU attention backend needs a multiple of 32
        max_model_len=128,
        max_num_seqs=8,
        disable_log_stats=False,  # for vllm:num_preemptions
    )
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def expected(artifacts) -> list[list[int]]:
    """Each case's tokens from the HF float64 reference, computed once for both engines."""
    reference = HFReference(artifacts.model_dir)
    return [
        reference.greedy(
            PROMPTS[i], MAX_TOKENS, [Edit(artifacts.saes[sae], feature, op, value)], apply_to
        )[0]
        for i, (sae, feature, op, value, apply_to) in enumerate(CASES)
    ]


def preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def generate(llm, prompts, params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_preempted_steered_requests_stay_steered(llm, artifacts, expected):
    from vllm import SamplingParams

    params = [
        steered_params(artifacts, [case[:4]], case[4], max_tokens=MAX_TOKENS, ignore_eos=True)
        for case in CASES
    ]
    before = preemptions(llm)
    together = generate(llm, PROMPTS, params)
    assert preemptions(llm) - before >= 2, "the KV cache was large enough: nothing was preempted"

    unsteered = generate(
        llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    )
    for i in range(len(CASES)):
        alone = generate(llm, [PROMPTS[i]], [params[i]])[0]
        assert together[i] == alone, f"case {i}: preempted run differs from the solo run"
        assert together[i] == expected[i], f"case {i}: differs from the float64 reference"
        assert together[i] != unsteered[i], f"case {i}: steering has no visible effect"
    stats = settled_row_stats(llm)
    assert stats["rows_in_use"] == 0, stats
