"""The steered decoder layer: eager, it steers the layer's own bfloat16 output in place (no
float32 copies, no allocation per step); torch.compile'd, it goes through float32 copies; in
both, unsteered rows are left as the layer produced them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_vllm.engine.steered_layer import SAESteering, steer_layer
from sae_vllm.engine.tables import EditTable
from sae_vllm.kernels import OP_CODES, prepare_weights

D_IN, D_SAE, TOKENS, EDITS = 64, 256, 12, 4
STEERED_TOKENS = (1, 4, 5, 9)


class PairLayer(nn.Module):
    """A decoder layer's shape as vLLM's Llama has it: (hidden, residual) in, the pair out."""

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor):
        return hidden * 1.5, residual + hidden


def steered_pair_layer(dtype: torch.dtype) -> PairLayer:
    gen = torch.Generator().manual_seed(0)
    weights = prepare_weights(
        torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5,
        torch.zeros(D_SAE),
        torch.randn(D_SAE, D_IN, generator=gen) / D_SAE**0.5,
        torch.zeros(D_IN),
        None,
        None,
        False,
        dtype,
        "cpu",
    )
    table = EditTable(len(STEERED_TOKENS), EDITS, torch.device("cpu"))
    for row in range(len(STEERED_TOKENS)):
        features = [row * EDITS + slot for slot in range(EDITS)]
        table.write_row(row, features, [6.0] * EDITS, [OP_CODES["set"]] * EDITS)
    tok_row = torch.full((TOKENS,), -1, dtype=torch.int32)
    tok_row[list(STEERED_TOKENS)] = torch.arange(len(STEERED_TOKENS), dtype=torch.int32)
    tok_scope = torch.ones(TOKENS, dtype=torch.bool)
    layer = PairLayer()
    steer_layer(layer, SAESteering("s", weights, table, tok_row, tok_scope))
    return layer


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(TOKENS, D_IN, generator=gen).to(dtype)
    return hidden, torch.randn(TOKENS, D_IN, generator=gen).to(dtype)


def test_the_steered_model_prints_which_sae_steers_a_layer():
    assert "SAESteering(sae='s', d_sae=" in repr(steered_pair_layer(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_eager_steers_the_layer_output_in_place(dtype, monkeypatch):
    layer = steered_pair_layer(dtype)
    hidden, residual = inputs(dtype)
    plain_hidden, _ = PairLayer.forward(layer, hidden, residual)
    returned_by_the_layer = []
    base_forward = PairLayer.forward

    def remember_output(self, *args):
        returned_by_the_layer.append(base_forward(self, *args))
        return returned_by_the_layer[-1]

    monkeypatch.setattr(PairLayer, "forward", remember_output)
    out_hidden, _ = layer(hidden, residual)
    assert out_hidden.dtype == dtype
    steered = torch.zeros(TOKENS, dtype=torch.bool)
    steered[list(STEERED_TOKENS)] = True
    assert torch.equal(out_hidden[~steered], plain_hidden[~steered])
    assert (out_hidden[steered] != plain_hidden[steered]).any(dim=1).all()
    # In place: the op wrote into the tensor the layer itself returned, nothing was copied.
    assert out_hidden.data_ptr() == returned_by_the_layer[0][0].data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_matches_eager(dtype):
    """Compiled, the op steers a float32 copy that holds the layer's product unrounded (inductor
    fuses it), so steered rows may differ from eager in the last bit; unsteered rows may not."""
    layer = steered_pair_layer(dtype)
    hidden, residual = inputs(dtype)
    eager_hidden, eager_residual = layer(hidden, residual)
    compiled_hidden, compiled_residual = torch.compile(layer, fullgraph=True)(hidden, residual)
    assert compiled_hidden.dtype == dtype
    steered = list(STEERED_TOKENS)
    unsteered = [t for t in range(TOKENS) if t not in STEERED_TOKENS]
    assert torch.equal(compiled_hidden[unsteered], eager_hidden[unsteered])
    assert torch.equal(compiled_residual, eager_residual)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(compiled_hidden[steered], eager_hidden[steered], rtol=ulp, atol=ulp)
