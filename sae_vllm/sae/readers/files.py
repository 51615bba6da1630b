"""Reads SAE files (JSON, safetensors, npz, torch pickles); any failure raises SAEFormatError."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..errors import SAEFormatError


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def folder_of(path: Path) -> Path:
    """The folder of a folder-based format, whether given the folder or a file inside it."""
    return path if path.is_dir() else path.parent


def require_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise SAEFormatError(f"{folder}: missing {name}")
    return file


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEFormatError(f"{file}: cannot read JSON ({_reason(exc)})") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(file, device="cpu")
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read safetensors ({_reason(exc)})") from None


def read_npz(file: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read npz ({_reason(exc)})") from None
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise SAEFormatError(f"{file}: {name} has non-float dtype {array.dtype}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors


def read_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SAEFormatError(
            f"{file}: cannot load with torch.load(weights_only=True) ({_reason(exc)})"
        ) from None
    if not isinstance(state, Mapping):
        raise SAEFormatError(f"{file}: expected a state dict, got {type(state).__name__}")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def take(tensors: Mapping[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    if key not in tensors:
        raise SAEFormatError(f"{file}: missing tensor {key!r} (has {sorted(tensors)})")
    return tensors[key]


def config_value(cfg: Mapping[str, Any], key: str, file: Path) -> Any:
    if cfg.get(key) is None:
        raise SAEFormatError(f"{file}: missing {key!r}")
    return cfg[key]


def positive_int(value: Any, what: str, file: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise SAEFormatError(f"{file}: {what} must be an integer, got {value!r}")
    if value < 1:
        raise SAEFormatError(f"{file}: {what} must be positive, got {value!r}")
    return int(value)


def positive_float(value: Any, what: str, file: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SAEFormatError(f"{file}: {what} must be a positive number, got {value!r}")
    if value == float("inf"):
        raise SAEFormatError(f"{file}: {what} must be finite, got {value!r}")
    return float(value)
