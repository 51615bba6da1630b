"""The CPU op: a compiled (numba) loop for float32 and bfloat16, a numpy path for float16 or
without numba, and the torch reference for TopK SAEs and very large batches.

A decode step steers a handful of tokens; through torch each of the ~40 small tensor ops costs
a few microseconds of dispatch, which on a small model is a visible share of the step. numpy
does the same float32 math with about a microsecond per op when its caches are warm."""

from __future__ import annotations

import numpy as np
import torch

from .cpu_compiled import compiled_path_applies, steer_compiled_
from .edit_ops import ABLATE, ADD, CAP, FLOOR, SCALE, SET
from .reference import steer_reference_, steered_token_indices

# _apply_edit indexes its candidates by op code.
assert tuple(range(6)) == (SET, ADD, SCALE, ABLATE, FLOOR, CAP)
# Size of the gathered [tokens, slots, d_in] weights up to which the numpy path is used (16 MiB
# of float32); larger prefills go to the torch reference.
NUMPY_MAX_ELEMS = 1 << 22


def steer_cpu_(
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
    topk_k: int,
) -> None:
    """Same contract as torch.ops.sae_vllm.steer_, for CPU tensors."""
    n_tok = hidden.shape[0]
    n_rows, n_slots = row_feat.shape
    if n_tok == 0 or n_rows == 0 or n_slots == 0:
        return
    rows = tok_row.numpy()[:n_tok]
    # The common unsteered step in one reduction: right after the model's own work every numpy
    # op runs with cold caches (~5-25 us each), so the full check below costs ~70 us.
    if rows.max() < 0:
        return
    if topk_k == 0 and compiled_path_applies(hidden, residual, enc_t, W_dec):
        steer_compiled_(hidden, residual, enc_t, b_enc, threshold, W_dec, row_feat, row_val,
                        row_op, tok_row, tok_scope)  # fmt: skip
        return
    feat_table = row_feat.numpy()
    tokens = steered_token_indices(rows, tok_scope.numpy()[:n_tok], (feat_table >= 0).any(axis=1))
    if tokens.size == 0:
        return
    r = rows[tokens]
    feat = feat_table[r]
    # Tables are as wide as the engine's max_edits; only the slots some token uses matter.
    used = np.flatnonzero((feat >= 0).any(axis=0))
    feat = feat[:, : used[-1] + 1]
    if topk_k > 0 or feat.size * hidden.shape[1] > NUMPY_MAX_ELEMS:
        steer_reference_(hidden, residual, enc_t, b_enc, threshold, W_dec, row_feat, row_val,
                         row_op, tok_row, tok_scope, topk_k)  # fmt: skip
        return
    hidden_rows = _gather_f32(hidden, tokens)
    h = hidden_rows if residual is None else hidden_rows + _gather_f32(residual, tokens)
    n_used = feat.shape[1]
    feat = feat.astype(np.int64)
    valid = (feat >= 0) & (feat < enc_t.shape[0])
    feat = np.where(valid, feat, 0)
    enc = _gather_f32(enc_t, feat)
    z = np.matmul(enc, h[:, :, None])[..., 0] + b_enc.numpy()[feat]
    a = np.where(z > np.maximum(threshold.numpy()[feat], 0), z, 0).astype(np.float32)
    edited = _apply_edit(a, row_op.numpy()[r, :n_used], row_val.numpy()[r, :n_used])
    coef = np.where(valid, edited - a, 0).astype(np.float32)
    delta = np.matmul(coef[:, None, :], _gather_f32(W_dec, feat))[:, 0]
    _scatter(hidden, tokens, hidden_rows + delta)


def _gather_f32(t: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """t[index] as float32 numpy, converted in numpy. Small torch ops on CPU cost a dispatch
    each and can wake the OpenMP pool, which then competes with the model's own matmuls."""
    if t.dtype == torch.float32:
        return t.numpy()[index]
    bits = t.view(torch.int16).numpy()[index]
    if t.dtype == torch.float16:
        return bits.view(np.float16).astype(np.float32)
    # bfloat16 is the top half of a float32.
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _scatter(t: torch.Tensor, index: np.ndarray, values: np.ndarray) -> None:
    """t[index] = values (float32 numpy), rounded to t's dtype as torch rounds (to nearest even)."""
    if t.dtype == torch.float32:
        t.numpy()[index] = values
        return
    if t.dtype == torch.float16:
        with np.errstate(over="ignore"):  # past float16's range is inf, as torch rounds it
            t.view(torch.int16).numpy()[index] = values.astype(np.float16).view(np.int16)
        return
    values = np.ascontiguousarray(values, dtype=np.float32)
    u = values.view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0  # torch's bfloat16 NaN
    t.view(torch.int16).numpy()[index] = rounded.view(np.int16)


def _apply_edit(a: np.ndarray, op: np.ndarray, value: np.ndarray) -> np.ndarray:
    """numpy twin of edit_ops.apply_edit (unknown op codes leave a unchanged)."""
    choice = np.where((op >= 0) & (op < 6), op, 6)
    candidates = (value, a + value, a * value, np.zeros_like(a), np.maximum(a, value),
                  np.minimum(a, value), a)  # fmt: skip
    return np.choose(choice, candidates).astype(np.float32, copy=False)
