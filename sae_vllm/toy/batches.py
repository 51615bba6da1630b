"""Turning passages into padded token-id batches (BOS + words + EOS, right-padded) and targets."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from sae_vllm.toy.corpus import Passage, SwitchPassage
from sae_vllm.toy.grammar import TOPIC_NAMES, WORD_TOPIC
from sae_vllm.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, vocab

IGNORE = -100  # cross_entropy's ignore_index


def encode_passages(passages: Sequence[Passage | SwitchPassage]) -> torch.Tensor:
    """[n, max_len] int64 ids; every row is BOS, the passage's word ids, EOS, then PAD."""
    ids = vocab()
    rows = [[BOS_ID, *(ids[w] for w in p.words), EOS_ID] for p in passages]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def word_positions(ids: torch.Tensor) -> torch.Tensor:
    """Where encode_passages put a word (not BOS, EOS or PAD)."""
    return (ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)


def topic_targets(passages: Sequence[Passage], width: int) -> torch.Tensor:
    """[n, width] topic index at every word from the passage's first topic word on, else IGNORE.

    Aligned with encode_passages (column 0 is BOS); before the first topic word the topic is
    not knowable from the text, so those positions carry no target.
    """
    out = torch.full((len(passages), width), IGNORE, dtype=torch.int64)
    for i, p in enumerate(passages):
        first = next(j for j, w in enumerate(p.words) if w in WORD_TOPIC)
        out[i, 1 + first : 1 + len(p.words)] = TOPIC_NAMES.index(p.topic)
    return out


def switch_masks(
    passages: Sequence[SwitchPassage], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, width] masks aligned with encode_passages, for training with ablation.

    ablated: the positions whose context is about the first topic only, from its first topic word
    up to (not including) the second sentence's first topic word.
    unlearned: the ablated positions whose next word is a topic word of the first sentence; with
    the topic ablated the model cannot know it, and must not learn to recover it from the words.
    The position before the second sentence's first topic word is kept: there the model learns
    that without the topic direction any topic may come next.
    """
    ablated = torch.zeros(len(passages), width, dtype=torch.bool)
    unlearned = torch.zeros(len(passages), width, dtype=torch.bool)
    for i, p in enumerate(passages):
        first = next(j for j, w in enumerate(p.words) if w in WORD_TOPIC)
        second = next(j for j in range(p.switch, len(p.words)) if p.words[j] in WORD_TOPIC)
        ablated[i, 1 + first : 1 + second] = True
        for j in range(first + 1, second):
            unlearned[i, j] = p.words[j] in WORD_TOPIC
    return ablated, unlearned


def length_batches(passages: Sequence[Passage], size: int, seed: int) -> list[list[Passage]]:
    """Batches of `size` passages of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(passages)), key=lambda i: len(passages[i].words))
    batches = [[passages[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return batches
