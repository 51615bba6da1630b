"""Goodfire .pt/.pth state dicts (encoder_linear / decoder_linear): ReLU, no b_dec subtraction."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SAEFormatError
from . import dictionary_learning
from .build import RawSAE
from .files import ReadMode, read_torch_state, take

SUFFIXES = (".pt", ".pth")
# Released files are named like Llama-3.1-8B-Instruct-SAE-l19.pth.
_FILE_LAYER = re.compile(r"[-_]l(\d+)$")


def _is_candidate(path: Path) -> bool:
    # dictionary_learning's ae.pt is not a Goodfire SAE, even without its config.json beside it.
    return path.is_file() and path.suffix in SUFFIXES and path.name != dictionary_learning.WEIGHTS


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_candidate(p))


def claims(path: Path) -> bool:
    return _is_candidate(path) if path.is_file() else len(_candidates(path)) == 1


def read(path: Path, *, mode: ReadMode) -> RawSAE:
    if path.is_file():
        file = path
    else:
        found = _candidates(path)
        if len(found) != 1:
            raise SAEFormatError(
                f"{path}: expected one .pt/.pth file, found {len(found)}; pass the file itself"
            )
        file = found[0]
    tensors = read_torch_state(file, mode=mode)
    match = _FILE_LAYER.search(file.stem)
    return RawSAE(
        W_enc=take(tensors, "encoder_linear.weight", file).T,
        b_enc=take(tensors, "encoder_linear.bias", file),
        W_dec=take(tensors, "decoder_linear.weight", file).T,
        b_dec=take(tensors, "decoder_linear.bias", file),
        architecture="relu",
        apply_b_dec_to_input=False,
        format="goodfire",
        source=path,
        weights_file=file,
        layer=int(match.group(1)) if match else None,
        names={
            "W_enc": "encoder_linear.weight",
            "b_enc": "encoder_linear.bias",
            "W_dec": "decoder_linear.weight",
            "b_dec": "decoder_linear.bias",
        },
        transposed=frozenset({"W_enc", "W_dec"}),
    )
