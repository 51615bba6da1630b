"""The worker refuses an SAE it cannot steer with at engine startup, naming the SAE and the
problem: here a weight that is NaN, which the file's header (all the API server reads) cannot
show, and which would otherwise silence the SAE or write NaN into the residual stream."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_harness import make_llm, stop_llm, tiny_artifacts

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
