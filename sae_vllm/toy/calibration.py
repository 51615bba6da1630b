"""Choosing each topic's feature and steering value by trying candidates with the HF reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sae_vllm.toy.grammar import TOPIC_NAMES
from sae_vllm.toy.labels import TopicFeature
from sae_vllm.toy.progress import Progress
from sae_vllm.toy.sae_training import ReluSAE
from sae_vllm.toy.steering_check import (
    NEUTRAL_PROMPT,
    FeatureEdit,
    SteeringResult,
    grammatical,
    measure,
    measure_ablation,
    on_topic_share,
    sample_completions,
    topic_shares,
)

SEARCH_SEED, REPORT_SEED = 1, 2


@dataclass(frozen=True)
class CalibrationRecipe:
    """How hard to look for a steering value, and how good it must be."""

    # Multiples of a feature's typical max activation that may be recommended.
    multipliers: tuple[float, ...] = (
        0.5,
        0.75,
        1.0,
        1.25,
        1.5,
        1.75,
        2.0,
        2.5,
        3.0,
        3.5,
        4.0,
        5.0,
        6.0,
        8.0,
        10.0,
        12.0,
        16.0,
    )
    target_share: float = 0.93
    # Ablating a topic's feature must lower the topic's share from an on-topic prompt by this
    # much: a candidate that steers well may still share its topic with another feature.
    ablation_drop: float = 0.4
    samples: int = 100
    candidates: int = 3  # topic features tried per topic


@dataclass(frozen=True)
class Calibrated:
    """A topic's chosen feature, its recommended value, and that value re-measured afresh."""

    feature: TopicFeature
    multiple: float
    result: SteeringResult


def feature_edit(sae: ReluSAE, feature: int, value: float) -> FeatureEdit:
    """A `set feature := value` edit built from the SAE's weights."""
    return FeatureEdit(
        w_enc=sae.W_enc[:, feature].detach(),
        b_enc=sae.b_enc[feature].item(),
        w_dec=sae.W_dec[feature].detach(),
        b_dec=sae.b_dec.detach(),
        value=value,
    )


def baseline(model, samples: int, seed: int = REPORT_SEED) -> dict[str, float]:
    """Unsteered: the share of completions of NEUTRAL_PROMPT on each topic, and in grammar."""
    texts = sample_completions(model, n=samples, seed=seed)
    out = topic_shares(texts, TOPIC_NAMES)
    out["grammatical"] = sum(grammatical(NEUTRAL_PROMPT, t) for t in texts) / samples
    return out


def _smallest_sufficient(
    model, sae: ReluSAE, layer: int, tf: TopicFeature, recipe: CalibrationRecipe
) -> tuple[float, SteeringResult]:
    """Binary search over the multipliers for the smallest reaching target_share (topic share
    grows with the value, near enough); the largest multiplier if none reaches it."""

    def run(multiple: float) -> SteeringResult:
        edit = feature_edit(sae, tf.feature, multiple * tf.typical_max)
        return measure(model, layer, edit, tf.topic, recipe.samples, SEARCH_SEED)

    grid = recipe.multipliers
    best = (grid[-1], run(grid[-1]))
    if best[1].topic_share < recipe.target_share:
        return best
    lo, hi = 0, len(grid) - 1  # grid[hi] is known to reach the target
    while lo < hi:
        mid = (lo + hi) // 2
        result = run(grid[mid])
        if result.topic_share >= recipe.target_share:
            hi, best = mid, (grid[mid], result)
        else:
            lo = mid + 1
    return best


def choose(
    model,
    sae: ReluSAE,
    layer: int,
    candidates: Sequence[TopicFeature],
    recipe: CalibrationRecipe,
    progress: Progress,
) -> Calibrated:
    """Of the candidate features that reach target_share and whose ablation lowers the topic's
    share by ablation_drop, the one with the highest topic share plus grammatical share at its
    smallest sufficient value (ties: the better-ranked candidate); failing both, one that
    reaches the target, then the highest topic share. That value is then re-measured with a
    fresh sample seed, and the unbiased result is what is reported.

    Ablation decides because a topic is often carried by two features that each steer about as
    well (on one CPU's build, 0.95 + 0.84 against 0.97 + 0.84), of which ablating only one
    removes the topic."""
    topic = candidates[0].topic
    before = on_topic_share(model, layer, None, topic, recipe.samples, SEARCH_SEED)
    tried = []
    for rank, tf in enumerate(candidates):
        multiple, result = _smallest_sufficient(model, sae, layer, tf, recipe)
        ablated = feature_edit(sae, tf.feature, 0.0)
        after = on_topic_share(model, layer, ablated, topic, recipe.samples, SEARCH_SEED)
        reached = result.topic_share >= recipe.target_share
        ablates = after <= before - recipe.ablation_drop
        quality = result.topic_share + (result.grammatical_share if reached else 0.0)
        key = (reached and ablates, reached, quality, -rank)
        tried.append((key, tf, multiple))
        progress.say(
            f"  {tf.topic}: feature {tf.feature} at {multiple:g} x typical max -> "
            f"share {result.topic_share:.2f}, grammatical {result.grammatical_share:.2f}; "
            f"ablated: share {before:.2f} -> {after:.2f}"
        )
    _, tf, multiple = max(tried, key=lambda t: t[0])
    edit = feature_edit(sae, tf.feature, multiple * tf.typical_max)
    report = measure(model, layer, edit, tf.topic, recipe.samples, REPORT_SEED)
    return Calibrated(tf, multiple, report)


def ablation_shares(
    model, sae: ReluSAE, layer: int, tf: TopicFeature, recipe: CalibrationRecipe
) -> tuple[float, float]:
    """The topic's share from a prompt on that topic, before and after ablating its feature."""
    edit = feature_edit(sae, tf.feature, 0.0)
    return measure_ablation(model, layer, edit, tf.topic, recipe.samples, REPORT_SEED)
