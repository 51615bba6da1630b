"""Decoder-layer surgery: swap a layer's class for one whose output goes through the steering op."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import SteeringWeights
from .device_placement import DevicePlacement
from .tables import EditTable


class SAESteering(nn.Module):
    """One SAE's steering weights, edit table and the shared token buffers, held as buffers so
    torch.compile lifts them as graph inputs, and the op call that edits the residual stream.
    With a `placement` (shared by the SAEs), each token's row and scope are derived on the
    device instead of read from the token buffers."""

    def __init__(
        self,
        sae_id: str,
        weights: SteeringWeights,
        table: EditTable,
        tok_row: torch.Tensor,
        tok_scope: torch.Tensor,
        placement: DevicePlacement | None = None,
    ):
        super().__init__()
        self.sae_id = sae_id
        self.placement = placement
        self.topk_k = int(weights.k)
        for name, tensor in (
            ("enc_t", weights.enc_t),
            ("b_enc", weights.b_enc),
            ("threshold", weights.threshold),
            ("W_dec", weights.W_dec),
            ("row_feat", table.feature),
            ("row_val", table.value),
            ("row_op", table.op),
            ("tok_row", tok_row),
            ("tok_scope", tok_scope),
        ):
            self.register_buffer(name, tensor, persistent=False)

    def extra_repr(self) -> str:  # how the steered model prints this module
        return f"sae={self.sae_id!r}, d_sae={self.W_dec.shape[0]}, topk_k={self.topk_k}"

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        tok_row, tok_scope = self.tok_row, self.tok_scope
        if self.placement is not None:
            tok_row, tok_scope = self.placement(hidden.shape[0])
        torch.ops.sae_vllm.steer_(
            hidden,
            residual,
            self.enc_t,
            self.b_enc,
            self.threshold,
            self.W_dec,
            self.row_feat,
            self.row_val,
            self.row_op,
            tok_row,
            tok_scope,
            self.topk_k,
        )


_steered_classes: dict[type, type] = {}


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _steered_class(base: type[nn.Module]) -> type[nn.Module]:
    if base in _steered_classes:
        return _steered_classes[base]

    class SteeredLayer(base):  # type: ignore[valid-type, misc]
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            if isinstance(output, tuple):
                hidden = output[0]
                residual = output[1] if len(output) > 1 else None
            else:
                hidden, residual = output, None
            if torch.compiler.is_compiling():
                # Traced for inductor, a low-precision output is steered in a float32 copy, and
                # the op reads the residual through a float32 copy too. Inductor fuses a
                # layer's last pointwise ops (Gemma 2's post-norm, the residual add of vLLM's
                # RMSNorm) into the next layer and drops the bfloat16 round trip between them;
                # an op given a bfloat16 tensor would make inductor store it rounded, the next
                # layer would read the rounded value, and unsteered requests would no longer
                # match vLLM without the plugin. The copies hold the unrounded values instead.
                # Run eagerly, every tensor is already rounded and the op steers it in place.
                working = _float32(hidden)
                residual_read = None if residual is None else _float32(residual)
            else:
                working, residual_read = hidden, residual
            for steering in self.sae_steering:
                steering(working, residual_read)
            if working is hidden:
                return output
            steered = working.to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

    SteeredLayer.__name__ = SteeredLayer.__qualname__ = f"SAESteered{base.__name__}"
    _steered_classes[base] = SteeredLayer
    return SteeredLayer


def steer_layer(layer: nn.Module, steering: SAESteering) -> None:
    """Make `layer` apply `steering` to its output (the residual stream after the layer).
    The class is swapped in place, not wrapped, so module names and weights stay as vLLM
    expects; several SAEs on one layer apply in order."""
    if not hasattr(layer, "sae_steering"):
        layer.sae_steering = nn.ModuleList()
        layer.__class__ = _steered_class(type(layer))
    layer.sae_steering.append(steering)
