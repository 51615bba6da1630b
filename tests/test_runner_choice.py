"""Which vLLM model runner steering runs on: V1 unless the user chose, and never V2 silently.

The V2 runner needs Triton on a GPU, so it cannot be built here: `runner_info` is shown a
stand-in whose class lives in the V2 runner's module (the check it makes), the only mock."""

from __future__ import annotations

import os

import pytest

from sae_vllm.engine import vllm_adapter


def test_the_v1_runner_is_chosen_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(vllm_adapter.RUNNER_ENV, raising=False)
    vllm_adapter.prefer_v1_runner()
    assert os.environ[vllm_adapter.RUNNER_ENV] == "0"
    monkeypatch.setenv(vllm_adapter.RUNNER_ENV, "1")
    vllm_adapter.prefer_v1_runner()
    assert os.environ[vllm_adapter.RUNNER_ENV] == "1"


def test_a_v2_runner_stops_steering_at_startup_with_the_fix_in_the_message():
    runner_class = type("GPUModelRunner", (), {"__module__": "vllm.v1.worker.gpu.model_runner"})
    with pytest.raises(RuntimeError, match=f"V2 runner is active.*{vllm_adapter.RUNNER_ENV}=0"):
        vllm_adapter.runner_info(runner_class())
