"""Checks a reader's raw tensors against each other and the config, folds, builds the SAE."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import SAEFormatError
from ..model import ARCHITECTURES, SAE


@dataclass
class RawSAE:
    """What a reader found, already in canonical orientation ([d_in, d_sae] encoder,
    [d_sae, d_in] decoder) but not yet validated, folded or cast."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: str
    apply_b_dec_to_input: bool
    format: str
    source: Path
    weights_file: Path
    threshold: torch.Tensor | None = None
    k: int | None = None
    hook_name: str | None = None
    layer: int | None = None
    site_assumed: str | None = None
    # Sizes the config file declares, checked against the tensors.
    config_file: Path | None = None
    declared_d_in: int | None = None
    declared_d_sae: int | None = None
    # The tensors' names in the file, and which were transposed, for error messages.
    names: dict[str, str] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    # Folds: the input was multiplied by input_scale in training; feature activations are
    # multiplied by decoder_row_scale before decoding; with rescale_by_decoder_norm (thresholdless
    # SAEs only), pre-activations are multiplied by the decoder row norms and activations divided
    # by them before decoding (SAELens' TopK rescale_acts_by_decoder_norm, and the unit-norm
    # decoder dictionary_learning's AutoEncoder is loaded with).
    input_scale: float | None = None
    decoder_row_scale: torch.Tensor | None = None
    rescale_by_decoder_norm: bool = False
    # Gated SAEs (architecture "gated"): b_enc is the magnitude path's bias; the gate reads
    # the same encoder product plus b_gate, the magnitude path scales it by exp(r_mag).
    r_mag: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None


def _check_shape(raw: RawSAE, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if name in raw.transposed:
        shown, want = tuple(reversed(tensor.shape)), tuple(reversed(expected))
    else:
        shown, want = tuple(tensor.shape), expected
    if tensor.shape != expected:
        raise SAEFormatError(
            f"{raw.weights_file}: {raw.names.get(name, name)} has shape {list(shown)}, "
            f"expected {list(want)} (d_in={raw.W_enc.shape[0]}, d_sae={raw.W_enc.shape[1]} "
            f"from {raw.names.get('W_enc', 'W_enc')})"
        )


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(raw: RawSAE) -> None:
    if raw.architecture not in (*ARCHITECTURES, "gated"):
        raise SAEFormatError(f"{raw.source}: unsupported architecture {raw.architecture!r}")
    tensors = {"W_enc": raw.W_enc, "b_enc": raw.b_enc, "W_dec": raw.W_dec, "b_dec": raw.b_dec}
    if raw.architecture == "jumprelu":
        if raw.threshold is None:
            raise SAEFormatError(f"{raw.weights_file}: jumprelu SAE without a threshold")
        tensors["threshold"] = raw.threshold
    if raw.architecture == "gated":
        if raw.r_mag is None or raw.b_gate is None:
            raise SAEFormatError(f"{raw.weights_file}: gated SAE without r_mag and b_gate")
        tensors.update(r_mag=raw.r_mag, b_gate=raw.b_gate)
    if raw.decoder_row_scale is not None:
        tensors["decoder_row_scale"] = raw.decoder_row_scale
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise SAEFormatError(
                f"{raw.weights_file}: {raw.names.get(name, name)} has non-float dtype "
                f"{tensor.dtype}"
            )
        if tensor.dtype not in _DTYPES:  # float8: torch does no arithmetic in it
            raise SAEFormatError(
                f"{raw.weights_file}: {raw.names.get(name, name)} has unsupported dtype "
                f"{tensor.dtype} (supported: float16, bfloat16, float32, float64)"
            )
    if raw.W_enc.ndim != 2:
        raise SAEFormatError(
            f"{raw.weights_file}: {raw.names.get('W_enc', 'W_enc')} must be 2-D, "
            f"has shape {list(raw.W_enc.shape)}"
        )
    d_in, d_sae = raw.W_enc.shape
    if d_in == 0 or d_sae == 0:
        raise SAEFormatError(
            f"{raw.weights_file}: {raw.names.get('W_enc', 'W_enc')} gives d_in={d_in}, "
            f"d_sae={d_sae}: an SAE needs at least one input and one feature"
        )
    declared_sizes = (("d_in", raw.declared_d_in, d_in), ("d_sae", raw.declared_d_sae, d_sae))
    for what, declared, actual in declared_sizes:
        if declared is not None and declared != actual:
            raise SAEFormatError(
                f"{raw.config_file}: {what} is {declared} but {raw.names.get('W_enc', 'W_enc')} "
                f"in {raw.weights_file} gives {what} {actual}"
            )
    expected = {
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
        "decoder_row_scale": (d_sae,),
        "r_mag": (d_sae,),
        "b_gate": (d_sae,),
    }
    for name, tensor in tensors.items():
        if name != "W_enc":
            _check_shape(raw, name, tensor, expected[name])
    if raw.architecture == "topk" and (raw.k is None or not 1 <= raw.k <= d_sae):
        raise SAEFormatError(
            f"{raw.config_file or raw.source}: topk needs 1 <= k <= d_sae ({d_sae}), got {raw.k}"
        )


def _needs_fold(raw: RawSAE) -> bool:
    return (
        raw.input_scale is not None
        or raw.decoder_row_scale is not None
        or raw.rescale_by_decoder_norm
    )


BLOCK_ELEMENTS = 1 << 21  # 8 MiB of float32 per block of features


def feature_blocks(d_sae: int, d_in: int, rows: int | None = None) -> list[slice]:
    """Consecutive slices of the d_sae features, `rows` at a time (default: BLOCK_ELEMENTS
    elements of a [rows, d_in] block)."""
    rows = rows or max(1, BLOCK_ELEMENTS // max(d_in, 1))
    return [slice(start, min(start + rows, d_sae)) for start in range(0, d_sae, rows)]


class FoldedSAE:
    """A validated SAE whose small vectors are folded and whose two matrices are folded a block
    of features at a time on request, so a memory-mapped file streams through, never held whole.

    `header` is the canonical SAE with W_enc and W_dec on the meta device (shapes and dtype
    only); `encoder_columns` and `decoder_rows` give the real, folded blocks of those two. A
    block that needs no fold or cast is a view of the file's mapped pages: copy what you keep."""

    def __init__(self, raw: RawSAE, dtype: torch.dtype | None = None):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        _validate(raw)
        self.dtype = dtype or raw.W_enc.dtype
        # Folds run in at least float32 so bf16/fp16 files round once, at the final cast.
        self._work = torch.promote_types(self.dtype, torch.float32)
        self._raw = raw
        self._gate_scale: torch.Tensor | None = None
        threshold = raw.threshold
        if raw.architecture == "gated":
            # The gate (x W + b_gate > 0) holds exactly when the magnitude pre-activation
            # x W e^r_mag + b_mag exceeds b_mag - e^r_mag b_gate: W's columns take the scale
            # e^r_mag, b_enc stays b_mag and that is the threshold.
            self._gate_scale = raw.r_mag.to(self._work).exp()
            threshold = raw.b_enc.to(self._work) - self._gate_scale * raw.b_gate.to(self._work)
        # Folds change values, not shapes: an SAE read as headers only (meta tensors) skips them.
        self._folds = _needs_fold(raw) and not raw.W_enc.is_meta
        self._norms = self._fold_norms() if self._folds and raw.rescale_by_decoder_norm else None
        b_enc, b_dec = raw.b_enc, raw.b_dec
        if self._folds:
            b_enc, b_dec = b_enc.to(self._work), b_dec.to(self._work)
            if self._norms is not None:
                b_enc = b_enc * self._norms
            if raw.input_scale is not None:
                b_dec = b_dec / raw.input_scale
        architecture = "jumprelu" if raw.architecture == "gated" else raw.architecture
        d_in, d_sae = raw.W_enc.shape
        self.header = SAE(
            W_enc=torch.empty((d_in, d_sae), dtype=self.dtype, device="meta"),
            b_enc=self._owned(b_enc),
            W_dec=torch.empty((d_sae, d_in), dtype=self.dtype, device="meta"),
            b_dec=self._owned(b_dec),
            threshold=self._owned(threshold) if architecture == "jumprelu" else None,
            k=raw.k if architecture == "topk" else None,
            architecture=architecture,
            apply_b_dec_to_input=raw.apply_b_dec_to_input,
            layer=raw.layer,
            hook_name=raw.hook_name,
            site_assumed=raw.site_assumed,
            format=raw.format,
            source=str(raw.source),
        )

    def _owned(self, vector: torch.Tensor) -> torch.Tensor:
        """vector in the SAE's dtype, copied: never a view of the file's mapped pages."""
        return vector.to(self.dtype, copy=True).contiguous()

    def _scaled_decoder_rows(self, rows: slice) -> torch.Tensor:
        W_dec = self._raw.W_dec[rows].to(self._work)
        if self._raw.decoder_row_scale is not None:
            W_dec = W_dec * self._raw.decoder_row_scale[rows].to(self._work)[:, None]
        return W_dec

    def _fold_norms(self) -> torch.Tensor:
        """The decoder row norms the rescale fold divides by: of the decoder as trained (row
        scale applied, before the input-scale fold), zero rows taken as 1 (such a feature
        never fires, since its scaled pre-activation is 0, and never writes)."""
        d_sae, d_in = self._raw.W_dec.shape
        norms = torch.empty(d_sae, dtype=self._work)
        for rows in feature_blocks(d_sae, d_in):
            norms[rows] = self._scaled_decoder_rows(rows).norm(dim=1)
        return torch.where(norms > 0, norms, torch.ones_like(norms))

    def encoder_columns(self, rows: slice) -> torch.Tensor:
        """W_enc[:, rows], folded, in the SAE's dtype ([d_in, rows])."""
        W_enc = self._raw.W_enc[:, rows]
        if self._gate_scale is None and not self._folds:
            return W_enc.to(self.dtype)
        W_enc = W_enc.to(self._work)
        if self._gate_scale is not None:
            W_enc = W_enc * self._gate_scale[rows]
        if self._folds:
            if self._norms is not None:
                W_enc = W_enc * self._norms[rows]
            if self._raw.input_scale is not None:
                W_enc = W_enc * self._raw.input_scale
        return W_enc.to(self.dtype)

    def decoder_rows(self, rows: slice) -> torch.Tensor:
        """W_dec[rows], folded, in the SAE's dtype ([rows, d_in])."""
        if not self._folds:
            return self._raw.W_dec[rows].to(self.dtype)
        W_dec = self._scaled_decoder_rows(rows)
        if self._norms is not None:
            W_dec = W_dec / self._norms[rows, None]
        if self._raw.input_scale is not None:
            W_dec = W_dec / self._raw.input_scale
        return W_dec.to(self.dtype)


def decoder_norms(raw: RawSAE, chunk_rows: int | None = None) -> torch.Tensor:
    """L2 norm of each row of the decoder build_sae(raw) would give ([d_sae] float32), computed
    a block of rows at a time (default: BLOCK_ELEMENTS elements), so a memory-mapped decoder is
    streamed, never held whole."""
    folded = FoldedSAE(raw)
    d_sae, d_in = raw.W_dec.shape
    norms = torch.empty(d_sae, dtype=torch.float32)
    for rows in feature_blocks(d_sae, d_in, chunk_rows):
        # Contiguous as build_sae leaves it, so each row sums in the same order.
        norms[rows] = folded.decoder_rows(rows).contiguous().float().norm(dim=1)
    return norms


def first_non_finite(raw: RawSAE) -> str | None:
    """Where the first NaN or infinite value of the SAE's tensors is, as `NAME at INDEX` with
    the file's tensor name (None: every value is finite); raises SAEFormatError for tensors
    that are no SAE's (see _validate). Each matrix is read a block of rows at a time in the
    order the file stores it, so a memory-mapped file streams through once."""
    _validate(raw)
    tensors = {
        "W_enc": raw.W_enc,
        "b_enc": raw.b_enc,
        "W_dec": raw.W_dec,
        "b_dec": raw.b_dec,
        "threshold": raw.threshold,
        "decoder_row_scale": raw.decoder_row_scale,
        "r_mag": raw.r_mag,
        "b_gate": raw.b_gate,
    }
    for name, tensor in tensors.items():
        if tensor is None or tensor.is_meta:
            continue
        ndim = tensor.ndim
        if ndim != 2:
            tensor = tensor.reshape(1, -1)
        elif tensor.stride(0) < tensor.stride(1):  # transposed: the file's rows are its columns
            tensor = tensor.T
        rows = max(1, BLOCK_ELEMENTS // max(tensor.shape[1], 1))
        for start in range(0, len(tensor), rows):
            bad = (~torch.isfinite(tensor[start : start + rows])).nonzero()
            if len(bad):
                row, column = (int(i) for i in bad[0])
                index = [[], [column], [start + row, column]][min(ndim, 2)]
                where = f" at {index} (as the file stores it)" if index else ""
                return f"{raw.names.get(name, name)}{where}"
    return None


def build_sae(raw: RawSAE, dtype: torch.dtype | None = None) -> SAE:
    """The canonical SAE for raw, cast to dtype (None keeps the encoder's dtype in the file),
    built a block of features at a time: beyond the SAE it returns, only a block is held."""
    folded = FoldedSAE(raw, dtype)
    header = folded.header
    if raw.W_enc.is_meta:
        return header
    W_enc = torch.empty(header.W_enc.shape, dtype=header.W_enc.dtype)
    W_dec = torch.empty(header.W_dec.shape, dtype=header.W_dec.dtype)
    for rows in feature_blocks(header.d_sae, header.d_in):
        W_enc[:, rows] = folded.encoder_columns(rows)
        W_dec[rows] = folded.decoder_rows(rows)
    return replace(header, W_enc=W_enc, W_dec=W_dec)
