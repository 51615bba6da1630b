"""The custom op torch.ops.sae_vllm.steer_ (Triton on CUDA, cpu_decode on CPU) and its wrapper."""

import torch

from .cpu_decode import steer_cpu_
from .weights import SteeringWeights

OP_NAME = "sae_vllm::steer_"


def _steer_impl(hidden: torch.Tensor, *args: object) -> None:
    """The op's kernel for both dispatch keys; the arguments are SCHEMA's, in its order."""
    if hidden.is_cuda:
        # Imported on first use so that importing kernels never compiles or loads Triton code.
        from .triton_steer import steer_triton_

        steer_triton_(hidden, *args)
    else:
        steer_cpu_(hidden, *args)


def _steer_fake(*args: object) -> None:
    """Shape-only twin for tracing: the op mutates `hidden` in place and returns nothing."""
    return None


SCHEMA = (
    "steer_(Tensor(a!) hidden, Tensor? residual, Tensor enc_t, Tensor b_enc, Tensor threshold, "
    "Tensor W_dec, Tensor row_feat, Tensor row_val, Tensor row_op, Tensor tok_row, "
    "Tensor tok_scope, int topk_k) -> ()"
)
_library: torch.library.Library | None = None


def _register() -> None:
    # A plain Library definition dispatches in C++ straight to the kernel (torch.library.custom_op
    # adds tens of microseconds of Python per call, paid per steered layer per step).
    # This file can be imported twice under two names (sae_vllm.kernels and plain kernels);
    # the op is defined once per process.
    global _library
    if hasattr(torch.ops.sae_vllm, "steer_"):
        return
    _library = torch.library.Library("sae_vllm", "FRAGMENT")
    _library.define(SCHEMA)
    for dispatch_key in ("CPU", "CUDA"):
        _library.impl("steer_", _steer_impl, dispatch_key)
    torch.library.register_fake(OP_NAME, _steer_fake, lib=_library)


_register()


def steer_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    weights: SteeringWeights,
    row_feat: torch.Tensor,
    row_val: torch.Tensor,
    row_op: torch.Tensor,
    tok_row: torch.Tensor,
    tok_scope: torch.Tensor,
) -> None:
    """Steer `hidden` [T, d_in] in place with one SAE's weights and the edit tables."""
    torch.ops.sae_vllm.steer_(
        hidden,
        residual,
        weights.enc_t,
        weights.b_enc,
        weights.threshold,
        weights.W_dec,
        row_feat,
        row_val,
        row_op,
        tok_row,
        tok_scope,
        weights.k,
    )
