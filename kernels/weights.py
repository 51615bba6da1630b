"""Per-SAE steering weights in the layout the kernels read, built once when the SAE loads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns of W_enc handled per step while folding and transposing, so loading a large SAE
# never needs a second full-size (or float64) copy of the encoder.
_CHUNK_ELEMS = 1 << 24


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
    if threshold is not None:
        _check_shape("threshold", threshold, (d_sae,))
    k = int(k or 0)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    device = torch.device(device)
    step = max(1, _CHUNK_ELEMS // d_in)

    bias = b_enc.detach().to(device=W_enc.device, dtype=torch.float64).clone()
    b_dec64 = b_dec.detach().to(device=W_enc.device, dtype=torch.float64)
    enc_t = torch.empty((d_sae, d_in), dtype=dtype, device=device)
    for start in range(0, d_sae, step):
        cols = W_enc.detach()[:, start : start + step]
        if apply_b_dec_to_input:
            bias[start : start + step] -= b_dec64 @ cols.to(torch.float64)
        enc_t[start : start + step].copy_(cols.to(device=device, dtype=dtype).t())

    if threshold is None:
        thr = torch.zeros(d_sae, dtype=torch.float32, device=device)
    else:
        thr = threshold.detach().to(device=device, dtype=torch.float32).contiguous()
    return SteeringWeights(
        enc_t=enc_t,
        b_enc=bias.to(device=device, dtype=torch.float32).contiguous(),
        threshold=thr,
        W_dec=W_dec.detach().to(device=device, dtype=dtype).contiguous(),
        k=k,
    )


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
