"""EleutherAI sparsify hookpoint folders (cfg.json + sae.safetensors): TopK after b_dec removal."""

from __future__ import annotations

from pathlib import Path

from ..errors import SAEFormatError
from .build import RawSAE
from .files import (
    ReadMode,
    config_value,
    folder_of,
    positive_int,
    read_json,
    read_safetensors,
    require_file,
    take,
)
from .hooks import layer_from_hook

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"


def claims(path: Path) -> bool:
    folder = folder_of(path)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def _declared_d_sae(cfg: dict, file: Path) -> int | None:
    if cfg.get("num_latents"):
        return positive_int(cfg["num_latents"], "num_latents", file)
    if cfg.get("d_in") and cfg.get("expansion_factor"):
        return positive_int(cfg["d_in"] * cfg["expansion_factor"], "d_in * expansion_factor", file)
    return None


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    folder = folder_of(path)
    cfg_file = require_file(folder, CONFIG)
    weights_file = require_file(folder, WEIGHTS)
    cfg = read_json(cfg_file)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{cfg_file}: unsupported architecture (activation {activation!r})")
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise SAEFormatError(f"{cfg_file}: unsupported architecture (transcoder)")
    if cfg.get("signed"):
        raise SAEFormatError(f"{cfg_file}: unsupported architecture (signed TopK)")
    k = positive_int(config_value(cfg, "k", cfg_file), "k", cfg_file)
    tensors = read_safetensors(weights_file, mode=mode)
    if "W_skip" in tensors:
        raise SAEFormatError(f"{weights_file}: unsupported architecture (skip connection)")
    return RawSAE(
        W_enc=take(tensors, "encoder.weight", weights_file).T,
        b_enc=take(tensors, "encoder.bias", weights_file),
        W_dec=take(tensors, "W_dec", weights_file),
        b_dec=take(tensors, "b_dec", weights_file),
        k=k,
        architecture="topk",
        apply_b_dec_to_input=True,
        format="sparsify",
        source=folder,
        weights_file=weights_file,
        hook_name=folder.name,
        layer=layer_from_hook(folder.name),
        config_file=cfg_file,
        declared_d_in=cfg.get("d_in"),
        declared_d_sae=_declared_d_sae(cfg, cfg_file),
        names={"W_enc": "encoder.weight", "b_enc": "encoder.bias"},
        transposed=frozenset({"W_enc"}),
    )
