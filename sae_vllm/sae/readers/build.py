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
    if raw.W_enc.ndim != 2:
        raise SAEFormatError(
            f"{raw.weights_file}: {raw.names.get('W_enc', 'W_enc')} must be 2-D, "
            f"has shape {list(raw.W_enc.shape)}"
        )
    d_in, d_sae = raw.W_enc.shape
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


def _gated_as_jumprelu(raw: RawSAE, work: torch.dtype) -> RawSAE:
    """raw's gated SAE as the JumpReLU it equals: the gate (x W + b_gate > 0) holds exactly
    when the magnitude pre-activation x W e^r_mag + b_mag exceeds b_mag - e^r_mag b_gate,
    so W_enc takes the column scale e^r_mag, b_enc stays b_mag and that is the threshold."""
    scale = raw.r_mag.to(work).exp()
    return replace(
        raw,
        W_enc=raw.W_enc.to(work) * scale,
        threshold=raw.b_enc.to(work) - scale * raw.b_gate.to(work),
        architecture="jumprelu",
        r_mag=None,
        b_gate=None,
    )


def _fold_decoder(
    raw: RawSAE, W_dec: torch.Tensor, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The folded decoder rows `rows` (W_dec holds just those rows), and the factor the
    encoder's matching columns take (None: unchanged by the decoder folds)."""
    if raw.decoder_row_scale is not None:
        W_dec = W_dec * raw.decoder_row_scale[rows].to(W_dec.dtype)[:, None]
    norms = None
    if raw.rescale_by_decoder_norm:
        # Computed on the decoder as trained, before the input-scale fold changes its norms.
        norms = W_dec.norm(dim=1)
        # A zero row never fires (its scaled pre-activation is 0) and never writes; keep it 0.
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        W_dec = W_dec / norms[:, None]
    if raw.input_scale is not None:
        W_dec = W_dec / raw.input_scale
    return W_dec, norms


def _fold(raw: RawSAE, work: torch.dtype) -> tuple[torch.Tensor, ...]:
    W_enc, b_enc, W_dec, b_dec = (t.to(work) for t in (raw.W_enc, raw.b_enc, raw.W_dec, raw.b_dec))
    threshold = None if raw.threshold is None else raw.threshold.to(work)
    W_dec, norms = _fold_decoder(raw, W_dec)
    if norms is not None:
        W_enc, b_enc = W_enc * norms, b_enc * norms
    if raw.input_scale is not None:
        s = raw.input_scale
        W_enc, b_dec = W_enc * s, b_dec / s
    return W_enc, b_enc, W_dec, b_dec, threshold


def _needs_fold(raw: RawSAE) -> bool:
    return (
        raw.input_scale is not None
        or raw.decoder_row_scale is not None
        or raw.rescale_by_decoder_norm
    )


NORM_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per chunk of decoder rows


def decoder_norms(raw: RawSAE, chunk_rows: int | None = None) -> torch.Tensor:
    """L2 norm of each row of the decoder build_sae(raw) would give ([d_sae] float32), computed
    a chunk of rows at a time (default: NORM_CHUNK_ELEMENTS elements), so a memory-mapped
    decoder is streamed, never held whole."""
    _validate(raw)
    out = raw.W_enc.dtype
    work = torch.promote_types(out, torch.float32)
    d_sae, d_in = raw.W_dec.shape
    chunk_rows = chunk_rows or max(1, NORM_CHUNK_ELEMENTS // max(d_in, 1))
    norms = torch.empty(d_sae, dtype=torch.float32)
    for start in range(0, d_sae, chunk_rows):
        rows = slice(start, min(start + chunk_rows, d_sae))
        chunk = raw.W_dec[rows]
        if _needs_fold(raw):
            # As build_sae: fold in at least float32, round once to the SAE's dtype.
            chunk, _ = _fold_decoder(raw, chunk.to(work), rows)
        # Contiguous as build_sae leaves it, so each row sums in the same order.
        norms[rows] = chunk.to(out).contiguous().float().norm(dim=1)
    return norms


def build_sae(raw: RawSAE, dtype: torch.dtype | None = None) -> SAE:
    """The canonical SAE for raw, cast to dtype (None keeps the encoder's dtype in the file)."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    _validate(raw)
    out = dtype or raw.W_enc.dtype
    if raw.architecture == "gated":
        raw = _gated_as_jumprelu(raw, torch.promote_types(out, torch.float32))
    # Folds change values, not shapes: an SAE read as headers only (meta tensors) skips them.
    if _needs_fold(raw) and not raw.W_enc.is_meta:
        # Fold in at least float32 so bf16/fp16 files round once, at the final cast.
        tensors = _fold(raw, torch.promote_types(out, torch.float32))
    else:
        tensors = (raw.W_enc, raw.b_enc, raw.W_dec, raw.b_dec, raw.threshold)
    W_enc, b_enc, W_dec, b_dec, threshold = (
        None if t is None else t.to(out).contiguous() for t in tensors
    )
    return SAE(
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        threshold=threshold if raw.architecture == "jumprelu" else None,
        k=raw.k if raw.architecture == "topk" else None,
        architecture=raw.architecture,
        apply_b_dec_to_input=raw.apply_b_dec_to_input,
        layer=raw.layer,
        hook_name=raw.hook_name,
        format=raw.format,
        source=str(raw.source),
    )
