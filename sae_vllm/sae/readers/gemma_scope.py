"""Gemma Scope (Gemma 2) params.npz files: JumpReLU, no b_dec subtraction, layer from `layer_N`."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SAEFormatError
from .build import RawSAE
from .files import ReadMode, read_npz, require_file, take
from .hooks import layer_from_path

PARAMS = "params.npz"

# Hugging Face repo names (also inside HF cache folders): gemma-scope-2b-pt-res, -mlp, -att.
_REPO_SITE = re.compile(r"gemma-scope-[^/]*-(res|mlp|att)(?:-canonical)?$")
_SITE_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_TRANSCODER_REPO = re.compile(r"gemma-scope-[^/]*-transcoders")
# The residual release's SAEs of the embeddings: embedding/width_4k/average_l0_N/params.npz
_EMBEDDING_FOLDER = "embedding"


def claims(path: Path) -> bool:
    return path.suffix == ".npz" if path.is_file() else (path / PARAMS).is_file()


def _hook_name(path: Path, layer: int | None) -> str | None:
    if layer is None and _EMBEDDING_FOLDER in path.parts:
        return "hook_embed"  # the residual stream before layer 0, which no layer's output is
    for part in reversed(path.parts):
        match = _REPO_SITE.search(part)
        if match and layer is not None:
            return f"blocks.{layer}.{_SITE_HOOKS[match.group(1)]}"
    return None


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    file = path if path.is_file() else require_file(path, PARAMS)
    if any(_TRANSCODER_REPO.search(part) for part in file.parts):
        raise SAEFormatError(f"{file}: unsupported architecture (Gemma Scope transcoder)")
    tensors = read_npz(file, mode=mode)
    # SAELens accepts lower-case w_enc/w_dec here too.
    for name in ("W_enc", "W_dec"):
        if name not in tensors and name.lower() in tensors:
            tensors[name] = tensors[name.lower()]
    layer = layer_from_path(file.parent)
    return RawSAE(
        W_enc=take(tensors, "W_enc", file),
        b_enc=take(tensors, "b_enc", file),
        W_dec=take(tensors, "W_dec", file),
        b_dec=take(tensors, "b_dec", file),
        threshold=take(tensors, "threshold", file),
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        format="gemma_scope",
        source=path,
        weights_file=file,
        hook_name=_hook_name(file.parent, layer),
        layer=layer,
    )
