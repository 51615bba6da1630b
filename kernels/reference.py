"""Vectorised torch implementation of the steering op: the CPU path and the kernels' test oracle."""

from __future__ import annotations

import numpy as np
import torch

from .edit_ops import apply_edit

# Upper bound on the elements of any float32 temporary (32 MiB), so an 8192-token prefill
# with K=32 and d_in=4096 never materialises a [tokens, K, d_in] gather at once.
_ELEMS = 1 << 23
# Use one small GEMM against the distinct features of a chunk instead of a per-token gather
# when there are at most this many distinct features per edit slot (prefills of one request).
_DENSE_FACTOR = 8
# Below this many (token, slot) pairs (decode steps) the per-token gather is cheaper than
# finding the distinct features first.
_SMALL = 1024


def steer_reference_(
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
    """Steer `hidden` in place; same contract as torch.ops.sae_vllm.steer_.

    Only steered tokens are read and rewritten (data-dependent indexing is fine off the CUDA
    path); unsteered and padded tokens are never written."""
    n_tok, d_in = hidden.shape
    n_rows, n_slots = row_feat.shape
    if n_tok == 0 or n_rows == 0 or n_slots == 0:
        return
    rows = tok_row[:n_tok].long()
    tokens = _steered_tokens(rows, tok_scope[:n_tok], (row_feat >= 0).any(dim=1))
    if tokens.numel() == 0:
        return
    for idx in tokens.split(max(1, _ELEMS // d_in)):
        h = hidden[idx].float()
        if residual is not None:
            h += residual[idx].float()
        r = rows[idx]
        feat = row_feat[r].long()
        valid = (feat >= 0) & (feat < enc_t.shape[0])
        feat = torch.where(valid, feat, 0)
        if topk_k > 0:
            z, kth = topk_pre(h, enc_t, b_enc, feat, topk_k)
            a = torch.where(z >= kth[:, None], z.clamp_min(0), 0.0)
        else:
            z = sparse_dots(h, enc_t, feat) + b_enc[feat].float()
            a = torch.where(z > threshold[feat].float().clamp_min(0), z, 0.0)
        edited = apply_edit(a, row_op[r], row_val[r].float())
        coef = torch.where(valid, edited - a, 0.0)
        delta = sparse_decode(coef, W_dec, feat)
        hidden[idx] = (hidden[idx].float() + delta).to(hidden.dtype)


def steered_token_indices(
    rows: np.ndarray, scope: np.ndarray, row_has_edits: np.ndarray
) -> np.ndarray:
    """Indices of the tokens to steer: in scope, with a row in range that has an edit for this
    SAE (rows are shared by every SAE of the engine; most rows edit only some of them)."""
    steered = (rows >= 0) & (rows < row_has_edits.shape[0]) & scope.astype(bool, copy=False)
    steered[steered] = row_has_edits[rows[steered]]
    return np.flatnonzero(steered)


def _steered_tokens(
    rows: torch.Tensor, scope: torch.Tensor, row_has_edits: torch.Tensor
) -> torch.Tensor:
    if rows.device.type == "cpu":
        # numpy on the shared memory: a few microseconds, where the torch ops cost ~100 us per
        # call in an idle decode step.
        indices = steered_token_indices(rows.numpy(), scope.numpy(), row_has_edits.numpy())
        return torch.from_numpy(indices)
    in_range = (rows >= 0) & (rows < row_has_edits.shape[0])
    has = row_has_edits[torch.where(in_range, rows, 0)]
    return (in_range & scope.bool() & has).nonzero().squeeze(1)


def sparse_dots(h: torch.Tensor, enc_t: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """z[t, k] = h[t] · enc_t[feat[t, k]] in float32; h [n, d_in] float32, feat [n, K] valid ids."""
    if feat.numel() > _SMALL:
        uniq, inv = torch.unique(feat, return_inverse=True)
        if uniq.numel() <= _DENSE_FACTOR * feat.shape[1]:
            return (h @ enc_t.index_select(0, uniq).float().T).gather(1, inv)
    step = max(1, _ELEMS // (feat.shape[1] * h.shape[1]))
    parts = [
        torch.bmm(_rows(enc_t, f), hh.unsqueeze(2)).squeeze(2)
        for hh, f in zip(h.split(step), feat.split(step), strict=True)
    ]
    return torch.cat(parts)


def sparse_decode(coef: torch.Tensor, W_dec: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """delta[t] = Σ_k coef[t, k] · W_dec[feat[t, k]] in float32; coef, feat [n, K]."""
    if feat.numel() > _SMALL:
        uniq, inv = torch.unique(feat, return_inverse=True)
        if uniq.numel() <= _DENSE_FACTOR * feat.shape[1]:
            dense = coef.new_zeros((coef.shape[0], uniq.numel())).scatter_add_(1, inv, coef)
            return dense @ W_dec.index_select(0, uniq).float()
    step = max(1, _ELEMS // (feat.shape[1] * W_dec.shape[1]))
    parts = [
        torch.bmm(c.unsqueeze(1), _rows(W_dec, f)).squeeze(1)
        for c, f in zip(coef.split(step), feat.split(step), strict=True)
    ]
    return torch.cat(parts)


def _rows(weight: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """weight[feat] as float32 [n, K, d_in]; index_select gathers about twice as fast as [] here."""
    return weight.index_select(0, feat.reshape(-1)).view(*feat.shape, -1).float()


def topk_pre(
    h: torch.Tensor, enc_t: torch.Tensor, b_enc: torch.Tensor, feat: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [n, K], kth [n]): the pre-activations of the edited features and each token's k-th
    largest pre-activation over all d_sae features, from one full encode done in feature chunks.

    z is taken from the same GEMM output that the k-th value is selected from, so a feature at
    exactly the k-th value is a member (z >= kth) whatever the rounding of a separate dot."""
    n, d_in = h.shape
    d_sae = enc_t.shape[0]
    k = min(k, d_sae)
    best = h.new_full((n, k), float("-inf"))
    z = h.new_zeros(feat.shape)
    step = max(1, _ELEMS // max(n, d_in))
    for start in range(0, d_sae, step):
        stop = min(start + step, d_sae)
        pre = h @ enc_t[start:stop].float().T + b_enc[start:stop].float()
        best = torch.cat([best, pre], dim=1).topk(k, dim=1, sorted=False).values
        inside = (feat >= start) & (feat < stop)
        local = torch.where(inside, feat - start, 0)
        z = torch.where(inside, pre.gather(1, local), z)
    return z, best.min(dim=1).values
