"""The numba-compiled steering loop of the CPU op (imported on first use, by cpu_compiled)."""

from __future__ import annotations

import numba
import numpy as np

from .edit_ops import ABLATE, ADD, CAP, FLOOR, SCALE, SET

# reassoc lets LLVM vectorise the dot products; without nnan/ninf, NaN and inf behave as in
# numpy. cache=True keeps the machine code on disk for later processes.
_jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})


@_jit
def load_row(src: np.ndarray, index: int, bf16: bool, bits: np.ndarray, out: np.ndarray) -> None:
    """out = src[index] in float32; with bf16, src holds bfloat16 bit patterns (uint16) and
    `bits` is the uint32 array whose float32 view is `out`."""
    if bf16:
        for i in range(out.shape[0]):
            bits[i] = np.uint32(src[index, i]) << np.uint32(16)
    else:
        for i in range(out.shape[0]):
            out[i] = src[index, i]


@_jit
def store_row(dst: np.ndarray, index: int, bf16: bool, values: np.ndarray) -> None:
    """dst[index] = values (float32), rounded to bfloat16 as torch rounds (to nearest even,
    NaN as 0x7FC0) when dst holds bfloat16 bit patterns."""
    if bf16:
        bits = values.view(np.uint32)
        for i in range(values.shape[0]):
            if values[i] != values[i]:
                dst[index, i] = np.uint16(0x7FC0)
            else:
                u = bits[i]
                dst[index, i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16)
    else:
        for i in range(values.shape[0]):
            dst[index, i] = values[i]


@_jit
def steer_tokens(
    hidden: np.ndarray,
    residual: np.ndarray,
    has_residual: bool,
    enc_t: np.ndarray,
    b_enc: np.ndarray,
    threshold: np.ndarray,
    W_dec: np.ndarray,
    row_feat: np.ndarray,
    row_val: np.ndarray,
    row_op: np.ndarray,
    tok_row: np.ndarray,
    tok_scope: np.ndarray,
    hidden_bf16: bool,
    residual_bf16: bool,
    weights_bf16: bool,
) -> None:
    """hidden[t] += sum over t's edit slots of (a' - a) * W_dec[f], for every token t with a
    row in range and in scope; a = the feature's activation of hidden[t] (+ residual[t]).
    hidden, residual and the weights (enc_t, W_dec) are each float32, or bfloat16 bit patterns
    where their flag says so."""
    d_sae, d_in = enc_t.shape
    n_rows, n_slots = row_feat.shape
    bits = np.empty(d_in, dtype=np.uint32)
    scratch = bits.view(np.float32)
    base = np.empty(d_in, dtype=np.float32)  # hidden[t]
    h = np.empty(d_in, dtype=np.float32)  # hidden[t] + residual[t]: what the SAE reads
    delta = np.empty(d_in, dtype=np.float32)
    for t in range(tok_row.shape[0]):
        r = tok_row[t]
        if r < 0 or r >= n_rows or not tok_scope[t]:
            continue
        load_row(hidden, t, hidden_bf16, bits, scratch)
        base[:] = scratch
        if has_residual:
            load_row(residual, t, residual_bf16, bits, scratch)
            h[:] = base + scratch
        else:
            h[:] = base
        delta[:] = 0.0
        changed = False
        for s in range(n_slots):
            f = row_feat[r, s]
            if f < 0 or f >= d_sae:
                continue
            load_row(enc_t, f, weights_bf16, bits, scratch)
            z = np.float32(0.0)
            for i in range(d_in):
                z += scratch[i] * h[i]
            z += b_enc[f]
            a = z if z > max(threshold[f], np.float32(0.0)) else np.float32(0.0)
            op, value = row_op[r, s], row_val[r, s]
            if op == SET:
                edited = value
            elif op == ADD:
                edited = a + value
            elif op == SCALE:
                edited = a * value
            elif op == ABLATE:
                edited = np.float32(0.0)
            elif op == FLOOR:
                edited = max(a, value)
            elif op == CAP:
                edited = min(a, value)
            else:
                continue
            coef = np.float32(edited - a)
            load_row(W_dec, f, weights_bf16, bits, scratch)
            for i in range(d_in):
                delta[i] += coef * scratch[i]
            changed = True
        if changed:
            base += delta
            store_row(hidden, t, hidden_bf16, base)
