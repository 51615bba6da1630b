"""Steering kernels on CUDA: compiled Triton vs the torch reference at real shapes, CUDA graphs.

Runs where the package is installed and on a bare GPU box with `PYTHONPATH=. pytest
tests/test_kernels_gpu.py` (only torch and triton needed); skipped without CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

try:
    from sae_vllm.kernels import OP_CODES, prepare_weights, steer_reference_
except ImportError:  # bare checkout on PYTHONPATH
    from kernels import OP_CODES, prepare_weights, steer_reference_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ARCHS = ("relu", "jumprelu", "topk")


@dataclass
class Inputs:
    """Weights (prepared), activations and edit tables on the GPU; tables sized for max rows."""

    weights: object
    hidden: torch.Tensor
    residual: torch.Tensor | None
    row_feat: torch.Tensor
    row_val: torch.Tensor
    row_op: torch.Tensor
    tok_row: torch.Tensor
    tok_scope: torch.Tensor

    def args(self, hidden: torch.Tensor) -> tuple:
        w = self.weights
        return (
            hidden, self.residual, w.enc_t, w.b_enc, w.threshold, w.W_dec,
            self.row_feat, self.row_val, self.row_op, self.tok_row, self.tok_scope, w.k,
        )  # fmt: skip


def make_weights(arch: str, d_in: int, d_sae: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda")

    W_dec = randn(d_sae, d_in)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T * 0.8 + 0.05 * randn(d_in, d_sae)
    threshold = (0.5 + 0.2 * randn(d_sae)).abs() if arch == "jumprelu" else None
    k = 64 if arch == "topk" else None
    return prepare_weights(
        W_enc,
        -0.5 + 0.1 * randn(d_sae),
        W_dec,
        0.3 * randn(d_in),
        threshold,
        k,
        True,
        dtype,
        "cuda",
    )


def fill_tables(inputs: Inputs, n_tok: int, n_slots: int, d_sae: int, seed: int) -> None:
    """Rewrite the tables and token buffers in place: a distinct row per steered token, distinct
    features per row, some empty slots, every op, about 1/8 of tokens unsteered or out of scope."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_rows = inputs.row_feat.shape[0]
    feats = torch.rand(n_rows, d_sae, generator=g, device="cuda").argsort(dim=1)[:, :n_slots]
    feats[torch.rand(n_rows, n_slots, generator=g, device="cuda") < 0.1] = -1
    inputs.row_feat.copy_(feats)
    ops = torch.randint(0, len(OP_CODES), (n_rows, n_slots), generator=g, device="cuda")
    inputs.row_op.copy_(ops)
    inputs.row_val.copy_(4.0 * torch.randn(n_rows, n_slots, generator=g, device="cuda"))
    rows = torch.randperm(n_rows, generator=g, device="cuda")[: inputs.tok_row.shape[0]]
    rows[torch.rand(rows.shape, generator=g, device="cuda") < 0.1] = -1
    inputs.tok_row.copy_(rows.to(torch.int32))
    inputs.tok_scope.copy_(torch.rand(rows.shape, generator=g, device="cuda") < 0.95)


def make_inputs(weights, n_tok: int, n_slots: int, residual: bool, seed: int, pad: int = 0):
    d_sae, d_in = weights.enc_t.shape
    dtype = weights.enc_t.dtype
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    n_buf = n_tok + pad
    inputs = Inputs(
        weights=weights,
        hidden=(3.0 * torch.randn(n_tok, d_in, generator=g, device="cuda") + 1.0).to(dtype),
        residual=torch.randn(n_tok, d_in, generator=g, device="cuda").to(dtype)
        if residual
        else None,
        row_feat=torch.full((n_buf, n_slots), -1, dtype=torch.int32, device="cuda"),
        row_val=torch.zeros((n_buf, n_slots), dtype=torch.float32, device="cuda"),
        row_op=torch.zeros((n_buf, n_slots), dtype=torch.int32, device="cuda"),
        tok_row=torch.full((n_buf,), -1, dtype=torch.int32, device="cuda"),
        tok_scope=torch.zeros((n_buf,), dtype=torch.bool, device="cuda"),
    )
    fill_tables(inputs, n_tok, n_slots, d_sae, seed)
    return inputs


def reference(inputs: Inputs, hidden: torch.Tensor) -> torch.Tensor:
    out = hidden.clone()
    steer_reference_(*inputs.args(out))
    return out


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, hidden: torch.Tensor) -> None:
    """Within two bfloat16 ulps of the reference; both round an fp32 sum of the same terms."""
    err = (got.float() - want.float()).abs()
    tol = 2.0**-6 * want.float().abs() + 1e-2
    assert (err <= tol).all(), f"max err {err.max().item():.3g}"
    assert not torch.equal(got, hidden), "nothing was steered"


def steered_mask(inputs: Inputs, n_tok: int) -> torch.Tensor:
    rows = inputs.tok_row[:n_tok]
    return (rows >= 0) & (rows < inputs.row_feat.shape[0]) & inputs.tok_scope[:n_tok]


@pytest.fixture(scope="module", params=[(2304, 16384), (4096, 65536)], ids=["2304x16k", "4096x65k"])
def sae_shape(request):
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_tok,n_slots", [(1, 1), (8, 8), (64, 32), (300, 8), (1024, 32)])
def test_triton_matches_reference(sae_shape, arch, n_tok, n_slots):
    d_in, d_sae = sae_shape
    weights = make_weights(arch, d_in, d_sae, torch.bfloat16)
    inputs = make_inputs(weights, n_tok, n_slots, residual=True, seed=n_tok)
    want = reference(inputs, inputs.hidden)
    got = inputs.hidden.clone()
    torch.ops.sae_vllm.steer_(*inputs.args(got))
    torch.cuda.synchronize()
    assert_close_bf16(got, want, inputs.hidden)
    unsteered = ~steered_mask(inputs, n_tok)
    assert torch.equal(got[unsteered].view(torch.int16), inputs.hidden[unsteered].view(torch.int16))


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_working_copy_of_a_bfloat16_layer(sae_shape, arch):
    """As the engine calls it for a bf16 model: hidden is a float32 copy, the residual and the
    weights bf16; unsteered rows stay bit-identical."""
    d_in, d_sae = sae_shape
    weights = make_weights(arch, d_in, d_sae, torch.bfloat16)
    inputs = make_inputs(weights, 64, 8, residual=True, seed=5)
    hidden = inputs.hidden.float()
    want = reference(inputs, hidden)
    got = hidden.clone()
    torch.ops.sae_vllm.steer_(*inputs.args(got))
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=2.0**-9, atol=1e-2)
    assert not torch.equal(got, hidden), "nothing was steered"
    unsteered = ~steered_mask(inputs, 64)
    assert torch.equal(got[unsteered].view(torch.int32), hidden[unsteered].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_and_single_tensor_layers(dtype):
    weights = make_weights("topk", 2048, 8192, dtype)
    inputs = make_inputs(weights, 48, 8, residual=False, seed=3)
    want = reference(inputs, inputs.hidden)
    got = inputs.hidden.clone()
    torch.ops.sae_vllm.steer_(*inputs.args(got))
    rtol = 2.0**-9 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-3)
    assert not torch.equal(got, inputs.hidden)


def test_padded_tail_is_not_read_or_written():
    weights = make_weights("jumprelu", 2304, 16384, torch.bfloat16)
    inputs = make_inputs(weights, 40, 8, residual=True, seed=5, pad=24)
    buf = torch.full((64, 2304), float("nan"), dtype=torch.bfloat16, device="cuda")
    buf[:40] = inputs.hidden
    inputs.tok_row[40:] = torch.arange(24, dtype=torch.int32, device="cuda")  # valid rows
    inputs.tok_scope[40:] = True
    before = buf.clone()
    torch.ops.sae_vllm.steer_(*inputs.args(buf[:40]))
    assert torch.equal(buf[40:].view(torch.int16), before[40:].view(torch.int16))
    assert_close_bf16(buf[:40], reference(inputs, inputs.hidden), inputs.hidden)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_replay_follows_buffer_updates(arch):
    """Capture once; between replays rewrite hidden, residual, the edit tables and the token
    buffers in place; every replay must equal the reference for the current contents."""
    n_tok, n_slots, d_in, d_sae = 96, 8, 2304, 16384
    weights = make_weights(arch, d_in, d_sae, torch.bfloat16)
    inputs = make_inputs(weights, n_tok, n_slots, residual=True, seed=11)
    static = inputs.hidden.clone()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up compiles the kernels outside the capture
            torch.ops.sae_vllm.steer_(*inputs.args(static))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.sae_vllm.steer_(*inputs.args(static))

    g = torch.Generator(device="cuda").manual_seed(99)
    outputs = []
    for step in range(4):
        fresh = torch.randn(n_tok, d_in, generator=g, device="cuda").to(torch.bfloat16) * 3
        inputs.hidden.copy_(fresh)
        inputs.residual.copy_(torch.randn(n_tok, d_in, generator=g, device="cuda"))
        fill_tables(inputs, n_tok, n_slots, d_sae, seed=100 + step)
        if step == 3:
            inputs.tok_row.fill_(-1)  # nothing steered: replay must leave hidden as is
        want = reference(inputs, inputs.hidden)
        static.copy_(inputs.hidden)
        graph.replay()
        torch.cuda.synchronize()
        if step == 3:
            assert torch.equal(static.view(torch.int16), inputs.hidden.view(torch.int16))
        else:
            assert_close_bf16(static, want, inputs.hidden)
        outputs.append(static.clone())
    assert not torch.equal(outputs[0], outputs[1])


def test_op_under_torch_compile_cuda():
    weights = make_weights("topk", 2304, 16384, torch.bfloat16)
    inputs = make_inputs(weights, 32, 8, residual=True, seed=21)

    def step(hidden, *args):
        out = hidden.clone()
        torch.ops.sae_vllm.steer_(out, *args)
        return out.float() * 0.5

    eager = step(*inputs.args(inputs.hidden))
    compiled = torch.compile(step, fullgraph=True)(*inputs.args(inputs.hidden))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert not torch.equal(eager, inputs.hidden.float() * 0.5)
