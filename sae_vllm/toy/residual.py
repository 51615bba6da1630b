"""Reading the residual stream after one decoder layer (SAELens blocks.L.hook_resid_post)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def hook_name(layer: int) -> str:
    """The SAELens / TransformerLens name of the output of decoder layer `layer`."""
    return f"blocks.{layer}.hook_resid_post"


@contextmanager
def layer_output(model, layer: int) -> Iterator[list[torch.Tensor]]:
    """Yields a list that receives the output of model.model.layers[layer] on each forward.

    Equal to HF hidden_states[layer + 1] for every layer but the last (whose hidden_states entry
    is taken after the final norm), which is why a hook is used rather than hidden_states.
    """
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
