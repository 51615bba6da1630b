"""The format registry: detects which format a path holds and dispatches to its reader."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

from ..errors import SAEFormatError
from ..hub import local_sae_path
from ..model import SAE
from . import (
    dictionary_learning,
    gemma_scope,
    gemma_scope_2,
    goodfire,
    llama_scope,
    saelens,
    sparsify,
)
from .build import FoldedSAE, RawSAE, build_sae, first_non_finite
from .build import decoder_norms as _decoder_norms
from .files import ReadMode

# Detection order: the first reader that claims a path reads it.
_READERS: dict[str, ModuleType] = {
    "saelens": saelens,
    "sparsify": sparsify,
    "llama_scope": llama_scope,
    "gemma_scope_2": gemma_scope_2,
    "gemma_scope": gemma_scope,
    # Before goodfire, which would claim its folder's one .pt file.
    "dictionary_learning": dictionary_learning,
    "goodfire": goodfire,
}
FORMATS: tuple[str, ...] = tuple(_READERS)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of the SAE at path (a folder, or a file of a single-file format; `hf://`
    paths are fetched from the Hugging Face Hub)."""
    return _detect(_local_path(path))


def _local_path(path: str | os.PathLike[str]) -> Path:
    """path made absolute (an `hf://` path fetched first), checked to be a file or folder."""
    # absolute(), not resolve(): the readers take layers from folder names (`layers.1` given
    # as "."), and a symlink's name is the one the user chose.
    path = Path(local_sae_path(os.fspath(path))).absolute()
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):  # /dev/null, a FIFO, a socket
        raise SAEFormatError(f"{path}: not a file or folder an SAE reader reads")
    return path


def _detect(path: Path) -> str:
    name = _claimed_by(path)
    if name is not None:
        return name
    inside = _saes_inside(path) if path.is_dir() else []
    if inside:
        shown = ", ".join(inside[:_SHOWN_INSIDE]) + (", ..." if len(inside) > _SHOWN_INSIDE else "")
        raise SAEFormatError(
            f"{path}: a folder of {len(inside)} SAEs, not one; pass one of them: {shown}"
        )
    raise SAEFormatError(
        f"{path}: not a recognised SAE (expected cfg.json + sae_weights.safetensors, "
        "cfg.json + sae.safetensors, hyperparams.json + checkpoints/final.safetensors, "
        "params.safetensors, params.npz, config.json + ae.pt or one .pt/.pth file)"
    )


_SHOWN_INSIDE = 5
_SEARCH_DEPTH = 3  # release trees: layer_5/width_16k/average_l0_40, resid_post_layer_3/trainer_0
_SEARCH_ENTRIES = 2000  # an error path: a wrong folder (a home directory) is not walked whole


def _claimed_by(path: Path) -> str | None:
    return next((name for name, reader in _READERS.items() if reader.claims(path)), None)


def _saes_inside(folder: Path) -> list[str]:
    """The folders under `folder` that some reader claims (relative paths, sorted), a few
    levels deep, within a bounded number of entries."""
    found: list[str] = []
    budget = [_SEARCH_ENTRIES]

    def walk(current: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(entry for entry in current.iterdir() if entry.is_dir())
        except OSError:
            return
        for entry in entries:
            budget[0] -= 1
            if budget[0] < 0:
                return
            if _claimed_by(entry) is not None:
                found.append(prefix + entry.name)
            elif depth > 1:
                walk(entry, f"{prefix}{entry.name}/", depth - 1)

    walk(folder, "", _SEARCH_DEPTH)
    return found


def _read(path: str | os.PathLike[str], format: str | None, mode: ReadMode) -> RawSAE:
    path = _local_path(path)
    if format is None:
        format = _detect(path)
    elif format not in _READERS:
        raise SAEFormatError(f"{path}: unknown SAE format {format!r} (known: {', '.join(FORMATS)})")
    return _READERS[format].read(path, mode=mode)


def load_sae(
    path: str | os.PathLike[str], format: str | None = None, dtype: torch.dtype | None = None
) -> SAE:
    """Read the SAE at path into the canonical SAE; format is detected when None, dtype None
    keeps the file's floating dtype. The file is streamed through a memory map: besides the
    SAE returned, only a block of it is held in memory."""
    return build_sae(_read(path, format, mode="map"), dtype)


def open_sae(
    path: str | os.PathLike[str], format: str | None = None, dtype: torch.dtype | None = None
) -> FoldedSAE:
    """The SAE at path, memory-mapped and checked, its matrices folded a block of features at
    a time on request (FoldedSAE): for building other layouts of its weights without holding
    the SAE whole."""
    return FoldedSAE(_read(path, format, mode="map"), dtype)


def inspect_sae(path: str | os.PathLike[str], format: str | None = None) -> SAE:
    """The SAE at path with every tensor on the meta device: sizes, dtype, architecture, layer
    and hook, checked as load_sae checks them, from the files' headers alone (milliseconds and
    no memory, however large the SAE)."""
    return build_sae(_read(path, format, mode="meta")).to("meta")


def decoder_norms(
    path: str | os.PathLike[str], format: str | None = None, chunk_rows: int | None = None
) -> torch.Tensor:
    """The L2 norm of each decoder row of the SAE at path ([d_sae] float32, equal to
    `load_sae(path).W_dec.float().norm(dim=1)`), streamed from the file a chunk of rows at a
    time (8 MiB of float32 unless `chunk_rows` is given). The SAE is never held in memory,
    except `.pt` files of torch's legacy format and compressed npz members, which cannot be
    memory-mapped."""
    return _decoder_norms(_read(path, format, mode="map"), chunk_rows)


def non_finite_weight(path: str | os.PathLike[str], format: str | None = None) -> str | None:
    """Where the SAE at path holds a NaN or infinite value, as `NAME at [i, j]` with the
    file's tensor name and index (None: nowhere), its files streamed once where they can be
    memory-mapped (see decoder_norms). A single one would write NaN into the residual stream,
    or silence every feature. Raises SAEFormatError for a file that holds no SAE."""
    return first_non_finite(_read(path, format, mode="map"))
