"""vLLM's frontend check of a request's steering: what it submits, and what it leaves alone.

The vLLM config is a stand-in (only its `additional_config` is read); SamplingParams and
EngineCoreRequest are vLLM's own."""

from __future__ import annotations

import json
import types

import pytest

from sae_vllm.config import EXTRA_ARGS_KEY, GENERATION_START_KEY
from sae_vllm.engine import intake
from tiny_model import write_random_sae

RAW = {"edits": [{"feature": 3, "op": "set", "value": 2.0}]}


def engine_config(tmp_path_factory, sae_id: str, d_sae: int):
    from sae_vllm import steering_config

    sae_dir = tmp_path_factory.mktemp(sae_id)
    write_random_sae(sae_dir, "relu", layer=1, d_sae=d_sae)
    config = steering_config([{"id": sae_id, "path": str(sae_dir), "layer": 1}])
    return types.SimpleNamespace(additional_config=config)


@pytest.fixture(scope="module")
def engine_a(tmp_path_factory):
    return engine_config(tmp_path_factory, "a", 64)


@pytest.fixture(scope="module")
def engine_b(tmp_path_factory):
    return engine_config(tmp_path_factory, "b", 8)


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
