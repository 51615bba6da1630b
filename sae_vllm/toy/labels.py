"""Labelling SAE features: top tokens for each, and the feature that best detects each topic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_vllm.toy.corpus import Passage
from sae_vllm.toy.grammar import WORD_TOPIC
from sae_vllm.toy.sae_training import Activations
from sae_vllm.toy.tokenizer import vocab

TOP_TOKENS = 5
AUROC_TIE = 0.01


@dataclass(frozen=True)
class TopicFeature:
    """The feature chosen for a topic, how well it separates the topic, and how high it runs."""

    topic: str
    feature: int
    auroc: float  # passage level: max activation over the passage's tokens
    token_auroc: float  # token level, over positions where the passage's topic is known
    typical_max: float  # median over the topic's passages of the feature's max activation


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUROC of each column of `scores` [n, f] for telling `positive` [n] rows from the rest.

    P(score_pos > score_neg) + P(equal) / 2, counted exactly with sorted negatives.
    """
    neg = scores[~positive].T.contiguous().sort(dim=1).values
    pos = scores[positive].T.contiguous()
    below = torch.searchsorted(neg, pos, right=False).double()
    below_or_equal = torch.searchsorted(neg, pos, right=True).double()
    return (below + below_or_equal).sum(1) / (2 * pos.shape[1] * neg.shape[1])


def passage_max(acts: torch.Tensor, passage_index: torch.Tensor, n: int) -> torch.Tensor:
    """[n, d_sae]: each passage's largest activation of each feature over its tokens."""
    out = torch.zeros(n, acts.shape[1])
    index = passage_index.unsqueeze(1).expand_as(acts)
    return out.scatter_reduce(0, index, acts, reduce="amax", include_self=True)


def topic_established(passages: Sequence[Passage]) -> torch.Tensor:
    """Per word position (in Activations order): whether a topic word has occurred by then."""
    flags: list[bool] = []
    for p in passages:
        seen = False
        for w in p.words:
            seen = seen or w in WORD_TOPIC
            flags.append(seen)
    return torch.tensor(flags)


def topic_candidates(
    acts: torch.Tensor,
    held_out: Activations,
    passages: Sequence[Passage],
    topic: str,
    exclude: set[int],
    count: int,
) -> list[TopicFeature]:
    """The features that best detect `topic`, best first (at most `count`, none in `exclude`).

    Primary score: AUROC of the feature's max activation over a passage for telling that topic's
    passages from the rest. Several features usually tie near 1 (one firing on the topic's
    adjectives, one on its verbs, ...), so all within AUROC_TIE of the best are ranked by
    token-level AUROC, measured on every position where the topic is already known: that
    prefers a feature that carries the topic everywhere over one tied to a word class.
    """
    maxes = passage_max(acts, held_out.passage_index, len(passages))
    positive = torch.tensor([p.topic == topic for p in passages])
    scores = auroc(maxes, positive)
    if exclude:
        scores[sorted(exclude)] = -1.0
    tied = (scores >= scores.max() - AUROC_TIE).nonzero().flatten()
    known = topic_established(passages)
    token_positive = positive[held_out.passage_index[known]]
    token_scores = auroc(acts[known][:, tied], token_positive)
    ranked = token_scores.argsort(descending=True, stable=True)[:count].tolist()
    return [
        TopicFeature(
            topic=topic,
            feature=tied[j].item(),
            auroc=scores[tied[j]].item(),
            token_auroc=token_scores[j].item(),
            typical_max=maxes[positive, tied[j]].median().item(),
        )
        for j in ranked
    ]


def feature_table(acts: torch.Tensor, token_ids: torch.Tensor) -> list[dict]:
    """Per feature: the tokens it fires on most (by mean activation), density and max activation."""
    names = list(vocab())
    size = len(names)
    sums = torch.zeros(size, acts.shape[1]).index_add_(0, token_ids, acts)
    counts = torch.bincount(token_ids, minlength=size).clamp(min=1).unsqueeze(1)
    means = sums / counts
    rows = []
    for i in range(acts.shape[1]):
        top = means[:, i].argsort(descending=True, stable=True)[:TOP_TOKENS].tolist()
        rows.append(
            {
                "index": i,
                "top_tokens": [names[t] for t in top if means[t, i] > 0],
                "density": round((acts[:, i] > 0).double().mean().item(), 6),
                "max_activation": round(acts[:, i].max().item(), 6),
            }
        )
    return rows


def labels_document(
    features: list[dict], topics: dict[str, dict], layer: int, hook_name: str
) -> dict:
    """The labels.json content: the topic features (with steering values), then every feature."""
    by_feature = {entry["feature"]: topic for topic, entry in topics.items()}
    for row in features:
        topic = by_feature.get(row["index"])
        row["topic"] = topic
        if topic is not None:
            row["label"] = f"topic: {topic}"
        elif row["top_tokens"]:
            row["label"] = "tokens: " + ", ".join(row["top_tokens"])
        else:
            row["label"] = "dead"
    return {
        "sae_id": "toy",
        "layer": layer,
        "hook_name": hook_name,
        "topics": topics,
        "features": features,
    }
