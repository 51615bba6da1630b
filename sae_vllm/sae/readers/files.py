"""Reads SAE files (JSON, safetensors, npz, torch pickles); any failure raises SAEFormatError.

With `meta=True` the tensor readers read only the files' headers and return tensors on the meta
device (right shapes and dtypes, no data), so an SAE can be inspected without loading it."""

from __future__ import annotations

import json
import math
import struct
import zipfile
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _meta_tensor(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _safetensors_headers(file: Path) -> dict[str, torch.Tensor]:
    # The format: an 8-byte little-endian header length, then a JSON header giving each
    # tensor's dtype, shape and byte range. Parsed here rather than with safe_open, which
    # memory-maps the whole file (refused for files larger than the address space allows).
    size = file.stat().st_size
    with file.open("rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        if not 2 <= length <= min(size - 8, 100 * 2**20):
            raise ValueError(f"header length {length} does not fit the file")
        header = json.loads(stream.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SAEFormatError(f"{file}: {name} has unsupported dtype {entry['dtype']}")
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        fits = 0 <= begin <= end <= size - 8 - length
        if not fits or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{name}: byte range {begin}..{end} does not fit the file")
        tensors[name] = _meta_tensor(shape, dtype)
    return tensors


def read_safetensors(file: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    try:
        if meta:
            return _safetensors_headers(file)
        return safetensors.torch.load_file(file, device="cpu")
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read safetensors ({_reason(exc)})") from None


def _npy_layout(stream: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of one .npy member, without reading its data."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"npy format version {version} is not supported")
    return shape, dtype


def read_npz(file: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    arrays: dict[str, np.ndarray] = {}
    try:
        if meta:
            with zipfile.ZipFile(file) as archive:
                layouts = {}
                for member in archive.namelist():
                    with archive.open(member) as stream:
                        layouts[member.removesuffix(".npy")] = _npy_layout(stream)
        else:
            with np.load(file, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            layouts = {name: (array.shape, array.dtype) for name, array in arrays.items()}
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read npz ({_reason(exc)})") from None
    tensors = {}
    for name, (shape, dtype) in layouts.items():
        if dtype.kind != "f":
            raise SAEFormatError(f"{file}: {name} has non-float dtype {dtype}")
        if meta:
            tensors[name] = _meta_tensor(shape, torch.from_numpy(np.empty(0, dtype)).dtype)
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(arrays[name]))
    return tensors


def read_torch_state(file: Path, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, loaded without unpickling arbitrary objects."""
    state = None
    if meta:
        try:  # memory-mapped: only the pickle is read (files of the legacy format cannot be)
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            state = None
    if state is None:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SAEFormatError(
                f"{file}: cannot load with torch.load(weights_only=True) ({_reason(exc)})"
            ) from None
    if not isinstance(state, Mapping):
        raise SAEFormatError(f"{file}: expected a state dict, got {type(state).__name__}")
    return {
        str(k): v.to("meta") if meta else v for k, v in state.items() if isinstance(v, torch.Tensor)
    }


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
