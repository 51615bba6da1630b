"""Reads SAE files (JSON, safetensors, npz, torch pickles); any failure raises SAEFormatError.

The tensor readers have two modes (`ReadMode`): "meta" reads only the files' headers and returns
tensors on the meta device (right shapes and dtypes, no data), so an SAE can be inspected without
loading it; "map" returns tensors backed by the file's pages, which the OS reads only when they
are touched, so an SAE streams through a block at a time (tensors that cannot be mapped, in
compressed npz members and legacy torch files, are read into memory)."""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import SAEFormatError

ReadMode = Literal["meta", "map"]


# Terminal escapes (torch's weights_only message sets text in bold): plain in our messages.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights_only message opens with how to unpickle anyway; its reason comes later.
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: (.*?\.)(?=\s|$)")


def _reason(exc: BaseException) -> str:
    message = _ANSI_ESCAPE.sub("", str(exc))
    found = _UNPICKLER_ERROR.search(message)
    text = [found.group(1)] if found else message.strip().splitlines()
    return f"{type(exc).__name__}: {text[0].strip()}" if text else type(exc).__name__


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


def _map_file(file: Path) -> mmap.mmap:
    # Copy-on-write: the tensors are writable (torch warns about read-only buffers), and
    # nothing ever writes back to the file.
    with file.open("rb") as stream:
        return mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_COPY)


def _mapped_tensor(
    pages: mmap.mmap, offset: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(pages, dtype=dtype, count=count, offset=offset).view(shape)


def _safetensors_layout(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """Each tensor's shape, dtype and byte offset in the file, from the header alone."""
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
    layout = {}
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
        layout[name] = (shape, dtype, 8 + length + begin)
    return layout


def read_safetensors(file: Path, *, mode: ReadMode) -> dict[str, torch.Tensor]:
    try:
        layout = _safetensors_layout(file)
        if mode == "meta":
            return {name: _meta_tensor(shape, dtype) for name, (shape, dtype, _) in layout.items()}
        pages = _map_file(file)
        return {
            name: _mapped_tensor(pages, offset, shape, dtype)
            for name, (shape, dtype, offset) in layout.items()
        }
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read safetensors ({_reason(exc)})") from None


def _npy_layout(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from the header of one .npy member, without its data."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"npy format version {version} is not supported")


_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _stored_data_offset(file: Path, info: zipfile.ZipInfo, npy_header: int) -> int:
    """Where an uncompressed member's array data starts in the file, past its zip local header
    and its `npy_header` bytes of .npy header."""
    with file.open("rb") as raw:
        raw.seek(info.header_offset)
        signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(raw.read(30))
    if signature != b"PK\x03\x04":
        raise ValueError(f"{info.filename}: bad local header")
    return info.header_offset + 30 + name_length + extra_length + npy_header


def _float_dtype(file: Path, name: str, dtype: np.dtype) -> torch.dtype:
    """torch's dtype for an npz member's float dtype; SAEFormatError for one torch lacks."""
    try:
        return _torch_dtype(dtype)
    except TypeError:  # float128: numpy has it, torch does not
        raise SAEFormatError(f"{file}: {name} has unsupported dtype {dtype}") from None


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """torch's dtype for a float dtype of either byte order (torch holds native order only)."""
    return torch.from_numpy(np.empty(0, dtype.newbyteorder("="))).dtype


def read_npz(file: Path, *, mode: ReadMode) -> dict[str, torch.Tensor]:
    layouts: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        pages = _map_file(file) if mode == "map" else None
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as stream:
                    shape, fortran_order, dtype = _npy_layout(stream)
                    npy_header = stream.tell()
                layouts[name] = (shape, dtype)
                if dtype.kind != "f":
                    continue  # refused below
                torch_dtype = _float_dtype(file, name, dtype)
                if pages is None:
                    continue
                stored = info.compress_type == zipfile.ZIP_STORED
                if stored and not fortran_order and dtype.isnative:
                    offset = _stored_data_offset(file, info, npy_header)
                    tensors[name] = _mapped_tensor(pages, offset, shape, torch_dtype)
                else:  # compressed, Fortran-ordered or byte-swapped: read into memory
                    with archive.open(info) as stream:
                        array = np.lib.format.read_array(stream, allow_pickle=False)
                    native = array.dtype.newbyteorder("=")
                    tensors[name] = torch.from_numpy(np.ascontiguousarray(array, native))
    except SAEFormatError:
        raise
    except Exception as exc:
        raise SAEFormatError(f"{file}: cannot read npz ({_reason(exc)})") from None
    for name, (shape, dtype) in layouts.items():
        if dtype.kind != "f":
            raise SAEFormatError(f"{file}: {name} has non-float dtype {dtype}")
        if mode == "meta":
            tensors[name] = _meta_tensor(shape, _torch_dtype(dtype))
    return tensors


def read_torch_state(file: Path, *, mode: ReadMode) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, loaded without unpickling arbitrary objects."""
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
    # Integer buffers (a TopK SAE's k) stay readable in "meta" mode: a few bytes each.
    return {
        str(k): v.to("meta") if mode == "meta" and v.is_floating_point() else v
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
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
