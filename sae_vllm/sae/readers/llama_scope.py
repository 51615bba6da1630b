"""Llama Scope folders (hyperparams.json + checkpoints/final.safetensors): JumpReLU with one scalar
threshold and a dataset-wide input norm, folded the way SAELens folds them."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import SAEFormatError
from .build import RawSAE
from .files import (
    ReadMode,
    config_value,
    folder_of,
    positive_float,
    positive_int,
    read_json,
    read_safetensors,
    require_file,
    take,
)
from .hooks import layer_from_hook

CONFIG = "hyperparams.json"
WEIGHTS = "checkpoints/final.safetensors"


def claims(path: Path) -> bool:
    folder = folder_of(path)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


# lm-saes (the library Llama Scope was trained with) settings that change what the SAE computes,
# with the value every Llama Scope release has: a file with another is refused, not misread.
_RELEASE_SETTINGS = {
    "sae_type": "sae",
    "act_fn": "jumprelu",
    "apply_decoder_bias_to_pre_encoder": False,
    "norm_activation": "dataset-wise",
    "use_glu_encoder": False,
    "use_decoder_bias": True,
}


def _refuse_other_encoders(cfg: dict, cfg_file: Path) -> None:
    for key, release_value in _RELEASE_SETTINGS.items():
        value = cfg.get(key, release_value)
        if value != release_value or type(value) is not type(release_value):
            raise SAEFormatError(
                f"{cfg_file}: {key} is {value!r}; only Llama Scope's {release_value!r} is supported"
            )


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    folder = folder_of(path)
    cfg_file = require_file(folder, CONFIG)
    weights_file = require_file(folder, WEIGHTS)
    cfg = read_json(cfg_file)
    d_model = positive_int(config_value(cfg, "d_model", cfg_file), "d_model", cfg_file)
    d_sae = positive_int(config_value(cfg, "d_sae", cfg_file), "d_sae", cfg_file)
    hook_in = config_value(cfg, "hook_point_in", cfg_file)
    hook_out = cfg.get("hook_point_out", hook_in)
    if hook_out != hook_in:
        raise SAEFormatError(
            f"{cfg_file}: unsupported architecture (transcoder: reads {hook_in}, writes {hook_out})"
        )
    _refuse_other_encoders(cfg, cfg_file)
    norms = config_value(cfg, "dataset_average_activation_norm", cfg_file)
    norm_in = norms.get("in") if isinstance(norms, dict) else None
    norm_in = positive_float(norm_in, "dataset_average_activation_norm.in", cfg_file)
    if norms.get("out", norm_in) != norm_in:  # the decoder would be in other units
        raise SAEFormatError(
            f"{cfg_file}: dataset_average_activation_norm.out ({norms['out']}) differs from .in "
            f"({norm_in}), which is not supported"
        )
    threshold = config_value(cfg, "jump_relu_threshold", cfg_file)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise SAEFormatError(f"{cfg_file}: jump_relu_threshold must be a number, got {threshold!r}")
    # Training scaled inputs by s; SAELens folds s into the weights and also multiplies the
    # released scalar threshold by s (its "fix abnormally large llamascope L0").
    scale = math.sqrt(d_model) / norm_in
    tensors = read_safetensors(weights_file, mode=mode)
    return RawSAE(
        W_enc=take(tensors, "encoder.weight", weights_file).T,
        b_enc=take(tensors, "encoder.bias", weights_file),
        W_dec=take(tensors, "decoder.weight", weights_file).T,
        b_dec=take(tensors, "decoder.bias", weights_file),
        threshold=torch.full((d_sae,), threshold * scale, dtype=torch.float64),
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        format="llama_scope",
        source=folder,
        weights_file=weights_file,
        hook_name=str(hook_in),
        layer=layer_from_hook(str(hook_in)),
        config_file=cfg_file,
        declared_d_in=d_model,
        declared_d_sae=d_sae,
        names={
            "W_enc": "encoder.weight",
            "b_enc": "encoder.bias",
            "W_dec": "decoder.weight",
            "b_dec": "decoder.bias",
            "threshold": "jump_relu_threshold",
        },
        transposed=frozenset({"W_enc", "W_dec"}),
        input_scale=scale,
    )
