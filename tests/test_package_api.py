"""The package's public names: each export resolves, and every name the README uses exists;
every logger of the package is vLLM's."""

from __future__ import annotations

import re
from pathlib import Path

import sae_vllm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_every_export_resolves():
    for name in sae_vllm.__all__:
        assert getattr(sae_vllm, name) is not None, name


def test_every_name_the_readme_uses_is_exported():
    text = README.read_text()
    used = set(re.findall(r"sae_vllm\.([A-Za-z_]\w*)\(", text))
    for imported in re.findall(r"from sae_vllm import ([\w, ]+)", text):
        used.update(name.strip() for name in imported.split(","))
    assert {"decoder_norms", "steering_params", "steering_config"} <= used
    assert used <= set(sae_vllm.__all__), used - set(sae_vllm.__all__)


def test_every_logger_is_under_vllms_so_it_takes_vllms_format_and_level():
    calls = {
        f"{path.relative_to(ROOT)}: {call}"
        for folder in ("sae_vllm", "kernels", "server")
        for path in (ROOT / folder).rglob("*.py")
        for call in re.findall(r"getLogger\(([^)]*)\)", path.read_text())
    }
    assert calls, "no logger found"
    # vLLM's own argument-parser logger, which sae-vllm serve filters, not one it logs to
    calls.discard("server/options.py: _PARSER_LOGGER")
    named = {call for call in calls if not re.search(r': LOGGER_NAME( \+ "\.\w+")?$', call)}
    assert all(re.search(r': "vllm\.sae_vllm(\.\w+)*"$', call) for call in named), named
