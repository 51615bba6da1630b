"""The shared-prefix benchmark runs end to end on a real engine and reports the cached share."""

from __future__ import annotations

import json

import pytest

from bench import prefix_cache
from tiny_model import build_tiny_llama, write_random_sae

pytestmark = pytest.mark.engine


def test_generated_scope_shares_the_prefix_and_all_scope_does_not(tmp_path, capsys):
    model = build_tiny_llama(tmp_path / "model")
    write_random_sae(tmp_path / "sae", "relu", layer=1)
    out = tmp_path / "prefix_cache.json"
    args = ["--model", str(model), "--sae", str(tmp_path / "sae"), "--layer", "1"]
    args += ["--max-model-len", "256", "--prefix-len", "96", "--batch", "4", "--repeats", "1"]
    assert prefix_cache.main([*args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    shared = 96 / (96 + 8)  # three full blocks of 32: the whole prefix
    assert results["unsteered"]["cached_share"] == [pytest.approx(shared)]
    assert results["steered generated"]["cached_share"] == [pytest.approx(shared)]
    assert results["steered all"]["cached_share"] == [0.0]
    assert all(r["seconds"][0] > 0 for r in results.values())
    assert "| steered generated |" in capsys.readouterr().out
