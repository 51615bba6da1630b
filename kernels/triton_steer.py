"""Triton kernels of the steering op and their launcher (CUDA path; runs with TRITON_INTERPRET=1).

Three launches, all with grids that depend only on the token count, no host sync:
  1. _dot_partial_kernel  (tokens × d_in splits): partial dots of h with the K edited features'
     encoder rows, h = hidden (+ residual) read on the fly.
  2. _topk_count_kernel   (TopK SAEs only; token tiles × feature splits): an encode GEMM tile per
     program whose epilogue counts, per edited feature, the other features with a larger
     pre-activation; membership is count < k.
  3. _edit_decode_kernel  (tokens × d_in splits): activation, edit, and
     hidden += Σ (a' − a) W_dec[i] over the program's slice of d_in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .edit_ops import ABLATE, ADD, CAP, FLOOR, SCALE, SET

_SET = tl.constexpr(SET)
_ADD = tl.constexpr(ADD)
_SCALE = tl.constexpr(SCALE)
_ABLATE = tl.constexpr(ABLATE)
_FLOOR = tl.constexpr(FLOOR)
_CAP = tl.constexpr(CAP)

# Programs to aim for per launch when the token count alone would leave SMs idle (decode).
_TARGET_PROGRAMS_PER_SM = 2
_INTERPRETER_SMS = 2


@triton.jit
def _edit(a, op, v):
    out = tl.where(op == _SET, v, a)
    out = tl.where(op == _ADD, a + v, out)
    out = tl.where(op == _SCALE, a * v, out)
    out = tl.where(op == _ABLATE, 0.0, out)
    out = tl.where(op == _FLOOR, tl.maximum(a, v), out)
    return tl.where(op == _CAP, tl.minimum(a, v), out)


@triton.jit
def _steered(tok_row_ptr, tok_scope_ptr, t, mask, n_rows):
    """(row, steered) of token(s) t; rows out of [0, n_rows) or out of scope are unsteered."""
    r = tl.load(tok_row_ptr + t, mask=mask, other=-1)
    s = tl.load(tok_scope_ptr + t, mask=mask, other=0)
    steered = mask & (r >= 0) & (r < n_rows) & (s != 0)
    return tl.where(steered, r, 0).to(tl.int32), steered


@triton.jit
def _z_from_partials(part_ptr, b_enc_ptr, t, feat, valid, mask, split, K_PAD: tl.constexpr):
    """z = Σ_s partial[t, s, :] + b_enc[feat]; t and feat broadcast ([K_PAD] or [BT, K_PAD])."""
    ks = tl.arange(0, K_PAD)
    base = t.to(tl.int64) * split * K_PAD
    z = tl.load(part_ptr + base + ks, mask=mask, other=0.0)
    for i in range(1, split):
        z += tl.load(part_ptr + base + i * K_PAD + ks, mask=mask, other=0.0)
    return z + tl.load(b_enc_ptr + feat, mask=valid, other=0.0)


@triton.jit
def _dot_partial_kernel(
    hidden_ptr, residual_ptr, enc_ptr, tok_row_ptr, tok_scope_ptr, row_feat_ptr, part_ptr,
    d_in, d_sae, n_rows, n_slots, chunk_d, split,
    stride_h, stride_r, stride_e,
    HAS_RESIDUAL: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    s = tl.program_id(1)
    r, steered = _steered(tok_row_ptr, tok_scope_ptr, t, t >= 0, n_rows)
    if steered:
        ks = tl.arange(0, K_PAD)
        feat = tl.load(row_feat_ptr + r * n_slots + ks, mask=ks < n_slots, other=-1)
        valid = (ks < n_slots) & (feat >= 0) & (feat < d_sae)
        rows = tl.where(valid, feat, 0).to(tl.int64) * stride_e
        h_row = hidden_ptr + t.to(tl.int64) * stride_h
        r_row = residual_ptr + t.to(tl.int64) * stride_r
        acc = tl.zeros([K_PAD, BLOCK_D], dtype=tl.float32)
        d_lo = s * chunk_d
        for d0 in range(d_lo, d_lo + chunk_d, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            dm = offs < d_in
            h = tl.load(h_row + offs, mask=dm, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_row + offs, mask=dm, other=0.0).to(tl.float32)
            e_mask = valid[:, None] & dm[None, :]
            e = tl.load(enc_ptr + rows[:, None] + offs[None, :], mask=e_mask, other=0.0)
            acc += e.to(tl.float32) * h[None, :]
        tl.store(part_ptr + (t.to(tl.int64) * split + s) * K_PAD + ks, tl.sum(acc, axis=1))


@triton.jit
def _topk_count_kernel(
    hidden_ptr, residual_ptr, enc_ptr, b_enc_ptr, tok_row_ptr, tok_scope_ptr, row_feat_ptr,
    part_ptr, count_ptr,
    n_tok, d_in, d_sae, n_rows, n_slots, split, feats_per_prog,
    stride_h, stride_r, stride_e,
    HAS_RESIDUAL: tl.constexpr, SPLIT_HI_LO: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r, steered = _steered(tok_row_ptr, tok_scope_ptr, ts, ts < n_tok, n_rows)
    if tl.max(steered.to(tl.int32), axis=0) > 0:
        ks = tl.arange(0, K_PAD)
        slot_mask = steered[:, None] & (ks < n_slots)[None, :]
        feat = tl.load(row_feat_ptr + r[:, None] * n_slots + ks[None, :], mask=slot_mask, other=-1)
        valid = slot_mask & (feat >= 0) & (feat < d_sae)
        z = _z_from_partials(
            part_ptr, b_enc_ptr, ts[:, None], tl.where(valid, feat, 0), valid, slot_mask,
            split, K_PAD,
        )  # fmt: skip
        t_rows = ts.to(tl.int64)
        count = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        f_lo = tl.program_id(1) * feats_per_prog
        f_hi = tl.minimum(f_lo + feats_per_prog, d_sae)
        for f0 in range(f_lo, f_hi, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            fm = fs < f_hi
            acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
            for d0 in range(0, d_in, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                hm = steered[:, None] & (ds < d_in)[None, :]
                h_offs = t_rows[:, None] * stride_h + ds[None, :]
                h = tl.load(hidden_ptr + h_offs, mask=hm, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    r_offs = t_rows[:, None] * stride_r + ds[None, :]
                    h += tl.load(residual_ptr + r_offs, mask=hm, other=0.0).to(tl.float32)
                e_offs = fs[None, :].to(tl.int64) * stride_e + ds[:, None]
                e = tl.load(enc_ptr + e_offs, mask=fm[None, :] & (ds < d_in)[:, None], other=0.0)
                if SPLIT_HI_LO:
                    # h as hi + lo in the weights' 16-bit type: two tensor-core dots give pre
                    # with ~16 mantissa bits of h, close enough to the fp32 z it is compared to.
                    hi = h.to(e.dtype)
                    acc = tl.dot(hi, e, acc)
                    acc = tl.dot((h - hi.to(tl.float32)).to(e.dtype), e, acc)
                else:
                    acc = tl.dot(h, e.to(tl.float32), acc, input_precision="ieee")
            pre = acc + tl.load(b_enc_ptr + fs, mask=fm, other=0.0)[None, :]
            for kk in range(0, n_slots):
                sel = ks[None, :] == kk
                z_k = tl.sum(tl.where(sel, z, 0.0), axis=1)
                f_k = tl.sum(tl.where(sel, feat, 0), axis=1)
                above = (pre > z_k[:, None]) & (fs[None, :] != f_k[:, None]) & fm[None, :]
                count += tl.where(sel, tl.sum(above.to(tl.int32), axis=1)[:, None], 0)
        tl.atomic_add(count_ptr + t_rows[:, None] * K_PAD + ks[None, :], count, mask=slot_mask)


@triton.jit
def _edit_decode_kernel(
    hidden_ptr, dec_ptr, b_enc_ptr, threshold_ptr, tok_row_ptr, tok_scope_ptr,
    row_feat_ptr, row_val_ptr, row_op_ptr, part_ptr, count_ptr,
    d_in, d_sae, n_rows, n_slots, chunk_d, split, topk_k,
    stride_h, stride_w,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    s = tl.program_id(1)
    r, steered = _steered(tok_row_ptr, tok_scope_ptr, t, t >= 0, n_rows)
    if steered:
        ks = tl.arange(0, K_PAD)
        km = ks < n_slots
        feat = tl.load(row_feat_ptr + r * n_slots + ks, mask=km, other=-1)
        valid = km & (feat >= 0) & (feat < d_sae)
        feat = tl.where(valid, feat, 0)
        z = _z_from_partials(part_ptr, b_enc_ptr, t, feat, valid, km | ~km, split, K_PAD)
        if TOPK:
            count = tl.load(count_ptr + t.to(tl.int64) * K_PAD + ks)
            a = tl.where(count < topk_k, tl.maximum(z, 0.0), 0.0)
        else:
            theta = tl.maximum(tl.load(threshold_ptr + feat, mask=valid, other=0.0), 0.0)
            a = tl.where(z > theta, z, 0.0)
        op = tl.load(row_op_ptr + r * n_slots + ks, mask=km, other=-1)
        value = tl.load(row_val_ptr + r * n_slots + ks, mask=km, other=0.0)
        coef = tl.where(valid, _edit(a, op, value) - a, 0.0)
        rows = feat.to(tl.int64) * stride_w
        h_row = hidden_ptr + t.to(tl.int64) * stride_h
        d_lo = s * chunk_d
        # A row with no edit of this SAE (its spec edits others) leaves the token's bits as
        # they are: adding a zero delta would turn -0.0 into +0.0.
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            for d0 in range(d_lo, d_lo + chunk_d, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                dm = offs < d_in
                w_mask = valid[:, None] & dm[None, :]
                w = tl.load(dec_ptr + rows[:, None] + offs[None, :], mask=w_mask, other=0.0)
                delta = tl.sum(coef[:, None] * w.to(tl.float32), axis=0)
                h = tl.load(h_row + offs, mask=dm)
                tl.store(h_row + offs, (h.to(tl.float32) + delta).to(h.dtype), mask=dm)


def steer_triton_(
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
    *,
    block_d: int | None = None,
    split_d: int | None = None,
    block_t: int | None = None,
    block_f: int | None = None,
    split_f: int | None = None,
) -> None:
    """Steer `hidden` in place (contract of torch.ops.sae_vllm.steer_) with the Triton kernels.

    Launch shapes depend only on the token count and the static shapes; the keyword-only
    block/split sizes override the defaults (tests use them to cover every code path)."""
    n_tok, d_in = hidden.shape
    n_rows, n_slots = row_feat.shape
    d_sae = enc_t.shape[0]
    if n_tok == 0 or n_slots == 0:
        return
    if hidden.stride(1) != 1:
        raise ValueError("hidden must have unit stride along d_in")
    has_residual = residual is not None
    if has_residual:
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
    else:
        residual = hidden
    enc_t, W_dec = enc_t.contiguous(), W_dec.contiguous()
    row_feat, row_val, row_op = row_feat.contiguous(), row_val.contiguous(), row_op.contiguous()
    tok_scope = tok_scope.view(torch.uint8) if tok_scope.dtype == torch.bool else tok_scope
    k_pad = triton.next_power_of_2(n_slots)
    sms = _num_sms(hidden.device)

    block_d = block_d or max(32, min(512, 4096 // k_pad, triton.next_power_of_2(d_in)))
    n_blocks = triton.cdiv(d_in, block_d)
    split_d = split_d or min(n_blocks, max(1, triton.cdiv(_TARGET_PROGRAMS_PER_SM * sms, n_tok)))
    chunk_d = triton.cdiv(n_blocks, split_d) * block_d
    split_d = triton.cdiv(d_in, chunk_d)

    part = torch.empty((n_tok, split_d, k_pad), dtype=torch.float32, device=hidden.device)
    _dot_partial_kernel[(n_tok, split_d)](
        hidden, residual, enc_t, tok_row, tok_scope, row_feat, part,
        d_in, d_sae, n_rows, n_slots, chunk_d, split_d,
        hidden.stride(0), residual.stride(0), enc_t.stride(0),
        HAS_RESIDUAL=has_residual, K_PAD=k_pad, BLOCK_D=block_d,
    )  # fmt: skip

    count = part
    if topk_k > 0:
        count = torch.zeros((n_tok, k_pad), dtype=torch.int32, device=hidden.device)
        # Tiles that compile without register spills on sm_90 (8 warps, 32-wide d_in steps).
        block_t = block_t or (16 if n_tok <= 16 else 64)
        block_f = block_f or (128 if block_t == 16 else 64)
        t_tiles = triton.cdiv(n_tok, block_t)
        f_tiles = triton.cdiv(d_sae, block_f)
        split_f = split_f or min(f_tiles, max(1, triton.cdiv(4 * sms, t_tiles)))
        feats_per_prog = triton.cdiv(f_tiles, split_f) * block_f
        split_f = triton.cdiv(d_sae, feats_per_prog)
        # Triton's interpreter mis-computes tl.dot on bfloat16 inputs, so off CUDA the tile
        # GEMM runs in float32.
        split_hi_lo = enc_t.dtype != torch.float32 and hidden.is_cuda
        _topk_count_kernel[(t_tiles, split_f)](
            hidden, residual, enc_t, b_enc, tok_row, tok_scope, row_feat, part, count,
            n_tok, d_in, d_sae, n_rows, n_slots, split_d, feats_per_prog,
            hidden.stride(0), residual.stride(0), enc_t.stride(0),
            HAS_RESIDUAL=has_residual, SPLIT_HI_LO=split_hi_lo, K_PAD=k_pad,
            BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_D=32, num_warps=8,
        )  # fmt: skip

    _edit_decode_kernel[(n_tok, split_d)](
        hidden, W_dec, b_enc, threshold, tok_row, tok_scope, row_feat, row_val, row_op,
        part, count,
        d_in, d_sae, n_rows, n_slots, chunk_d, split_d, topk_k,
        hidden.stride(0), W_dec.stride(0),
        TOPK=topk_k > 0, K_PAD=k_pad, BLOCK_D=block_d,
    )  # fmt: skip


_sm_counts: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]
