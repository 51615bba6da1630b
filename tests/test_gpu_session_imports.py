"""What `bench/gpu_session.sh` runs imports on the GPU machine, which has torch, triton, numpy,
numba, pytest and transformers but neither vLLM, pydantic nor fastapi, and no installed sae-vllm
(the repo is on PYTHONPATH). A missing module there would cost a lent device's whole session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: refuse what the GPU machine lacks, including the installed-only
# names (sae_vllm.kernels and sae_vllm.server exist only through this package's install).
DEVICE_LIKE_IMPORTS = """
import importlib, importlib.abc, sys
ABSENT = ("vllm", "pydantic", "fastapi", "starlette", "openai", "uvicorn")
INSTALLED_ONLY = ("sae_vllm.kernels", "sae_vllm.server")

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT or name.startswith(INSTALLED_ONLY):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")

sys.meta_path.insert(0, Absent())
sys.path[:0] = ["tests", "."]
for module in sys.argv[1:]:
    importlib.import_module(module)
import kernels, bench.kernels
print(bench.kernels.device_slug("NVIDIA H100 80GB HBM3"), kernels.steer_ is not None)
"""

GPU_SESSION_MODULES = ("test_kernels_gpu", "test_compiled_stack", "test_staging_gpu")


def test_the_gpu_session_imports_with_only_what_the_gpu_machine_has():
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    assert all(f"tests/{module}.py" in script for module in GPU_SESSION_MODULES)
    run = subprocess.run(
        [sys.executable, "-c", DEVICE_LIKE_IMPORTS, *GPU_SESSION_MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    slug, has_op = run.stdout.split()[-2:]
    assert (slug, has_op) == ("nvidia-h100-80gb-hbm3", "True")
