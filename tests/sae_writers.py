"""Writers for small SAEs in each on-disk format, written from the format descriptions only.

They share no code with sae_vllm.sae: each takes arrays in the format's own orientation and
key names and lays out the files the way the releasing project does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data), encoding="utf-8")


def _save_safetensors(file: Path, arrays: dict[str, np.ndarray]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, file)


def saelens_v6_cfg(architecture: str, d_in: int, d_sae: int, hook_name: str, **extra: Any) -> dict:
    """A cfg.json as SAELens >= 6 writes it (architecture on top, hook in metadata)."""
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.18.0",
            "sae_lens_training_version": "6.18.0",
            "model_name": "tiny",
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": 128,
            "prepend_bos": True,
        },
    }
    cfg.update(extra)
    return cfg


def saelens_pre_v6_cfg(d_in: int, d_sae: int, **extra: Any) -> dict:
    """A flat cfg.json as SAELens 3-5 wrote it."""
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "model_name": "tiny",
        "hook_name": "blocks.0.hook_resid_pre",
        "hook_layer": 0,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": "tiny/data",
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_training_version": "4.0.0",
    }
    cfg.update(extra)
    return cfg


def write_saelens(
    folder: Path,
    arrays: dict[str, np.ndarray],
    cfg: dict[str, Any],
    scaling_factor: float | str | None = "absent",
) -> Path:
    """cfg.json + sae_weights.safetensors (+ activation_scaler.json unless "absent")."""
    _write_json(folder / "cfg.json", cfg)
    _save_safetensors(folder / "sae_weights.safetensors", arrays)
    if scaling_factor != "absent":
        _write_json(folder / "activation_scaler.json", {"scaling_factor": scaling_factor})
    return folder


def write_saelens_torch(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict) -> Path:
    """Like write_saelens, for dtypes numpy lacks (bfloat16)."""
    import safetensors.torch

    _write_json(folder / "cfg.json", cfg)
    safetensors.torch.save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def write_gemma_scope(file: Path, arrays: dict[str, np.ndarray]) -> Path:
    """params.npz with W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc, b_dec, threshold."""
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, **arrays)
    return file


def write_gemma_scope_2(
    folder: Path, arrays: dict[str, np.ndarray], config: dict[str, Any] | None = None
) -> Path:
    """params.safetensors with lower-case keys w_enc, w_dec, b_enc, b_dec, threshold."""
    _save_safetensors(folder / "params.safetensors", arrays)
    if config is not None:
        _write_json(folder / "config.json", config)
    return folder


def sparsify_cfg(d_in: int, k: int, num_latents: int, **extra: Any) -> dict:
    """cfg.json of a sparsify hookpoint folder: SparseCoderConfig fields plus d_in."""
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    cfg.update(extra)
    return cfg


def write_sparsify(folder: Path, arrays: dict[str, np.ndarray], cfg: dict[str, Any]) -> Path:
    """cfg.json + sae.safetensors with encoder.weight [d_sae, d_in], encoder.bias, W_dec, b_dec."""
    _write_json(folder / "cfg.json", cfg)
    _save_safetensors(folder / "sae.safetensors", arrays)
    return folder


def write_goodfire(file: Path, arrays: dict[str, np.ndarray | Any]) -> Path:
    """A torch.save'd state dict: encoder_linear.{weight [d_sae, d_in], bias},
    decoder_linear.{weight [d_in, d_sae], bias}."""
    file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    torch.save(state, file)
    return file


class MakesDirWhenUnpickled:
    """An object whose unpickling has a side effect: creates the folder it names."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.path,))


def llama_scope_hyperparams(
    d_model: int, d_sae: int, layer: int, threshold: float, norm_in: float, **extra: Any
) -> dict:
    """hyperparams.json as the Llama Scope releases carry it."""
    hook = f"blocks.{layer}.hook_resid_post"
    cfg = {
        "d_model": d_model,
        "d_sae": d_sae,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "jump_relu_threshold": threshold,
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_in},
        "norm_activation": "dataset-wise",
        "top_k": 50,
    }
    cfg.update(extra)
    return cfg


def write_llama_scope(folder: Path, arrays: dict[str, np.ndarray], hyperparams: dict) -> Path:
    """hyperparams.json + checkpoints/final.safetensors with encoder.weight [d_sae, d_model],
    encoder.bias, decoder.weight [d_model, d_sae], decoder.bias."""
    _write_json(folder / "hyperparams.json", hyperparams)
    _save_safetensors(folder / "checkpoints" / "final.safetensors", arrays)
    return folder


def dictionary_learning_config(
    dict_class: str, d_in: int, d_sae: int, layer: int | None, **trainer: Any
) -> dict:
    """config.json as dictionary_learning's trainSAE writes it: the trainer's config (with
    `submodule_name` as its callers set it) and the activation buffer's."""
    return {
        "trainer": {
            "dict_class": dict_class,
            "activation_dim": d_in,
            "dict_size": d_sae,
            "layer": layer,
            "lm_name": "org/tiny-model",
            "submodule_name": None if layer is None else f"resid_post_layer_{layer}",
            **trainer,
        },
        "buffer": {"d_submodule": d_in, "ctx_len": 128, "refresh_batch_size": 32},
    }


def write_dictionary_learning(
    folder: Path, state: dict[str, np.ndarray | int | float], config: dict[str, Any]
) -> Path:
    """config.json + ae.pt, the module's state_dict saved with torch.save; plain numbers are
    0-d buffers (k as int32, threshold as float32), as the classes register them."""
    _write_json(folder / "config.json", config)

    def tensor(value: np.ndarray | int | float) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        return torch.tensor(value, dtype=torch.int32 if isinstance(value, int) else torch.float32)

    torch.save({name: tensor(value) for name, value in state.items()}, folder / "ae.pt")
    return folder
