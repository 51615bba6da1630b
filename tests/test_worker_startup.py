"""What the worker says at engine startup about the SAEs it loads: it refuses one it cannot
steer with, naming the SAE and the problem (here a NaN weight, which the file's header, all the
API server reads, cannot show, and which would otherwise silence the SAE or write NaN into the
residual stream), and warns of a configured layer other than the one the file reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_harness import (
    ENGINE_ENV,
    engine_kwargs,
    make_llm,
    plugin_log,
    start_llm,
    stop_llm,
    tiny_artifacts,
)

pytestmark = pytest.mark.engine


def test_an_sae_with_a_nan_weight_stops_the_engine_naming_it(tmp_path):
    artifacts = tiny_artifacts(tmp_path)
    weights_file = artifacts.sae_dirs["jumprelu"] / "sae_weights.safetensors"
    tensors = load_file(weights_file)
    tensors["W_dec"][7, 3] = torch.nan
    save_file(tensors, weights_file)
    with pytest.raises(
        Exception, match=r"SAE 'jumprelu': W_dec \(features 0:256, in torch\.\w+\) holds 1 NaN"
    ):
        llm = make_llm(artifacts, in_process=True, enforce_eager=True)
        stop_llm(llm)


def test_a_configured_layer_other_than_the_files_is_warned_of(tmp_path, monkeypatch):
    for name, value in ENGINE_ENV.items():
        monkeypatch.setenv(name, value)
    artifacts = tiny_artifacts(tmp_path)  # the relu SAE's file reads blocks.1.hook_resid_post
    config = artifacts.additional_config()
    for entry in config["sae_steering"]["saes"]:
        entry["layer"] = 2 if entry["id"] == "relu" else entry["layer"]
    with plugin_log() as messages:
        kwargs = engine_kwargs(artifacts.model_dir, enforce_eager=True)
        llm = start_llm(True, **kwargs, additional_config=config)
        stop_llm(llm)
    warned = [m for m in messages if "is configured to steer" in m]
    assert warned == [
        "sae-vllm: SAE 'relu' is configured to steer the output of layer 2, but its file reads "
        "blocks.1.hook_resid_post, the output of layer 1"
    ]
