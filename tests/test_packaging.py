"""`pip install` of the package, not of the checkout: the wheel holds every module under its
installed name (kernels/ and server/ become sae_vllm.kernels and sae_vllm.server), both vLLM
plugins and the command, and every module imports from the installed copy alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder: the package its modules install as.
SOURCES = {"sae_vllm": "sae_vllm", "kernels": "sae_vllm.kernels", "server": "sae_vllm.server"}
ENTRY_POINTS = (
    "sae-vllm = sae_vllm.cli:main",
    "sae_vllm = sae_vllm.plugin:register",
    "sae_vllm_cpu_amx = sae_vllm.cpu_amx:request_amx_permission",
)


def source_modules() -> set[str]:
    """Every module of the checkout, by the dotted name it is installed under."""
    modules = set()
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join((package, *parts)))
    return modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds, from a copy of the sources (a build/ folder left in the checkout
    by an earlier build would otherwise lend it files the sources no longer have)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
             "--no-build-isolation", "-q", "-w", str(out)]  # fmt: skip
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("sae_vllm-*.whl")
    return built


def test_the_wheel_holds_every_module_and_the_entry_points(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = set()
    for name in names:
        if name.endswith(".py"):
            parts = name.removesuffix(".py").split("/")
            in_wheel.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert in_wheel == source_modules()
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ENTRY_POINTS:
        assert line in text, text


def test_every_module_imports_from_the_installed_copy(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
               str(target), str(wheel)]  # fmt: skip
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    script = (
        "import importlib\n"
        f"target = {str(target)!r}\n"
        f"for name in {sorted(source_modules())!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(target), (name, module.__file__)\n"
        "print('imported all')\n"
    )
    # From an empty folder, so neither the checkout nor its editable install is found first.
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported all" in done.stdout
