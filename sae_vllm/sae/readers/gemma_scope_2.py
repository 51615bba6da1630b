"""Gemma Scope 2 (Gemma 3) params.safetensors files: lower-case keys, optional config.json."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SAEFormatError
from .build import RawSAE
from .files import ReadMode, folder_of, read_json, read_safetensors, require_file, take
from .hooks import layer_from_hook

PARAMS = "params.safetensors"
CONFIG = "config.json"

# Release folders: resid_post[_all]/layer_12_width_16k_l0_medium, attn_out..., mlp_out...
_SITE_HOOKS = {
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
_NOT_SAES = ("transcoder", "clt")
# The SAE's own folder: layer_12_width_16k_l0_medium (not a user's layer_3_sweep)
_LAYER_FOLDER = re.compile(r"layer_(\d+)_width_.+")


def claims(path: Path) -> bool:
    return path.name == PARAMS if path.is_file() else (path / PARAMS).is_file()


def _site(folder: Path) -> str | None:
    """The site named by the release folder (<site>/<layer_...>/params.safetensors)."""
    for part in (folder.name, folder.parent.name):
        if part.startswith(_NOT_SAES):
            raise SAEFormatError(f"{folder}: unsupported architecture (Gemma Scope 2 {part})")
        for site in _SITE_HOOKS:
            if part.startswith(site):
                return site
    return None


def _hook_from_config(folder: Path) -> str | None:
    """The site the release's config.json says the SAE reads (`model.layers.12.output`, the
    layer's output; `model.layers.12.self_attn.o_proj.input`, ...); refuses transcoders."""
    file = folder / CONFIG
    if not file.is_file():
        return None
    cfg = read_json(file)
    architecture = cfg.get("architecture", "jump_relu")
    if architecture not in ("jump_relu", "jumprelu"):
        raise SAEFormatError(f"{file}: unsupported architecture {architecture!r}")
    hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if hook_out is not None and hook_out != hook_in:
        raise SAEFormatError(
            f"{file}: unsupported architecture (transcoder: reads {hook_in}, writes {hook_out})"
        )
    if hook_in is not None and not isinstance(hook_in, str):
        raise SAEFormatError(f"{file}: hf_hook_point_in must be a string, got {hook_in!r}")
    return hook_in


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    folder = folder_of(path)
    file = path if path.is_file() else require_file(folder, PARAMS)
    site = _site(folder)
    # The SAE's own config names its site; a folder's name is only where it was released.
    hook_name = _hook_from_config(folder)
    layer = layer_from_hook(hook_name)
    if hook_name is None:
        match = _LAYER_FOLDER.fullmatch(folder.name)
        layer = int(match.group(1)) if match else None
        if site is not None and layer is not None:
            hook_name = f"blocks.{layer}.{_SITE_HOOKS[site]}"
    tensors = read_safetensors(file, mode=mode)
    if "affine_skip_connection" in tensors:
        raise SAEFormatError(f"{file}: unsupported architecture (skip transcoder)")
    return RawSAE(
        W_enc=take(tensors, "w_enc", file),
        b_enc=take(tensors, "b_enc", file),
        W_dec=take(tensors, "w_dec", file),
        b_dec=take(tensors, "b_dec", file),
        threshold=take(tensors, "threshold", file),
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        format="gemma_scope_2",
        source=path,
        weights_file=file,
        hook_name=hook_name,
        layer=layer,
        names={"W_enc": "w_enc", "W_dec": "w_dec"},
    )
