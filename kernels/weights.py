"""Per-SAE steering weights in the layout the kernels read, built once when the SAE loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Elements of each block of features handled per step (8 MiB of float32): only a block, with
# its float64 copy for the b_dec fold, is held beside the result, never a second copy.
_CHUNK_ELEMS = 1 << 21


@dataclass
class SteeringWeights:
    """One SAE's weights for the steering op.

    enc_t [d_sae, d_in] (model dtype): the encoder stored feature-major, so a feature's encoder
    row is contiguous; b_enc [d_sae] float32 with b_dec already folded in when the SAE subtracts
    it from its input; threshold [d_sae] float32 (zeros for ReLU); W_dec [d_sae, d_in] (model
    dtype); k: the TopK k, 0 when the SAE is not TopK.
    """

    enc_t: torch.Tensor
    b_enc: torch.Tensor
    threshold: torch.Tensor
    W_dec: torch.Tensor
    k: int

    @property
    def d_in(self) -> int:
        return self.enc_t.shape[1]

    @property
    def d_sae(self) -> int:
        return self.enc_t.shape[0]


# The encoder columns and decoder rows of the features in a slice: ([d_in, n], [n, d_in]).
FeatureBlock = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]


def prepare_weights(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    k: int | None,
    apply_b_dec_to_input: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> SteeringWeights:
    """SteeringWeights from an SAE's raw tensors (SAELens convention: W_enc [d_in, d_sae],
    W_dec [d_sae, d_in]); when apply_b_dec_to_input, b_enc' = b_enc - b_dec @ W_enc in float64."""
    d_in, d_sae = W_enc.shape
    _check_shape("b_enc", b_enc, (d_sae,))
    _check_shape("W_dec", W_dec, (d_sae, d_in))
    _check_shape("b_dec", b_dec, (d_in,))
    W_enc, W_dec = W_enc.detach(), W_dec.detach()
    return prepare_weights_by_block(
        lambda rows: (W_enc[:, rows], W_dec[rows]),
        b_enc,
        b_dec,
        threshold,
        k,
        apply_b_dec_to_input,
        dtype,
        device,
    )


def prepare_weights_by_block(
    block: FeatureBlock,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    k: int | None,
    apply_b_dec_to_input: bool,
    dtype: torch.dtype,
    device: torch.device | str,
) -> SteeringWeights:
    """SteeringWeights from an SAE whose matrices come a block of features at a time, so only
    one block is held beside the result (the matrices can stream from a memory-mapped file);
    the result never shares memory with the blocks. Otherwise as prepare_weights. Raises
    ValueError for a NaN or infinite weight, or one past `dtype`'s range: a single one would
    silence every feature (in b_dec) or write NaN into the residual stream (in W_dec)."""
    if b_enc.ndim != 1 or b_dec.ndim != 1:
        raise ValueError(f"b_enc and b_dec must be 1-D, got {b_enc.shape} and {b_dec.shape}")
    (d_sae,), (d_in,) = b_enc.shape, b_dec.shape
    if threshold is not None:
        _check_shape("threshold", threshold, (d_sae,))
    k = int(k or 0)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    device = torch.device(device)
    step = max(1, _CHUNK_ELEMS // d_in)

    bias = b_enc.detach().to(dtype=torch.float64).clone()
    b_dec64 = b_dec.detach().to(dtype=torch.float64)
    _check_finite("b_enc", bias)
    _check_finite("b_dec", b_dec64)
    enc_t = torch.empty((d_sae, d_in), dtype=dtype, device=device)
    W_dec = torch.empty((d_sae, d_in), dtype=dtype, device=device)
    for start in range(0, d_sae, step):
        rows = slice(start, min(start + step, d_sae))
        cols, dec_rows = block(rows)
        n = rows.stop - rows.start
        _check_shape("W_enc", cols, (d_in, n), f" (columns {start}:{rows.stop})")
        _check_shape("W_dec", dec_rows, (n, d_in), f" (rows {start}:{rows.stop})")
        if apply_b_dec_to_input:
            bias[rows] -= b_dec64 @ cols.to(device=b_dec64.device, dtype=torch.float64)
        enc_t[rows].copy_(cols.to(device=device, dtype=dtype).t())
        W_dec[rows].copy_(dec_rows.to(device=device, dtype=dtype))
        where = f" (features {start}:{rows.stop}, in {dtype})"
        _check_finite("W_enc", enc_t[rows], where)
        _check_finite("W_dec", W_dec[rows], where)

    if threshold is None:
        thr = torch.zeros(d_sae, dtype=torch.float32, device=device)
    else:
        thr = torch.empty(d_sae, dtype=torch.float32, device=device).copy_(threshold.detach())
        _check_finite("threshold", thr)
    b_enc32 = bias.to(device=device, dtype=torch.float32).contiguous()
    _check_finite("b_enc with b_dec folded in, in float32", b_enc32)
    return SteeringWeights(
        enc_t=enc_t,
        b_enc=b_enc32,
        threshold=thr,
        W_dec=W_dec,
        k=k,
    )


def _check_finite(name: str, tensor: torch.Tensor, where: str = "") -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}{where} holds {bad} NaN or infinite values")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str = "") -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}{where} has shape {tuple(tensor.shape)}, expected {shape}")
