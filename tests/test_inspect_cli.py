"""`sae-vllm inspect`: an SAE file described from its headers, as JSON, in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_writers import saelens_v6_cfg, write_saelens

D_IN, D_SAE = 8, 24


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_vllm.cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def saelens_sae(folder: Path, architecture: str, hook: str, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "W_enc": rng.standard_normal((D_IN, D_SAE)).astype(np.float16),
        "b_enc": np.zeros(D_SAE, np.float16),
        "W_dec": rng.standard_normal((D_SAE, D_IN)).astype(np.float16),
        "b_dec": np.zeros(D_IN, np.float16),
    }
    if architecture == "jumprelu":
        arrays["threshold"] = np.ones(D_SAE, np.float16)
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
