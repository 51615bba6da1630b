"""Steering a request whose prompt comes as embeddings (`enable_prompt_embeds`).

A prompt given as the model's own token embeddings must be steered exactly as the same prompt
given as token ids, in every scope, in one batch with both, and equal the HF float64
reference; the 200-token prompt is prefilled in chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_harness import (
    PROMPTS,
    chosen_logprobs,
    make_llm,
    steered_params,
    stop_llm,
    tiny_artifacts,
)
from hf_reference import Edit, HFReference

pytestmark = pytest.mark.engine

MAX_TOKENS = 6
EDIT = ("jumprelu", 4, "add", 6.0)
SCOPES = ["generated", "all", "prompt"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("prompt-embeds"))


@pytest.fixture(scope="module")
def reference(artifacts):
    return HFReference(artifacts.model_dir)


@pytest.fixture(scope="module")
def llm(artifacts):
    engine = make_llm(artifacts, in_process=True, enable_prompt_embeds=True)
    yield engine
    stop_llm(engine)


def token_embeddings(artifacts, prompt: list[int]) -> torch.Tensor:
    from safetensors.torch import load_file

    table = load_file(str(artifacts.model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    return table[torch.tensor(prompt)]


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]], ids=["5-tokens", "200-tokens"])
def test_prompt_embeddings_are_steered_like_token_ids(llm, artifacts, reference, prompt):
    from vllm import SamplingParams

    sae, feature, op, value = EDIT
    unsteered = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    params = [unsteered] + [
        steered_params(artifacts, [EDIT], scope, max_tokens=MAX_TOKENS, logprobs=0)
        for scope in SCOPES
    ]
    as_ids = {"prompt_token_ids": prompt}
    as_embeds = {"prompt_embeds": token_embeddings(artifacts, prompt)}
    outputs = llm.generate(
        [as_embeds, as_ids] * len(params),
        [p for p in params for _ in range(2)],
        use_tqdm=False,
    )
    pairs = list(zip(outputs[::2], outputs[1::2], strict=True))
    for scope, (from_embeds, from_ids) in zip([None, *SCOPES], pairs, strict=True):
        edits = [Edit(artifacts.saes[sae], feature, op, value)] if scope else []
        want, _ = reference.greedy(prompt, MAX_TOKENS, edits, scope or "all")
        assert list(from_embeds.outputs[0].token_ids) == want, scope
        assert list(from_ids.outputs[0].token_ids) == want, scope
        np.testing.assert_allclose(
            chosen_logprobs(from_embeds.outputs[0]),
            chosen_logprobs(from_ids.outputs[0]),
            atol=1e-5,
            err_msg=str(scope),
        )
    unsteered_logprobs = chosen_logprobs(pairs[0][0].outputs[0])
    for scope, (from_embeds, _) in zip(SCOPES, pairs[1:], strict=True):
        steered = chosen_logprobs(from_embeds.outputs[0])
        changed = list(from_embeds.outputs[0].token_ids) != list(pairs[0][0].outputs[0].token_ids)
        assert changed or np.abs(steered - unsteered_logprobs).max() > 1e-2, scope
