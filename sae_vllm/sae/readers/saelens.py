"""SAELens folders (cfg.json + sae_weights.safetensors), v6 and pre-v6 configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SAEFormatError
from .build import RawSAE
from .files import (
    ReadMode,
    folder_of,
    positive_float,
    positive_int,
    read_json,
    read_safetensors,
    require_file,
    take,
)
from .hooks import layer_from_hook, layer_number

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SCALER = "activation_scaler.json"

# SAELens architecture name -> ours. batchtopk is saved for inference as jumprelu; gated is
# read as the jumprelu it equals (build.py).
_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}


def claims(path: Path) -> bool:
    folder = folder_of(path)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def _architecture(cfg: dict[str, Any], file: Path, has_threshold: bool) -> tuple[str, int | None]:
    """The architecture and k; a threshold tensor makes a config that names no architecture
    jumprelu, and is refused beside one that names another."""
    named = cfg.get("architecture")
    name = named or "standard"
    # Pre-v6 configs say topk through the activation function, not the architecture.
    activation = cfg.get("activation_fn_str")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if name == "standard" and activation == "topk":
        name = "topk"
    elif activation not in (None, "relu", "topk"):
        raise SAEFormatError(f"{file}: unsupported architecture (activation {activation!r})")
    if name not in _ARCHITECTURES:
        raise SAEFormatError(f"{file}: unsupported architecture {name!r}")
    if has_threshold and name != "jumprelu":
        if not named and name == "standard":
            return "jumprelu", None
        said = f"architecture {name!r}" if named == name else f"activation_fn_str {activation!r}"
        raise SAEFormatError(
            f"{file}: {WEIGHTS} holds a threshold, but the config says {said}, which has none"
        )
    if name != "topk":
        return _ARCHITECTURES[name], None
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if k is None:
        raise SAEFormatError(f"{file}: topk SAE without k")
    return "topk", positive_int(k, "k", file)


def _input_scale(cfg: dict[str, Any], folder: Path, file: Path) -> float | None:
    mode = cfg.get("normalize_activations")
    if mode is True:  # pre-v6 boolean
        mode = "expected_average_only_in"
    if mode in (None, False, "none"):
        return None
    if mode in ("constant_norm_rescale", "layer_norm"):
        raise SAEFormatError(
            f"{file}: normalize_activations {mode!r} (per-token input normalisation) "
            "is not supported"
        )
    if mode != "expected_average_only_in":
        raise SAEFormatError(f"{file}: unknown normalize_activations {mode!r}")
    scaler = folder / SCALER
    factor = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if factor is None:
        raise SAEFormatError(
            f"{file}: normalize_activations is 'expected_average_only_in' but the scaling "
            f"factor is missing ({SCALER} absent or its scaling_factor is null)"
        )
    return positive_float(factor, f"scaling_factor in {SCALER}", file)


def _flag(cfg: dict[str, Any], key: str, default: bool, file: Path) -> bool:
    """A boolean setting: a JSON true or false (bool("false") is True), default when absent."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise SAEFormatError(f"{file}: {key} must be true or false, got {value!r}")
    return value


def _hook(cfg: dict[str, Any]) -> tuple[str | None, int | None]:
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook_name:
        return str(hook_name), layer_from_hook(str(hook_name))
    layer = cfg.get("hook_layer", cfg.get("hook_point_layer"))
    return None, layer_number(layer)


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    folder = folder_of(path)
    cfg_file = require_file(folder, CONFIG)
    weights_file = require_file(folder, WEIGHTS)
    cfg = read_json(cfg_file)
    tensors = read_safetensors(weights_file, mode=mode)
    architecture, k = _architecture(cfg, cfg_file, "threshold" in tensors)
    input_scale = _input_scale(cfg, folder, cfg_file)
    hook_name, layer = _hook(cfg)
    row_scale = tensors.get("scaling_factor")  # pre-v6 finetuning scaling factor
    if row_scale is not None and not row_scale.is_meta and bool((row_scale == 1).all()):
        row_scale = None
    gated = architecture == "gated"
    b_enc = "b_mag" if gated else "b_enc"
    return RawSAE(
        W_enc=take(tensors, "W_enc", weights_file),
        b_enc=take(tensors, b_enc, weights_file),
        r_mag=take(tensors, "r_mag", weights_file) if gated else None,
        b_gate=take(tensors, "b_gate", weights_file) if gated else None,
        W_dec=take(tensors, "W_dec", weights_file),
        b_dec=take(tensors, "b_dec", weights_file),
        threshold=take(tensors, "threshold", weights_file) if architecture == "jumprelu" else None,
        k=k,
        architecture=architecture,
        apply_b_dec_to_input=_flag(cfg, "apply_b_dec_to_input", True, cfg_file),
        format="saelens",
        source=folder,
        weights_file=weights_file,
        hook_name=hook_name,
        layer=layer,
        config_file=cfg_file,
        declared_d_in=cfg.get("d_in"),
        declared_d_sae=cfg.get("d_sae"),
        names={"decoder_row_scale": "scaling_factor", "b_enc": b_enc},
        input_scale=input_scale,
        decoder_row_scale=row_scale,
        rescale_by_decoder_norm=architecture == "topk"
        and _flag(cfg, "rescale_acts_by_decoder_norm", False, cfg_file),
    )
