"""A configured SAE checked from its file headers before any engine starts: offline through
steering_config, and the server's start-up (test_server_unit checks its messages)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from sae_vllm import SAEEntryError, steering_config
from tiny_model import write_random_sae


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sae")
    write_random_sae(directory, "relu", layer=1, d_sae=64)
    return directory


def with_hook(directory, hook: str | None) -> None:
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = hook
    (directory / "cfg.json").write_text(json.dumps(cfg))


def test_a_readable_sae_gives_the_engine_config(sae_dir):
    config = steering_config([{"id": "res", "path": str(sae_dir)}], max_edits=4)
    (entry,) = config["sae_steering"]["saes"]
    assert entry["path"] == str(sae_dir) and config["sae_steering"]["max_edits"] == 4


def test_an_sae_that_cannot_steer_is_refused_before_an_engine_loads_the_model(tmp_path, sae_dir):
    """Each of these got past steering_config, and LLM(...) failed after loading the model,
    in the traceback of vLLM's start-up."""
    (tmp_path / "empty").mkdir()
    no_layer = tmp_path / "no-layer"
    write_random_sae(no_layer, "relu", layer=1, d_sae=64)
    with_hook(no_layer, None)
    mlp = tmp_path / "mlp"
    write_random_sae(mlp, "relu", layer=1, d_sae=64)
    with_hook(mlp, "blocks.1.hook_mlp_out")
    for entry, message in [
        ({"path": str(tmp_path / "missing")}, f"SAE 's': {tmp_path / 'missing'} does not exist"),
        ({"path": str(tmp_path / "empty")}, "SAE 's': "),
        (
            {"path": str(no_layer)},
            f'no layer given and none found in {no_layer} (give its "layer")',
        ),
        ({"path": str(mlp), "layer": 1}, "hook_mlp_out, not the output of a decoder"),
        ({"path": str(sae_dir), "format": "dictionary_learning"}, "SAE 's': "),
        ({"path": str(sae_dir), "format": "no-such"}, "unknown SAE format 'no-such' (known: "),
    ]:
        with pytest.raises(SAEEntryError) as info:
            steering_config([{"id": "s", **entry}])
        assert message in str(info.value) and str(info.value).startswith("SAE 's': ")
        assert "\n" not in str(info.value)
    steering_config([{"id": "s", "path": str(no_layer), "layer": 1}])  # the entry gives it
    with pytest.raises(ValidationError):
        steering_config([{"id": "s p", "path": str(sae_dir)}])  # the id's characters


@pytest.mark.parametrize(
    "field",
    [
        {"layer": True},
        {"layer": "1"},
        {"layer": np.True_},
        {"layer": np.array([1])},
        {"max_edits": True},
        {"max_abs_value": True},
    ],
    ids=["true", "text", "numpy-bool", "numpy-array", "max_edits-true", "max_abs_value-true"],
)
def test_a_boolean_or_text_is_no_number_in_the_config(sae_dir, field):
    """`"layer": true` was read as layer 1."""
    entry = {"id": "s", "path": str(sae_dir)} | (
        {"layer": field["layer"]} if "layer" in field else {}
    )
    options = {key: value for key, value in field.items() if key != "layer"}
    with pytest.raises(ValidationError):
        steering_config([entry], **options)


def test_numpy_numbers_are_numbers(sae_dir):
    """A script's loop over np.arange gives numpy integers (strict ints refused them)."""
    config = steering_config(
        [{"id": "s", "path": str(sae_dir), "layer": np.int64(1)}],
        max_edits=np.int32(4),
        max_abs_value=np.float32(50.0),
    )
    section = config["sae_steering"]
    assert (section["saes"][0]["layer"], section["max_edits"], section["max_abs_value"]) == (
        1,
        4,
        50.0,
    )


def test_paths_may_be_pathlib_paths_and_variants_are_checked_against_the_saes(sae_dir):
    """A variant naming a feature the SAE lacks passed, to fail when a server started."""
    config = steering_config([{"id": "s", "path": sae_dir, "labels": sae_dir / "labels.json"}])
    assert config["sae_steering"]["saes"][0]["path"] == str(sae_dir)
    fits = {"v": {"edits": [{"feature": 63, "op": "ablate"}]}}
    steering_config([{"id": "s", "path": str(sae_dir)}], variants=fits)
    too_far = {"v": {"edits": [{"feature": 64, "op": "ablate"}]}}
    with pytest.raises(ValueError, match=r"steering variant 'v': edits\[0\]\.feature: 64 is out"):
        steering_config([{"id": "s", "path": str(sae_dir)}], variants=too_far)


def test_steering_params_without_the_config_leaves_the_engines_limits_to_the_engine(sae_dir):
    """The default limits (32 edits, 1e4) refused specs an engine configured wider takes."""
    from sae_vllm import SteeringSpecError, steering_params

    many = {"edits": [{"feature": i, "op": "add", "value": 2e4} for i in range(40)]}
    assert steering_params(many).extra_args["sae_steering"]
    wide = steering_config([{"id": "s", "path": str(sae_dir)}], max_edits=64, max_abs_value=1e5)
    assert steering_params(many, config=wide).extra_args["sae_steering"]
    with pytest.raises(SteeringSpecError, match="at most 32 edits per request"):
        steering_params(many, config=steering_config([{"id": "s", "path": str(sae_dir)}]))
    with pytest.raises(TypeError, match="config: the engine's steering config"):
        steering_params(many, config=[{"id": "s", "path": str(sae_dir)}])
    for key in ("sae_steering", "sae_steering_generation_start"):
        with pytest.raises(ValueError, match=f"extra_args\\['{key}'\\]: a key of sae-vllm's"):
            steering_params(many, extra_args={key: 1})


def test_numpy_features_and_values_are_numbers_in_a_spec():
    from sae_vllm import steering_params

    spec = {"edits": [{"feature": np.int64(3), "op": "set", "value": np.float32(2.5)}]}
    params = steering_params(spec)
    assert '"feature":3' in params.extra_args["sae_steering"]
    assert '"value":2.5' in params.extra_args["sae_steering"]
