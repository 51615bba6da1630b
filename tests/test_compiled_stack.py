"""The steering op inside a torch.compile'd stack of HF Llama decoder layers equals eager, and
follows edit-table updates made in place between calls (on CUDA: replays of captured graphs);
so does it with each token's row placed on the device from its position (DevicePlacement, as
the engine does under async scheduling with speculative decoding), positions and segment
bounds changed in place between calls.

The GPU test runs at 8B width on a bare GPU box too: `PYTHONPATH=. pytest
tests/test_compiled_stack.py` (torch, triton and transformers only). Its CPU twin runs the same
checks at a small width with inductor on CPU, where the op takes the numpy path."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from sae_vllm.engine.device_placement import DevicePlacement

try:
    from sae_vllm.kernels import OP_CODES, prepare_weights
except ImportError:  # bare checkout on PYTHONPATH
    from kernels import OP_CODES, prepare_weights

NO_EDGE = torch.iinfo(torch.int64).max  # a padded segment edge, as the engine's tables hold


@dataclass(frozen=True)
class StackShape:
    """Decoder width, depth, SAE size and the layer it steers after."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    d_sae: int
    sae_layer: int


class SteeredStack(nn.Module):
    """Llama decoder layers with the steering op on the output of layer `sae_layer`; the SAE
    weights and edit tables are buffers, as in the engine, so compilation lifts them as inputs.
    `placed`: tokens find their row through a DevicePlacement instead of `tok_row`."""

    def __init__(
        self, shape: StackShape, n_tok: int, n_slots: int, device: str, placed: bool = False
    ) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        super().__init__()
        config = LlamaConfig(
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            num_hidden_layers=shape.layers,
            max_position_embeddings=max(2048, n_tok),
        )
        config._attn_implementation = "sdpa"
        layers = [LlamaDecoderLayer(config, i) for i in range(shape.layers)]
        self.layers = nn.ModuleList(layers).to(device, torch.bfloat16)
        self.rotary = LlamaRotaryEmbedding(config).to(device)
        self.sae_layer = shape.sae_layer
        gen = torch.Generator().manual_seed(0)
        W_dec = torch.randn(shape.d_sae, shape.hidden, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T * 0.8 + 0.05 * torch.randn(shape.hidden, shape.d_sae, generator=gen)
        b_enc = -0.5 + 0.1 * torch.randn(shape.d_sae, generator=gen)
        b_dec = 0.1 * torch.randn(shape.hidden, generator=gen)
        weights = prepare_weights(
            W_enc, b_enc, W_dec, b_dec, None, None, True, torch.bfloat16, device
        )
        self.topk_k = int(weights.k)
        for name in ("enc_t", "b_enc", "threshold", "W_dec"):
            self.register_buffer(name, getattr(weights, name), persistent=False)
        # The tests put every steered token on row 0; a few rows keep the tables engine-shaped.
        tables = {
            "row_feat": torch.full((4, n_slots), -1, dtype=torch.int32),
            "row_val": torch.zeros((4, n_slots), dtype=torch.float32),
            "row_op": torch.zeros((4, n_slots), dtype=torch.int32),
            "tok_row": torch.full((n_tok,), -1, dtype=torch.int32),
            "tok_scope": torch.ones((n_tok,), dtype=torch.bool),
        }
        for name, tensor in tables.items():
            self.register_buffer(name, tensor.to(device), persistent=False)
        self.placement = None
        if placed:  # one request, its first row 0, of 4 rows and 8 edges as the engine's tables
            self.placement = DevicePlacement(
                torch.zeros(n_tok, dtype=torch.int64, device=device),
                torch.full((n_tok,), -1, dtype=torch.int32, device=device),
                torch.full((5, 8), NO_EDGE, dtype=torch.int64, device=device),
                torch.full((5, 9), -1, dtype=torch.int32, device=device),
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.rotary(hidden, positions)
        for index, layer in enumerate(self.layers):
            out = layer(hidden, position_embeddings=rotary, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
            if index == self.sae_layer:
                # As the engine's steered layer does: steer a float32 working copy.
                working = hidden.float().contiguous().view(-1, hidden.shape[-1])
                tok_row, tok_scope = self.tok_row, self.tok_scope
                if self.placement is not None:
                    tok_row, tok_scope = self.placement(working.shape[0])
                torch.ops.sae_vllm.steer_(
                    working, None, self.enc_t, self.b_enc, self.threshold, self.W_dec,
                    self.row_feat, self.row_val, self.row_op, tok_row, tok_scope, self.topk_k,
                )  # fmt: skip
                hidden = working.view(hidden.shape).to(hidden.dtype)
        return hidden


def set_tables(
    stack: SteeredStack, edits: list[tuple[int, str, float]], first: int, offset: int
) -> None:
    """Row 0 gets `edits` (feature, op, value); tokens from `first` on use it, earlier ones none.
    Written in place, as the engine writes them between steps. Placed on the device, the tokens
    sit at positions `offset` on, and row 0's segment starts at `first + offset`."""
    stack.row_feat.fill_(-1)
    stack.tok_row.fill_(-1)
    for slot, (feature, op, value) in enumerate(edits):
        stack.row_feat[0, slot] = feature
        stack.row_op[0, slot] = OP_CODES[op]
        stack.row_val[0, slot] = value
    placement = stack.placement
    if placement is not None:
        placement.tok_first.fill_(0 if edits else -1)
        placement.segment_edges[0, 0] = first + offset
        placement.segment_rows[0, 1] = 0
        n_tok = placement.positions.shape[0]
        placement.positions.copy_(torch.arange(offset, offset + n_tok))
    elif edits:
        stack.tok_row[first:] = 0


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def cudagraph_skips() -> int:
    """How often inductor has fallen back from CUDA graphs in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def check_compiled_equals_eager(
    shape: StackShape,
    device: str,
    n_tok: int,
    compile_mode: str | None,
    tolerance: float,
    placed: bool = False,
) -> None:
    """Eager and compiled runs under three table contents (two edits sets, then none), tables
    changed in place between the calls; compiled equals eager each time, steering shows where
    it should (from the first steered token on) and nowhere else. Placed on the device, each
    call's positions and segment edge differ from the last's, which a graph that kept the
    traced ones would not follow."""
    skips_before = cudagraph_skips()
    torch.manual_seed(0)
    stack = SteeredStack(shape, n_tok, n_slots=4, device=device, placed=placed).eval()
    compiled = torch.compile(stack, mode=compile_mode, fullgraph=True)
    x = torch.randn(1, n_tok, shape.hidden, device=device, dtype=torch.bfloat16)
    first = n_tok // 2
    norm = shape.hidden**0.5  # a token's typical norm: edits this size move it visibly
    settings = {
        "set": [(7, "set", 2.5 * norm), (11, "ablate", 0.0)],
        "add": [(3, "add", -1.5 * norm), (7, "scale", 3.0), (12, "set", 2.0 * norm)],
        "none": [],
    }
    eager_out, compiled_out = {}, {}
    with torch.no_grad():
        for round_index in range(2):  # the first calls compile (and on CUDA record the graph)
            for index, (name, edits) in enumerate(settings.items()):
                set_tables(stack, edits, first, offset=1000 * (3 * round_index + index))
                eager_out[name] = stack(x).clone()
                compiled_out[name] = compiled(x).clone()
    for name in settings:
        assert relative_error(compiled_out[name], eager_out[name]) < tolerance, name
    if compile_mode == "reduce-overhead":
        assert cudagraph_skips() == skips_before, "inductor ran the stack without CUDA graphs"
    for name in ("set", "add"):
        for out in (eager_out, compiled_out):
            # Causal attention: tokens before the first steered one are untouched.
            assert torch.equal(out[name][:, :first], out["none"][:, :first]), name
            moved = relative_error(out[name][:, first:], out["none"][:, first:])
            assert moved > 20 * tolerance, (name, moved)
    assert relative_error(compiled_out["set"][:, first:], compiled_out["add"][:, first:]) > (
        20 * tolerance
    )


@pytest.mark.parametrize("placed", [False, True], ids=["host-placed", "device-placed"])
def test_compiled_stack_equals_eager_and_follows_table_updates_cpu(placed):
    shape = StackShape(
        hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, d_sae=1024, sae_layer=1
    )
    check_compiled_equals_eager(
        shape, "cpu", n_tok=24, compile_mode=None, tolerance=2e-2, placed=placed
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("placed", [False, True], ids=["host-placed", "device-placed"])
def test_compiled_stack_at_8b_width_under_cuda_graphs_equals_eager(placed):
    """Llama-3-8B layer shapes, three layers, a 65k-feature SAE after the second; compiled with
    mode="reduce-overhead" so every call after the first replays captured CUDA graphs."""
    shape = StackShape(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=3, d_sae=65536, sae_layer=1
    )
    check_compiled_equals_eager(
        shape, "cuda", n_tok=64, compile_mode="reduce-overhead", tolerance=2e-2, placed=placed
    )
