"""Training-time interventions that teach the toy model to read its topic direction at layer L."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sae_vllm.toy.batches import IGNORE


class TopicDirections:
    """Running per-topic means of layer L's output where the topic is known.

    direction(T) = mean_T - mean over topics: the offset a position's residual gets from the
    passage being about T.
    """

    def __init__(self, topics: int, hidden: int, momentum: float = 0.9) -> None:
        self.means = torch.zeros(topics, hidden)
        self.seen = torch.zeros(topics, dtype=torch.bool)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, h: torch.Tensor, targets: torch.Tensor) -> None:
        """Fold in one batch: h [b, s, d] layer outputs, targets [b, s] topic or IGNORE."""
        for t in range(self.means.shape[0]):
            sel = targets == t
            if sel.any():
                batch_mean = h[sel].mean(0)
                old = self.means[t] if self.seen[t] else batch_mean
                self.means[t] = self.momentum * old + (1 - self.momentum) * batch_mean
                self.seen[t] = True

    def directions(self) -> torch.Tensor:
        return self.means - self.means.mean(0)


@contextmanager
def inject(model, layer: int, offsets: torch.Tensor) -> Iterator[None]:
    """Add offsets [b, s, d] to the output of model.model.layers[layer] during the forward."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + offsets, *output[1:])
        return output + offsets

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def injection_offsets(
    directions: torch.Tensor,
    passage_topics: torch.Tensor,
    targets: torch.Tensor,
    word_positions: torch.Tensor,
    chosen: torch.Tensor,
) -> torch.Tensor:
    """[b, s, d]: the passage's topic direction at its word positions before its first topic
    word (where targets is IGNORE), for the `chosen` passages only; zero elsewhere."""
    mask = word_positions & (targets == IGNORE) & chosen.unsqueeze(1)
    return directions[passage_topics].unsqueeze(1) * mask.unsqueeze(-1)
