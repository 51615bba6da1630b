"""`sae-vllm inspect`: an SAE file described from its headers, as JSON, in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_writers import (
    saelens_v6_cfg,
    sparsify_cfg,
    write_gemma_scope,
    write_saelens,
    write_sparsify,
)

D_IN, D_SAE = 8, 24


def inspect(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_vllm.cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def random_arrays(seed: int, dtype: type, threshold: bool) -> dict[str, np.ndarray]:
    """An SAE's tensors in SAELens' names and layout, a threshold of ones when asked."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W_enc": rng.standard_normal((D_IN, D_SAE)).astype(dtype),
        "b_enc": np.zeros(D_SAE, dtype),
        "W_dec": rng.standard_normal((D_SAE, D_IN)).astype(dtype),
        "b_dec": np.zeros(D_IN, dtype),
    }
    return arrays | ({"threshold": np.ones(D_SAE, dtype)} if threshold else {})


def saelens_sae(folder: Path, architecture: str, hook: str, **extra) -> Path:
    arrays = random_arrays(0, np.float16, threshold=architecture == "jumprelu")
    return write_saelens(folder, arrays, saelens_v6_cfg(architecture, D_IN, D_SAE, hook, **extra))


@pytest.mark.parametrize(
    ("architecture", "hook", "k", "steers", "refused"),
    [
        ("jumprelu", "blocks.5.hook_resid_post", None, 5, None),
        ("standard", "blocks.5.hook_resid_pre", None, 4, None),
        ("topk", "blocks.2.hook_resid_post", 3, 2, None),
        ("standard", "blocks.5.hook_mlp_out", None, None, "hook_mlp_out, not the output"),
    ],
)
def test_inspect_prints_the_sae_and_the_layer_it_steers(
    tmp_path, architecture, hook, k, steers, refused
):
    extra = {"k": k} if k else {}
    folder = saelens_sae(tmp_path / "sae", architecture, hook, **extra)
    result = inspect(str(folder))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "saelens" and report["path"] == str(folder)
    assert (report["d_in"], report["d_sae"], report["k"]) == (D_IN, D_SAE, k)
    assert report["architecture"] == {"standard": "relu"}.get(architecture, architecture)
    assert report["dtype"] == "float16" and report["hook_name"] == hook
    assert report["site_assumed"] is None
    assert report["layer"] == int(hook.split(".")[1])
    assert report["steers_after_layer"] == steers
    if refused:
        assert refused in report["not_steerable"]
    else:
        assert report["not_steerable"] is None


def test_inspect_of_a_bad_path_exits_1_with_one_line(tmp_path):
    result = inspect(str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"sae-vllm inspect: error: {tmp_path / 'missing'}: no such file or folder"
    ]
    wrong = inspect(str(saelens_sae(tmp_path / "sae", "standard", "blocks.0.hook_resid_post")),
                    "--format", "gemma_scope")  # fmt: skip
    assert wrong.returncode == 1 and "params.npz" in wrong.stderr


@pytest.mark.parametrize(
    ("release", "hook", "assumed"),
    [
        ("gemma-scope-2b-pt-mlp", "blocks.2.hook_mlp_out", None),
        ("mlp-localdir", None, "residual stream (the path names no Gemma Scope release)"),
    ],
)
def test_inspect_shows_a_gemma_scope_site_assumed_for_a_path_naming_no_release(
    tmp_path, release, hook, assumed
):
    arrays = random_arrays(1, np.float32, threshold=True)
    folder = tmp_path / release / "layer_2" / "width_16k" / "average_l0_50"
    write_gemma_scope(folder / "params.npz", arrays)
    result = inspect(str(folder))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["hook_name"], report["site_assumed"], report["layer"]) == (hook, assumed, 2)
    assert ("names no Gemma Scope release" in result.stderr) == (assumed is not None)


def test_inspect_of_a_relative_path_keeps_the_layer_its_folder_names(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {
        "encoder.weight": rng.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "encoder.bias": np.zeros(D_SAE, np.float32),
        "W_dec": rng.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_dec": np.zeros(D_IN, np.float32),
    }
    folder = write_sparsify(tmp_path / "layers.3", arrays, sparsify_cfg(D_IN, 3, D_SAE))
    result = inspect(".", cwd=folder)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["path"], report["layer"], report["hook_name"]) == (str(folder), 3, "layers.3")
    assert report["steers_after_layer"] == 3


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_inspect_of_a_device_or_fifo_exits_1_with_one_line(tmp_path, special):
    path = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    result = inspect(str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"sae-vllm inspect: error: {path}: not a file or folder an SAE reader reads"
    ]
