"""Training-time interventions that teach the toy model to rely on its layer-L topic direction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sae_vllm.toy.batches import (
    IGNORE,
    encode_passages,
    switch_masks,
    topic_targets,
    word_positions,
)
from sae_vllm.toy.corpus import Passage, SwitchPassage
from sae_vllm.toy.grammar import TOPIC_NAMES


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

    def centre(self) -> torch.Tensor:
        return self.means.mean(0)

    def directions(self) -> torch.Tensor:
        return self.means - self.centre()


@dataclass(frozen=True)
class Intervention:
    """What training does to layer L's output: add `offsets` [b, s, d]; where `ablated` [b, s] is
    set, remove the component along the row's unit topic direction `units` [b, d], measured from
    the centre of the topic means (as ablating a topic feature does)."""

    offsets: torch.Tensor
    ablated: torch.Tensor
    units: torch.Tensor
    centre: torch.Tensor

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        units = self.units.unsqueeze(1)
        along = ((h - self.centre) * units).sum(-1, keepdim=True) * self.ablated.unsqueeze(-1)
        return h + self.offsets - along * units


@contextmanager
def intervene(model, layer: int, change: Intervention) -> Iterator[None]:
    """Apply `change` to the output of model.model.layers[layer] during the forward."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (change.apply(output[0]), *output[1:])
        return change.apply(output)

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


@dataclass(frozen=True)
class TrainingBatch:
    """One training step's token ids, intervention, probe targets and loss exclusions."""

    ids: torch.Tensor  # [b, s]: the step's passages, then its switch passages
    change: Intervention
    topics: torch.Tensor  # [b, s] probe / direction targets: IGNORE on switch passages
    unlearned: torch.Tensor  # [b, s] positions left out of the next-token loss


def training_batch(
    passages: Sequence[Passage],
    switches: Sequence[SwitchPassage],
    directions: TopicDirections,
    inject_into: torch.Tensor,
) -> TrainingBatch:
    """The batch of `passages` (the `inject_into` ones get their topic direction before their
    first topic word) and `switches` (their first topic ablated, see batches.switch_masks)."""
    ids = encode_passages([*passages, *switches])
    n, width = len(passages), ids.shape[1]
    topics = topic_targets(passages, width)
    row_topics = torch.tensor([TOPIC_NAMES.index(p.topic) for p in [*passages, *switches]])
    offsets_by_topic = directions.directions()
    words = word_positions(ids[:n])
    offsets = injection_offsets(offsets_by_topic, row_topics[:n], topics, words, inject_into)
    ablated, unlearned = switch_masks(switches, width)
    untouched = torch.zeros(n, width, dtype=torch.bool)
    change = Intervention(
        offsets=torch.cat([offsets, offsets.new_zeros(len(switches), *offsets.shape[1:])]),
        ablated=torch.cat([untouched, ablated]),
        units=torch.nn.functional.normalize(offsets_by_topic[row_topics], dim=-1),
        centre=directions.centre(),
    )
    return TrainingBatch(
        ids=ids,
        change=change,
        topics=torch.cat([topics, torch.full((len(switches), width), IGNORE)]),
        unlearned=torch.cat([untouched, unlearned]),
    )
