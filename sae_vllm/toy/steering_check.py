"""Plain-HF reference steering of the toy model: a forward hook on one decoder layer, sampling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sae_vllm.toy.corpus import classify
from sae_vllm.toy.grammar import TOPICS, next_options
from sae_vllm.toy.tokenizer import BOS_ID, EOS_ID, vocab

NEUTRAL_PROMPT = "i think that"


def on_topic_prompt(topic: str) -> str:
    """A prompt that starts on `topic` and leaves the next sentence open: where ablating its
    feature should lower the topic's share."""
    words = TOPICS[topic]
    return f"the {words['N'][0]} is {words['A'][0]} . {NEUTRAL_PROMPT}"


@dataclass(frozen=True)
class FeatureEdit:
    """Set one SAE feature to `value`: h' = h + (value - a) * W_dec[i], a the feature's activation.

    `w_enc` is W_enc[:, i], `w_dec` is W_dec[i]; `b_dec` is subtracted from h before encoding
    (the SAE has apply_b_dec_to_input = true).
    """

    w_enc: torch.Tensor
    b_enc: float
    w_dec: torch.Tensor
    b_dec: torch.Tensor
    value: float

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.relu((h - self.b_dec) @ self.w_enc + self.b_enc)
        return h + (self.value - a).unsqueeze(-1) * self.w_dec


@contextmanager
def steering_hook(model, layer: int, edit: FeatureEdit, everywhere: bool = False) -> Iterator[None]:
    """Edit layer `layer`'s output at the last prompt position and every decoded position.

    That is the scope sae_vllm calls "generated": on the prefill pass only the last position is
    edited; on each one-token decode pass, that token. With `everywhere`, every position is
    edited (the scope "all").
    """

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if everywhere:
            h = edit.apply(h)
        else:
            h = h.clone()
            h[:, -1] = edit.apply(h[:, -1])
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def sample_completions(
    model,
    prompt: str = NEUTRAL_PROMPT,
    n: int = 100,
    temperature: float = 0.7,
    max_new_tokens: int = 12,
    seed: int = 0,
) -> list[str]:
    """`n` sampled continuations of BOS + prompt, each cut at EOS, as space-joined words."""
    ids = vocab()
    names = list(ids)
    prompt_ids = torch.tensor([[BOS_ID, *(ids[w] for w in prompt.split())]] * n)
    gen = torch.Generator().manual_seed(seed)
    out = model(input_ids=prompt_ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    tokens = []
    for step in range(max_new_tokens):
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens.append(nxt)
        if step + 1 < max_new_tokens:
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    texts = []
    for row in torch.cat(tokens, dim=1).tolist():
        words = []
        for t in row:
            if t == EOS_ID:
                break
            words.append(names[t])
        texts.append(" ".join(words))
    return texts


def topic_shares(texts: list[str], topics: tuple[str, ...]) -> dict[str, float]:
    """The share of `texts` that classify() puts on each topic."""
    labels = [classify(t) for t in texts]
    return {t: labels.count(t) / len(texts) for t in topics}


def grammatical(prompt: str, completion: str) -> bool:
    """Whether prompt + completion is a valid beginning of a toy-language passage."""
    words = (prompt + " " + completion).split()
    options = next_options(words)
    return all(w in options[i] for i, w in enumerate(words))


@dataclass(frozen=True)
class SteeringResult:
    """Shares of sampled completions on a topic and in the grammar, at one steering value."""

    value: float
    topic_share: float
    grammatical_share: float


def measure(model, layer: int, edit: FeatureEdit, topic: str, n: int, seed: int) -> SteeringResult:
    """Sample `n` completions of NEUTRAL_PROMPT steered by `edit`, and score them."""
    with steering_hook(model, layer, edit):
        texts = sample_completions(model, n=n, seed=seed)
    return SteeringResult(
        value=edit.value,
        topic_share=topic_shares(texts, (topic,))[topic],
        grammatical_share=sum(grammatical(NEUTRAL_PROMPT, t) for t in texts) / n,
    )


def on_topic_share(
    model, layer: int, edit: FeatureEdit | None, topic: str, n: int, seed: int
) -> float:
    """`topic`'s share of `n` completions of on_topic_prompt(topic), with `edit` (if any)
    applied at every position."""
    prompt = on_topic_prompt(topic)
    if edit is None:
        texts = sample_completions(model, prompt, n=n, seed=seed)
    else:
        with steering_hook(model, layer, edit, everywhere=True):
            texts = sample_completions(model, prompt, n=n, seed=seed)
    return topic_shares(texts, (topic,))[topic]


def measure_ablation(
    model, layer: int, edit: FeatureEdit, topic: str, n: int, seed: int
) -> tuple[float, float]:
    """`topic`'s share of `n` completions of on_topic_prompt(topic), unsteered and with `edit`
    (expected to set the topic's feature to 0) applied at every position."""
    before = on_topic_share(model, layer, None, topic, n, seed)
    return before, on_topic_share(model, layer, edit, topic, n, seed)
