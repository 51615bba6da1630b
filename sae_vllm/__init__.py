"""sae-vllm: per-request SAE feature steering inside vLLM's batched forward pass."""

from __future__ import annotations

import importlib
from typing import Any

# Under vLLM's logger, so the plugin's messages go wherever vLLM sends its own, in its format
# and at its level (VLLM_LOGGING_LEVEL); vLLM configures only the "vllm" logger tree.
LOGGER_NAME = "vllm.sae_vllm"

# Exports resolve lazily so `import sae_vllm.kernels` needs only torch and triton (GPU box),
# and the offline helpers import vllm only when used.
_EXPORTS = {
    "SAE": "sae",
    "SAEFormatError": "sae",
    "FoldedSAE": "sae",
    "decoder_norms": "sae",
    "inspect_sae": "sae",
    "load_sae": "sae",
    "non_finite_weight": "sae",
    "open_sae": "sae",
    "SAEEntry": "config",
    "SAEEntryError": "sae_entries",
    "SteeringConfig": "config",
    "ApplyTo": "spec",
    "EditOp": "spec",
    "FeatureEdit": "spec",
    "SpecErrorReason": "spec",
    "SpecIssue": "spec",
    "ScopeWindow": "spec",
    "SpecLimits": "spec",
    "SteeringSpec": "spec",
    "SteeringSpecError": "spec",
    "parse_spec": "spec",
    "resolve_spec": "spec",
    "steering_config": "offline",
    "steering_beam_params": "offline",
    "steering_params": "offline",
    "unreached_sequences": "offline_reach",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sae_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
