"""Gemma Scope (Gemma 2) params.npz files: JumpReLU, no b_dec subtraction, layer from `layer_N`."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from ... import LOGGER_NAME
from ..errors import SAEFormatError
from .build import RawSAE
from .files import ReadMode, read_npz, require_file, take

logger = logging.getLogger(LOGGER_NAME)

PARAMS = "params.npz"

# Hugging Face repo names (also inside HF cache folders): gemma-scope-2b-pt-res, -mlp, -att.
_REPO_SITE = re.compile(r"gemma-scope-[^/]*-(res|mlp|att)(?:-canonical)?$")
_SITE_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_TRANSCODER_REPO = re.compile(r"gemma-scope-[^/]*-transcoders")
# The release layout: layer_12/width_16k/average_l0_82/params.npz
_LAYER_FOLDER = re.compile(r"layer_(\d+)")
# The residual release's SAEs of the embeddings: embedding/width_4k/average_l0_N/params.npz
_EMBEDDING_FOLDER = "embedding"
_SITE_ASSUMED = "residual stream (the path names no Gemma Scope release)"


def claims(path: Path) -> bool:
    return path.suffix == ".npz" if path.is_file() else (path / PARAMS).is_file()


def _layer(file: Path) -> int | None:
    """N of the release layout's layer_N/<width>/<l0>/params.npz; None for any other layout (a
    layer_3_sweep folder, or a layer_N folder elsewhere in the path, is not the release's)."""
    match = _LAYER_FOLDER.fullmatch(file.parts[-4]) if len(file.parts) >= 4 else None
    return int(match.group(1)) if match else None


def _release_site(folder: Path) -> str | None:
    """res, mlp or att: the site of the release a folder in the path names; None if none does."""
    for part in reversed(folder.parts):
        match = _REPO_SITE.search(part)
        if match:
            return match.group(1)
    return None


@functools.cache  # once per file: a server reads an SAE several times
def _warn_site_assumed(file: Path) -> None:
    logger.warning(
        "%s: read as a residual-stream SAE, since its path names no Gemma Scope release; if it "
        "is an MLP or attention SAE or a transcoder, it steers the wrong site. A folder named "
        "for the release above layer_N (gemma-scope-2b-pt-res, -mlp or -att, as in the Hugging "
        "Face cache) tells its site.",
        file,
    )


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    file = path if path.is_file() else require_file(path, PARAMS)
    if any(_TRANSCODER_REPO.search(part) for part in file.parts):
        raise SAEFormatError(f"{file}: unsupported architecture (Gemma Scope transcoder)")
    tensors = read_npz(file, mode=mode)
    # SAELens accepts lower-case w_enc/w_dec here too.
    for name in ("W_enc", "W_dec"):
        if name not in tensors and name.lower() in tensors:
            tensors[name] = tensors[name.lower()]
    layer, site = _layer(file), _release_site(file.parent)
    hook_name, site_assumed = None, None
    if layer is None and _EMBEDDING_FOLDER in file.parent.parts:
        hook_name = "hook_embed"  # the residual stream before layer 0, which no layer's output is
    elif site is None:
        # Also how the residual release is usually downloaded (--local-dir), so not refused.
        site_assumed = _SITE_ASSUMED
    elif layer is not None:
        hook_name = f"blocks.{layer}.{_SITE_HOOKS[site]}"
    elif site != "res":  # an MLP or attention SAE outside the layout: no layer makes it steerable
        hook_name = _SITE_HOOKS[site]
    raw = RawSAE(
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
        hook_name=hook_name,
        layer=layer,
        site_assumed=site_assumed,
    )
    if site_assumed:
        _warn_site_assumed(file)
    return raw
