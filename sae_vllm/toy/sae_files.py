"""Writing the toy SAE in SAELens v6 format: cfg.json and sae_weights.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

from sae_vllm.toy.residual import hook_name
from sae_vllm.toy.sae_training import ReluSAE

MODEL_NAME = "sae-vllm-toy"


def saelens_config(d_in: int, d_sae: int, layer: int, context_size: int) -> dict:
    """The v6 cfg.json of a "standard" (ReLU) SAE that subtracts b_dec before encoding."""
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "model_name": MODEL_NAME,
            "hook_name": hook_name(layer),
            "context_size": context_size,
            "prepend_bos": True,
        },
    }


def save_sae(sae: ReluSAE, directory: Path, layer: int, context_size: int) -> None:
    """Write cfg.json and sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec, b_dec)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = sae.W_enc.shape
    cfg = saelens_config(d_in, d_sae, layer, context_size)
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {
        name: getattr(sae, name).detach().float().contiguous().clone()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    save_file(tensors, str(directory / "sae_weights.safetensors"))
