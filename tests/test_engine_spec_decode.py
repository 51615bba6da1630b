"""Steering under speculative decoding: draft tokens the target model verifies are steered like
any other token, so outputs equal the HF float64 reference decoded one token at a time, whatever
proposes the drafts.

Five proposers, each on an engine of its own:
- vLLM's n-gram proposer (synchronous scheduling: vLLM runs n-gram under async scheduling only
  on GPUs); the prompts repeat short patterns so that many drafts are proposed and accepted.
- a draft model, here the target model itself, which is not steered (the SAEs belong to the
  target's layers): unsteered requests accept its drafts, steered ones reject those their
  steering changes.
- an EAGLE head that drafts from the target's last hidden state, and an EAGLE-3 head that
  drafts from the outputs of its layers 0-2, both of which steering has already changed.
- multi-token prediction: a GLM-4.5-style MoE target whose checkpoint holds an MTP layer, which
  drafts from the target's last hidden state (this engine serves that model, not the Llama).
The EAGLE heads and the MTP layer have random weights (tests/tiny_model.py), so the target
rejects most of their drafts: they show those proposers running beside steering; the n-gram
proposer and the draft model show accepted drafts steered.
All but the n-gram engine run vLLM's async scheduling (its default on CUDA, where those
proposers are the ones it supports; tests/cpu_async_scheduling.py): the engine schedules the
next step, its drafts included, before it has the last one's output. One more n-gram engine,
with a token budget of 2, makes the scheduler leave a steered request out of steps and then
restore its batch, which must not cost it its steering."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_harness import (
    ENGINE_MODES,
    PROMPTS,
    make_llm,
    plugin_log,
    steered_params,
    stop_llm,
    tiny_artifacts,
)
from hf_reference import Edit, HFReference, Span, scope_span
from tiny_model import build_tiny_eagle_head, build_tiny_glm4_moe_with_mtp

pytestmark = pytest.mark.engine

MAX_TOKENS = 40
DRAFT_TOKENS = 3
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3}
CASES = [
    (("relu", 5, "set", 6.0, "generated"), [1, *([5, 6, 7, 8] * 10)]),
    (("jumprelu", 3, "add", 3.0, "all"), PROMPTS[1]),
    (("topk", 1, "scale", 3.0, "prompt"), [1, *([9, 10, 11] * 12)]),
    (("relu", 9, "ablate", None, "all"), PROMPTS[0]),
    (None, [1, *([20, 21] * 15)]),  # unsteered, in the same batch
]
# proposer -> the least number of accepted draft tokens its batch must show (random drafters are
# rarely right; their drafts are proposed and verified all the same)
MIN_ACCEPTED = {"ngram": 20, "draft_model": 20, "eagle": 0, "eagle3": 0, "mtp": 0}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("spec-decode"))


@pytest.fixture(scope="module", params=list(MIN_ACCEPTED))
def proposer(request):
    return request.param


@pytest.fixture(scope="module")
def target(proposer, artifacts, tmp_path_factory) -> Path:
    """The model the engine serves: the tiny Llama, or for `mtp` one with an MTP layer."""
    if proposer == "mtp":
        return build_tiny_glm4_moe_with_mtp(tmp_path_factory.mktemp("glm4-moe-mtp"))
    return artifacts.model_dir


def speculative_config(proposer: str, target: Path, root: Path) -> dict:
    if proposer == "ngram":
        return NGRAM | {"num_speculative_tokens": DRAFT_TOKENS}
    if proposer == "mtp":  # the checkpoint's own MTP layer drafts one token a step
        return {"method": "mtp", "num_speculative_tokens": 1}
    model = target if proposer == "draft_model" else build_tiny_eagle_head(root, target, proposer)
    return {"method": proposer, "model": str(model), "num_speculative_tokens": DRAFT_TOKENS}


@pytest.fixture(scope="module")
def started(proposer, target, artifacts, tmp_path_factory):
    """The engine, and what sae-vllm logged while it started (its worker runs in this process)."""
    mode = ENGINE_MODES["eager" if proposer == "ngram" else "async"]
    drafter_dir = tmp_path_factory.mktemp("drafter")
    with plugin_log() as messages:
        engine = make_llm(
            artifacts,
            in_process=True,
            model=str(target),
            speculative_config=speculative_config(proposer, target, drafter_dir),
            disable_log_stats=False,
            **mode,
        )
    yield engine, messages
    stop_llm(engine)


@pytest.fixture(scope="module")
def llm(started):
    return started[0]


def spec_decode_counts(llm) -> dict[str, int]:
    """vLLM's speculative-decoding counters: draft tokens proposed and accepted so far."""
    names = {
        "vllm:spec_decode_num_draft_tokens": "proposed",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    return {names[m.name]: int(m.value) for m in llm.get_metrics() if m.name in names}


def test_the_engine_drafts_with_its_proposer(llm, proposer):
    config = llm.llm_engine.vllm_config
    assert config.speculative_config.method == proposer
    asynchronous = proposer != "ngram"
    assert config.scheduler_config.async_scheduling is asynchronous
    if asynchronous:  # and its worker takes the runner's async paths
        assert llm.collective_rpc("uses_async_scheduling") == [True]


def test_the_log_says_when_the_drafter_is_not_steered(started, proposer):
    """A draft model runs unsteered beside a steered target, and the startup log says so;
    drafters that read the target's (steered) hidden states do not get that line. An engine
    that schedules asynchronously says that it places each token's steering on the device."""
    messages = started[1]
    assert any("steers the residual stream after layer 1" in m for m in messages)  # captured
    unsteered_drafter = [m for m in messages if "the draft model is not steered" in m]
    assert len(unsteered_drafter) == (1 if proposer == "draft_model" else 0)
    placed = [m for m in messages if "placed on the device from the model's positions" in m]
    assert len(placed) == (0 if proposer == "ngram" else 1)  # async scheduling


def test_verified_draft_tokens_are_steered(llm, proposer, target, artifacts):
    from vllm import SamplingParams

    params = [
        steered_params(artifacts, [case[:4]], case[4], max_tokens=MAX_TOKENS, ignore_eos=True)
        if case
        else SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for case, _ in CASES
    ]
    before = spec_decode_counts(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for _, p in CASES], params, use_tqdm=False)
    after = spec_decode_counts(llm)
    assert after["proposed"] - before["proposed"] >= 20, "too few drafts to test anything"
    assert after["accepted"] - before["accepted"] >= MIN_ACCEPTED[proposer], after

    reference = HFReference(target)
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


def test_unsteered_requests_accept_every_draft_of_the_unsteered_target(llm, proposer):
    """The draft model is the target itself, which the plugin does not steer, and unsteered
    requests run on the target as vLLM runs them: so every draft of an unsteered batch is
    right."""
    if proposer != "draft_model":
        pytest.skip("only a draft model that is the target itself drafts every token right")
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    before = spec_decode_counts(llm)
    llm.generate([{"prompt_token_ids": p} for _, p in CASES], params, use_tqdm=False)
    after = spec_decode_counts(llm)
    proposed = after["proposed"] - before["proposed"]
    assert proposed >= 20
    assert after["accepted"] - before["accepted"] == proposed


def left_out_and_restored(steps: list[tuple[tuple[str, ...], tuple[int, ...]]]) -> bool:
    """Whether a two-request batch ran, then a step of its first request alone, then that
    batch again with the same token counts."""
    for i, batch in enumerate(steps):
        ids = batch[0]
        if len(ids) != 2:
            continue
        for j in range(i + 1, len(steps)):
            if steps[j][0] == ids[:1] and batch in steps[j + 1 :]:
                return True
    return False


def test_a_steered_request_left_out_of_steps_by_the_scheduler_stays_steered(artifacts, monkeypatch):
    """Under a token budget of 2, an unsteered request whose n-gram draft takes the whole budget
    leaves the steered request behind it out of the step; vLLM's runner drops it from the batch
    and appends it again when it is scheduled, restoring the batch it left. Every step of it
    is steered: before 51e8c62 the tables took the restored batch for an unchanged settled one
    and skipped its write, though the steps without it had cleared the buffers, and it ran
    unsteered from there (its tokens departed from the reference at the first restored step)."""
    from vllm import SamplingParams

    from sae_vllm.engine.tables import SteeringTables

    steps: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    write_step = SteeringTables.write_step

    def recording(self, req_ids, num_scheduled_tokens, num_computed_tokens):
        steps.append((tuple(req_ids), tuple(int(n) for n in num_scheduled_tokens)))
        return write_step(self, req_ids, num_scheduled_tokens, num_computed_tokens)

    monkeypatch.setattr(SteeringTables, "write_step", recording)
    llm = make_llm(
        artifacts,
        in_process=True,
        max_num_batched_tokens=2,  # the unsteered request with a draft leaves no token
        max_num_seqs=2,
        speculative_config=NGRAM | {"num_speculative_tokens": 1},
    )
    try:
        drafting = [1, *([5, 6, 7, 8] * 10)]  # repeats, so the n-gram proposer drafts for it
        steered_prompt = [1, 200]
        edit = ("relu", 5, "set", 6.0)
        steered = steered_params(artifacts, [edit], "all", max_tokens=MAX_TOKENS, ignore_eos=True)
        plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        prompts = [{"prompt_token_ids": drafting}, {"prompt_token_ids": steered_prompt}]
        beside = llm.generate(prompts, [plain, steered], use_tqdm=False)[1].outputs[0].token_ids
        beside_steps = list(steps)
        alone = llm.generate(prompts[1:], [steered], use_tqdm=False)[0].outputs[0].token_ids
    finally:
        stop_llm(llm)
    assert left_out_and_restored(beside_steps), "the scheduler never left it out: nothing tested"
    reference = HFReference(artifacts.model_dir)
    expected, _ = reference.greedy(
        steered_prompt, MAX_TOKENS, [Edit(artifacts.saes["relu"], *edit[1:])], "all"
    )
    assert list(beside) == list(alone) == expected


# Specs whose segments start or end among the generated tokens: (edits, apply_to, window), each
# edit (sae, feature, op, value[, its own scope]).
WINDOWED_SPECS = [
    ([("relu", 5, "set", 6.0)], "generated", {"start": 3, "end": 9}),
    ([("jumprelu", 3, "add", 3.0)], "generated", {"start": 6}),
    ([("relu", 9, "ablate", None)], "all", {"start": 2, "end": 14}),
    (
        [
            ("relu", 5, "set", 6.0, {"window": {"start": 2, "end": 7}}),
            ("jumprelu", 3, "add", 3.0, {"window": {"start": 5, "end": 12}}),
        ],
        "generated",
        None,
    ),
    (  # an edit's own apply_to without a window takes none, not the spec's
        [("relu", 5, "set", 6.0), ("jumprelu", 3, "add", 3.0, {"apply_to": "all"})],
        "generated",
        {"start": 4, "end": 10},
    ),
]


def reference_spans(artifacts, prompt: list[int], edits, apply_to: str, window) -> list[Span]:
    """The positions each edit of a windowed spec steers, for the HF reference: an edit with
    a scope of its own takes its apply_to (else the spec's) and its window (else none)."""
    spans = []
    for sae, feature, op, value, *own in edits:
        edit = Edit(artifacts.saes[sae], feature, op, value)
        if own:
            scope = own[0]
            span = scope_span(
                len(prompt), [edit], scope.get("apply_to", apply_to), scope.get("window")
            )
        else:
            span = scope_span(len(prompt), [edit], apply_to, window)
        spans.append(span)
    return spans


def test_windows_among_generated_tokens_steer_exactly_the_references_positions(
    llm, proposer, target, artifacts
):
    check_windows_steer_exactly(llm, proposer, target, artifacts)


def test_the_compile_cache_keys_the_placement_of_tokens_apart(artifacts):
    """Async scheduling with speculative decoding places tokens on the device, a different
    graph from the host placement's; vLLM's config hash, which keys its compile cache (whose
    whole-model AOT cache skips guard checks), hashes neither async scheduling nor the plugin's
    choice (it differs only through a parallel setting that async scheduling defaults, unless
    given). Were a graph compiled for the host placement loaded by an async engine, it would read
    token rows that engine never writes, and every steered request would run unsteered."""
    from cpu_async_scheduling import honor_async_scheduling
    from vllm.engine.arg_utils import EngineArgs

    from engine_harness import engine_kwargs

    honor_async_scheduling()
    drafter = speculative_config("draft_model", artifacts.model_dir, artifacts.model_dir)

    def config_hash(async_scheduling: bool, steering: bool) -> str:
        extra = {"additional_config": artifacts.additional_config()} if steering else {}
        kwargs = engine_kwargs(
            artifacts.model_dir,
            async_scheduling=async_scheduling,
            speculative_config=drafter,
            disable_nccl_for_dp_synchronization=True,  # else defaulted by async scheduling
            **extra,
        )
        config = EngineArgs(**kwargs).create_engine_config()
        assert config.scheduler_config.async_scheduling is async_scheduling
        return config.compute_hash()

    assert config_hash(True, steering=True) != config_hash(False, steering=True)
    # vLLM's own hash does not tell the two apart: the reason for the plugin's mark
    assert config_hash(True, steering=False) == config_hash(False, steering=False)


def test_windows_steer_exactly_in_a_compiled_async_draft_model_engine(artifacts):
    """vLLM's CUDA default for a draft model: async scheduling and a torch.compile'd model, in
    which the device placement is traced into the graph and must read each step's first rows
    and positions, not the ones it was traced with."""
    engine = make_llm(
        artifacts,
        in_process=True,
        speculative_config=speculative_config(
            "draft_model", artifacts.model_dir, artifacts.model_dir
        ),
        disable_log_stats=False,
        **ENGINE_MODES["async"] | ENGINE_MODES["compiled"],
    )
    try:
        assert engine.llm_engine.vllm_config.compilation_config.mode > 0  # compiled
        check_windows_steer_exactly(engine, "draft_model", artifacts.model_dir, artifacts)
    finally:
        stop_llm(engine)


def check_windows_steer_exactly(llm, proposer: str, target: Path, artifacts) -> None:
    """Windows and per-edit scopes whose edges lie among the generated tokens, batched with an
    unsteered request, equal the HF reference on every engine. Under async scheduling vLLM
    prepares a step at positions that count the last step's drafts as accepted and corrects them
    on the device, so there each token's steering is placed on the device from the model's
    positions (DevicePlacement); before, edges moved by the drafts rejected and 5 of 12 windowed
    requests on the draft-model engine departed from the reference, silently (then such specs
    were refused). The batch must have rejected drafts, or the case is not shown."""
    from vllm import SamplingParams

    prompts = [PROMPTS[0], PROMPTS[1], [1, *([5, 6, 7, 8] * 5)]]
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    cases = [(spec, prompt) for spec in WINDOWED_SPECS for prompt in prompts]
    params = [
        steered_params(artifacts, edits, apply_to, window, max_tokens=MAX_TOKENS, ignore_eos=True)
        for (edits, apply_to, window), _ in cases
    ]
    requests = [{"prompt_token_ids": prompt} for _, prompt in cases]
    before = spec_decode_counts(llm)
    outputs = llm.generate([*requests, requests[0]], [*params, plain], use_tqdm=False)
    after = spec_decode_counts(llm)
    accepted = after["accepted"] - before["accepted"]
    rejected = after["proposed"] - before["proposed"] - accepted
    assert accepted >= MIN_ACCEPTED[proposer], (accepted, rejected)
    if proposer != "ngram":  # the host's positions ran ahead of the model's
        assert rejected >= 10, (accepted, rejected)

    reference = HFReference(target)
    unsteered = {tuple(p): reference.greedy(p, MAX_TOKENS, [])[0] for p in prompts}
    changed = 0
    for ((edits, apply_to, window), prompt), output in zip(cases, outputs, strict=False):
        spans = reference_spans(artifacts, prompt, edits, apply_to, window)
        expected = reference.greedy_in_spans(prompt, MAX_TOKENS, spans)
        assert list(output.outputs[0].token_ids) == expected, (edits, apply_to, window, prompt)
        changed += expected != unsteered[tuple(prompt)]
    assert changed >= len(cases) // 2, "too few windows change the text to show anything"
    assert list(outputs[-1].outputs[0].token_ids) == unsteered[tuple(prompts[0])]
