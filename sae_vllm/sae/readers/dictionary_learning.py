"""dictionary_learning folders (config.json + ae.pt; SAEBench and andyrdt releases): ReLU,
JumpReLU, TopK, gated, and BatchTopK / Matryoshka read as JumpReLU with their scalar threshold."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SAEFormatError
from .build import RawSAE
from .files import (
    ReadMode,
    folder_of,
    positive_int,
    read_json,
    read_torch_state,
    require_file,
    take,
)
from .hooks import layer_from_hook, layer_number

CONFIG = "config.json"
WEIGHTS = "ae.pt"


@dataclass(frozen=True)
class _DictClass:
    """How one of the library's dictionary classes is stored and what it computes at inference
    (its `encode` defaults; training's norm factor is already folded into the saved weights)."""

    layout: str  # "linear": nn.Linear encoder/decoder; "parameters": W_enc, b_enc, W_dec
    b_dec: str  # the key of the bias subtracted before encoding (when applied) and added back
    architecture: str
    apply_b_dec_to_input: bool
    threshold: str | None = None  # "per_feature", or "scalar": one learned threshold
    unit_norm_decoder: bool = False  # from_pretrained divides decoder columns by their norms
    b_enc: str = "encoder.bias"  # in the "linear" layout


_CLASSES = {
    "AutoEncoder": _DictClass("linear", "bias", "relu", True, unit_norm_decoder=True),
    # relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc
    "JumpReluAutoEncoder": _DictClass("parameters", "b_dec", "jumprelu", False, "per_feature"),
    "AutoEncoderTopK": _DictClass("linear", "b_dec", "topk", True),
    # relu(pre) * (relu(pre) > threshold); batch top-k is for training only
    "BatchTopKSAE": _DictClass("linear", "b_dec", "jumprelu", True, "scalar"),
    "MatryoshkaBatchTopKSAE": _DictClass("parameters", "b_dec", "jumprelu", True, "scalar"),
    # relu(r * x_enc + mag_bias) where x_enc + gate_bias > 0, r = exp(r_mag),
    # x_enc = encoder(x - decoder_bias) (no bias of its own)
    "GatedAutoEncoder": _DictClass("linear", "decoder_bias", "gated", True, b_enc="mag_bias"),
}
_AUTOENCODER_KEYS = {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}
# The library's submodule names: resid_post_layer_12 (resid_out_layer12 in early releases),
# attn_out_layer_3, mlp_out_layer_3, embed.
_SUBMODULE = re.compile(r"^(resid_post|resid_out|attn_out|mlp_out)_layer_?(\d+)$")
_SUBMODULE_HOOKS = {
    "resid_post": "hook_resid_post",
    "resid_out": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}


def claims(path: Path) -> bool:
    if path.is_file() and path.name not in (CONFIG, WEIGHTS):
        return False
    folder = folder_of(path)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def _site(submodule: Any, folder: Path, trainer_layer: Any) -> tuple[str | None, int | None]:
    """The hook name and layer: from the trainer's submodule name, else from a release folder
    named like one (resid_post_layer_19/trainer_1), else resid_post of the trainer's layer, as
    SAELens assumes."""
    names = [submodule] if isinstance(submodule, str) else []
    names += [folder.name, folder.parent.name]
    for name in names:
        if name == "embed":
            return "hook_embed", 0
        match = _SUBMODULE.match(name)
        if match:
            layer = int(match.group(2))
            return f"blocks.{layer}.{_SUBMODULE_HOOKS[match.group(1)]}", layer
    if isinstance(submodule, str):  # another name: the checks of its site decide
        layer = layer_from_hook(submodule)
        return submodule, layer_number(trainer_layer) if layer is None else layer
    layer = layer_number(trainer_layer)
    return (None, None) if layer is None else (f"blocks.{layer}.hook_resid_post", layer)


def _dict_class(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> str:
    name = trainer.get("dict_class")
    if name is None and set(tensors) == _AUTOENCODER_KEYS:
        return "AutoEncoder"  # early releases name no class; no other class has these keys
    if not isinstance(name, str):
        raise SAEFormatError(f"{file}: missing 'trainer.dict_class'")
    if name not in _CLASSES:
        raise SAEFormatError(f"{file}: unsupported architecture (dict_class {name!r})")
    return name


def _scalar_threshold(tensors: dict[str, torch.Tensor], d_sae: int, file: Path) -> torch.Tensor:
    threshold = take(tensors, "threshold", file)
    if threshold.numel() != 1:
        raise SAEFormatError(
            f"{file}: threshold has shape {list(threshold.shape)}, expected one number"
        )
    return threshold.reshape(()).expand(d_sae)


def _k(trainer: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path) -> int:
    """k from the state dict's k buffer, which the library encodes with, else from the config;
    the two must agree (the library refuses a k other than its buffer's)."""
    configured = trainer.get("k")
    stored = None
    if "k" in tensors and tensors["k"].numel() == 1:
        stored = int(tensors["k"].item())
    if configured is not None and stored is not None and configured != stored:
        raise SAEFormatError(
            f"{file}: the trainer's k is {configured} but the state dict's k buffer is {stored}"
        )
    k = stored if stored is not None else configured
    if k is None:
        raise SAEFormatError(f"{file}: topk SAE without k")
    return positive_int(k, "k", file)


def _weights(kind: _DictClass, tensors: dict[str, torch.Tensor], file: Path) -> dict[str, Any]:
    """The tensors RawSAE takes (W_enc, b_enc, W_dec, b_dec; r_mag, b_gate when gated) in
    canonical orientation, with their names in the file and which were transposed."""
    linear = kind.layout == "linear"
    names = {
        "W_enc": "encoder.weight" if linear else "W_enc",
        "b_enc": kind.b_enc if linear else "b_enc",
        "W_dec": "decoder.weight" if linear else "W_dec",
        "b_dec": kind.b_dec,
    }
    if kind.architecture == "gated":
        names.update(r_mag="r_mag", b_gate="gate_bias")
    found: dict[str, Any] = {key: take(tensors, name, file) for key, name in names.items()}
    transposed = frozenset({"W_enc", "W_dec"} if linear else ())
    for key in transposed:  # nn.Linear weights are [out, in]
        found[key] = found[key].T
    return {**found, "names": names, "transposed": transposed}


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    folder = folder_of(path)
    cfg_file = require_file(folder, CONFIG)
    weights_file = require_file(folder, WEIGHTS)
    trainer = read_json(cfg_file).get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError(f"{cfg_file}: missing 'trainer'")
    tensors = read_torch_state(weights_file, mode=mode)
    kind = _CLASSES[_dict_class(trainer, tensors, cfg_file)]
    weights = _weights(kind, tensors, weights_file)
    d_sae = weights["W_enc"].shape[-1]
    threshold = None
    if kind.threshold == "per_feature":
        threshold = take(tensors, "threshold", weights_file)
    elif kind.threshold == "scalar":
        threshold = _scalar_threshold(tensors, d_sae, weights_file)
    hook_name, layer = _site(trainer.get("submodule_name"), folder, trainer.get("layer"))
    return RawSAE(
        **weights,
        threshold=threshold,
        k=_k(trainer, tensors, cfg_file) if kind.architecture == "topk" else None,
        architecture=kind.architecture,
        apply_b_dec_to_input=kind.apply_b_dec_to_input,
        rescale_by_decoder_norm=kind.unit_norm_decoder,
        format="dictionary_learning",
        source=folder,
        weights_file=weights_file,
        hook_name=hook_name,
        layer=layer,
        config_file=cfg_file,
        declared_d_in=trainer.get("activation_dim"),
        declared_d_sae=trainer.get("dict_size"),
    )
