"""vLLM's frontend check of a request's steering: what it submits, and what it leaves alone.

The vLLM config is a stand-in (only its `additional_config` is read); SamplingParams and
EngineCoreRequest are vLLM's own."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from reach_oracle import every_scope_reaches, python_slice_reaches, random_scopes, windowed
from sae_vllm.config import DROPPED_GENERATION_KEY, EXTRA_ARGS_KEY, GENERATION_START_KEY
from sae_vllm.engine import intake
from tiny_model import stand_in_vllm_config

RAW = {"edits": [{"feature": 3, "op": "set", "value": 2.0}]}


@pytest.fixture(scope="module")
def engine_a(tmp_path_factory):
    return stand_in_vllm_config(tmp_path_factory.mktemp("a"), "a", 64)


@pytest.fixture(scope="module")
def engine_b(tmp_path_factory):
    return stand_in_vllm_config(tmp_path_factory.mktemp("b"), "b", 8)


def sampling_params(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=4, extra_args=extra_args or None)


def test_the_callers_params_are_left_alone_and_a_copy_carries_the_resolved_text(engine_a):
    raw = json.loads(json.dumps(RAW))
    params = sampling_params(**{EXTRA_ARGS_KEY: raw, "other": 1})
    submitted = intake.check_params(engine_a, params)
    assert params.extra_args == {EXTRA_ARGS_KEY: RAW, "other": 1} and raw == RAW
    assert submitted is not params and submitted.extra_args["other"] == 1
    assert json.loads(submitted.extra_args[EXTRA_ARGS_KEY]) == {
        "edits": [{"sae": "a", "feature": 3, "op": "set", "value": 2.0}],
        "apply_to": "generated",
    }
    assert (submitted.max_tokens, submitted.temperature) == (4, 0.0)


def test_params_already_carrying_the_resolved_text_are_submitted_as_they_are(engine_a):
    from sae_vllm import steering_params

    params = steering_params(RAW, config=engine_a.additional_config, max_tokens=4)
    assert isinstance(params.extra_args[EXTRA_ARGS_KEY], str)
    assert intake.check_params(engine_a, params) is params
    unsteered = sampling_params()
    assert intake.check_params(engine_a, unsteered) is unsteered


def test_params_shared_by_two_engines_are_resolved_by_each_against_its_own_saes(engine_a, engine_b):
    params = sampling_params(**{EXTRA_ARGS_KEY: RAW})
    on_a = json.loads(intake.check_params(engine_a, params).extra_args[EXTRA_ARGS_KEY])
    on_b = json.loads(intake.check_params(engine_b, params).extra_args[EXTRA_ARGS_KEY])
    assert (on_a["edits"][0]["sae"], on_b["edits"][0]["sae"]) == ("a", "b")
    text_for_a = json.dumps(on_a)
    with pytest.raises(ValueError, match="unknown SAE 'a'"):
        intake.check_params(engine_b, sampling_params(**{EXTRA_ARGS_KEY: text_for_a}))


def test_bad_specs_and_generation_starts_and_steering_without_saes_raise(engine_a, engine_b):
    too_far = {"edits": [{"feature": 8, "op": "ablate"}]}
    intake.check_params(engine_a, sampling_params(**{EXTRA_ARGS_KEY: too_far}))
    with pytest.raises(ValueError, match="out of range"):
        intake.check_params(engine_b, sampling_params(**{EXTRA_ARGS_KEY: too_far}))
    bad_start = sampling_params(**{EXTRA_ARGS_KEY: RAW, GENERATION_START_KEY: 0})
    with pytest.raises(ValueError, match=GENERATION_START_KEY):
        intake.check_params(engine_a, bad_start)
    no_saes = types.SimpleNamespace(additional_config={})
    with pytest.raises(ValueError, match="no SAEs configured"):
        intake.check_params(no_saes, sampling_params(**{EXTRA_ARGS_KEY: RAW}))
    assert intake.check_params(no_saes, sampling_params(other=1)).extra_args == {"other": 1}


@pytest.mark.parametrize("key", ["steering", "sae-steering", "SAE_STEERING", "sae_steering_spec"])
def test_a_key_meant_for_sae_vllm_but_none_of_its_keys_is_refused_on_a_steering_engine(
    engine_a, key
):
    """The spec under it was ignored: the request came back unsteered, without a word."""
    with pytest.raises(ValueError) as info:
        intake.check_params(engine_a, sampling_params(**{key: RAW}))
    assert str(info.value) == (
        f"extra_args: {key!r} is no key of sae-vllm's; a steering spec goes in "
        "extra_args['sae_steering'] (over HTTP: the body's `steering` field)"
    )
    no_saes = types.SimpleNamespace(additional_config={})  # steering off: another's key
    assert intake.check_params(no_saes, sampling_params(**{key: RAW})).extra_args == {key: RAW}
    internal = sampling_params(**{EXTRA_ARGS_KEY: RAW, GENERATION_START_KEY: 3})  # a beam step
    intake.check_params(engine_a, internal)
    intake.check_params(engine_a, sampling_params(steering_strength=1, other=2))


# --- a spec that steers none of a request's positions ----------------------------------------


def reach(engine, spec: dict | None, num_prompt_tokens: int, max_tokens: int | None, **extra):
    """check_reach of a request of that prompt length and max_tokens steered by `spec`."""
    params = sampling_params(**({} if spec is None else {EXTRA_ARGS_KEY: spec}), **extra)
    intake.check_reach(engine, params, num_prompt_tokens, max_tokens)


def test_a_scope_steering_no_position_of_the_request_is_found_as_python_slices_find_it(engine_a):
    rng = np.random.default_rng(11)
    reached = refused = refused_in_part = 0
    for _ in range(600):
        scopes = random_scopes(rng)
        num_prompt_tokens, max_tokens = int(rng.integers(1, 14)), int(rng.integers(1, 8))
        spec = windowed(*scopes)
        if every_scope_reaches(scopes, num_prompt_tokens, max_tokens):
            reach(engine_a, spec, num_prompt_tokens, max_tokens)
            reached += 1
            continue
        in_part = python_slice_reaches(scopes, num_prompt_tokens, max_tokens)
        start = intake.EDITS_STEER_NOTHING if in_part else intake.STEERS_NOTHING
        with pytest.raises(ValueError) as info:
            reach(engine_a, spec, num_prompt_tokens, max_tokens)
        assert str(info.value).startswith(f"{start}: ")
        refused_in_part += in_part
        refused += 1
    assert reached > 100 and refused - refused_in_part > 50 and refused_in_part > 50


@pytest.mark.parametrize(
    ("apply_to", "window", "num_prompt_tokens", "max_tokens", "reaches"),
    [
        ("generated", {"start": 3}, 5, 4, True),  # the position whose output is token 4
        ("generated", {"start": 4}, 5, 4, False),  # the 5th: past max_tokens
        ("prompt", {"start": 4}, 5, 1, True),
        ("prompt", {"start": 5}, 5, 50, False),  # past the prompt, however long it generates
        ("prompt", {"start": -100}, 1, 1, True),  # negative offsets clip to the prompt's start
        ("all", {"start": 7}, 5, 4, True),  # prompt 0..4, then generated tokens 1..3 fed back
        ("all", {"start": 8}, 5, 4, False),
        ("all", {"start": 4}, 5, 1, True),  # one token: its input is the last prompt position
        ("all", {"start": 5}, 5, 1, False),
    ],
)
def test_the_last_position_a_request_computes_is_reached_and_the_next_is_not(
    engine_a, apply_to, window, num_prompt_tokens, max_tokens, reaches
):
    spec = windowed((apply_to, window))
    if reaches:
        reach(engine_a, spec, num_prompt_tokens, max_tokens)
        return
    with pytest.raises(ValueError) as info:
        reach(engine_a, spec, num_prompt_tokens, max_tokens)
    start = window["start"]
    assert str(info.value) == (
        f"{intake.STEERS_NOTHING}: its prompt has {num_prompt_tokens} tokens and it generates "
        f"at most {max_tokens}, and the spec's scope ({apply_to}[{start}:]) holds none of their "
        "positions"
    )


def test_every_scope_must_reach_and_the_message_names_those_that_do_not_with_their_edits(
    engine_a,
):
    late = [("generated", {"start": 9}), ("prompt", {"start": 6, "end": 8})]
    with pytest.raises(ValueError) as info:
        reach(engine_a, windowed(*late), 5, 4)
    assert str(info.value) == (
        f"{intake.STEERS_NOTHING}: its prompt has 5 tokens and it generates at most 4, and the "
        "spec's scopes (generated[9:] of edits[0]; prompt[6:8] of edits[1]) hold none of their "
        "positions"
    )
    with pytest.raises(ValueError) as info:
        reach(engine_a, windowed(("all", None), *late, ("all", None)), 5, 4)
    assert str(info.value) == (
        f"{intake.EDITS_STEER_NOTHING}: its prompt has 5 tokens and it generates at most 4, and "
        "the spec's scopes (generated[9:] of edits[1]; prompt[6:8] of edits[2]) hold none of "
        "their positions"
    )
    one_late = windowed(("all", None), ("generated", {"start": 2}), ("generated", {"start": 9}))
    one_late["edits"].append({"feature": 3, "op": "ablate", "window": {"start": 9}})
    with pytest.raises(ValueError, match=r"scope \(generated\[9:\] of edits\[2, 3\]\) holds none"):
        reach(engine_a, one_late, 5, 4)
    reach(engine_a, windowed(("all", None), ("generated", {"start": 2})), 5, 4)
    spec_window = {"edits": [RAW["edits"][0]], "window": {"start": 4}}
    with pytest.raises(ValueError, match=r"the spec's scope \(generated\[4:\]\) holds none"):
        reach(engine_a, spec_window, 5, 4)


def test_without_max_tokens_a_request_may_generate_to_the_models_length(engine_a):
    engine = types.SimpleNamespace(
        **vars(engine_a), model_config=types.SimpleNamespace(max_model_len=20)
    )
    reach(engine, windowed(("generated", {"start": 13})), 6, None)  # its output: token 14
    with pytest.raises(ValueError, match="generates at most 14, "):
        reach(engine, windowed(("generated", {"start": 14})), 6, None)


@pytest.mark.parametrize(
    ("scope", "reaches"),
    [
        (("generated", None), False),  # its one position's output is the dropped token
        (("all", {"start": 4}), False),
        (("prompt", {"start": -1}), False),
        (("all", {"start": 3}), True),  # its output is the logprob of prompt token 4
        (("prompt", {"start": -2, "end": -1}), True),
    ],
)
def test_an_echo_without_generation_returns_the_outputs_of_its_prompt_but_the_last(
    engine_a, scope, reaches
):
    """vLLM runs a completion that echoes its 5-token prompt with max_tokens 0 for one token
    and drops it; the server marks such a request, and only prompt positions 0..3 count."""
    assert python_slice_reaches([scope], 5, 0) == reaches  # the oracle agrees
    args = (engine_a, windowed(scope), 5, 1)
    if reaches:
        reach(*args, **{DROPPED_GENERATION_KEY: True})
    else:
        with pytest.raises(ValueError, match="it generates at most 0, "):
            reach(*args, **{DROPPED_GENERATION_KEY: True})
    reach(*args)  # without the mark, its generated token counts


def test_beam_steps_and_unsteered_requests_are_not_judged_alone(engine_a):
    nothing = windowed(("generated", {"start": 20}))
    # A beam step's prompt holds what the search generated so far; the search is checked whole.
    reach(engine_a, nothing, 5, 1, **{GENERATION_START_KEY: 3})
    with pytest.raises(ValueError, match=intake.STEERS_NOTHING):
        intake.check_beam_reach(engine_a, json.dumps(nothing), 3, 20)
    intake.check_beam_reach(engine_a, json.dumps(nothing), 3, 21)
    reach(engine_a, None, 5, 1)
    reach(engine_a, None, 5, 1, other=1)


@pytest.mark.parametrize(
    "scope",
    [
        {"window": {"start": 2}},  # generated position 2: the prompt's end + 1
        {"window": {"end": 16}},
        {"apply_to": "all", "window": {"end": 11}},  # the prompt is 10 tokens
        {"apply_to": "prompt", "window": {"start": -4}},
    ],
)
def test_windows_among_generated_tokens_are_taken_where_positions_run_ahead(engine_a, scope):
    """Under async scheduling with speculative decoding the host prepares a step at positions
    that count the last step's drafts as accepted; the worker places each token's steering on
    the device from the model's positions instead, so no window is refused there."""
    params = sampling_params(**{EXTRA_ARGS_KEY: RAW | scope})
    ahead = types.SimpleNamespace(
        **vars(engine_a)
        | {
            "scheduler_config": types.SimpleNamespace(async_scheduling=True),
            "speculative_config": object(),
        }
    )
    for engine in (engine_a, ahead):
        assert intake.check_reach(engine, params, 10, 32) is not None
