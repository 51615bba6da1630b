"""Turning passages into padded token-id batches (BOS + words + EOS, right-padded) and targets."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from sae_vllm.toy.corpus import Passage
from sae_vllm.toy.grammar import TOPIC_NAMES, WORD_TOPIC
from sae_vllm.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, vocab

IGNORE = -100  # cross_entropy's ignore_index


def encode_passages(passages: Sequence[Passage]) -> torch.Tensor:
    """[n, max_len] int64 ids; every row is BOS, the passage's word ids, EOS, then PAD."""
    ids = vocab()
    rows = [[BOS_ID, *(ids[w] for w in p.words), EOS_ID] for p in passages]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


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


def length_batches(passages: Sequence[Passage], size: int, seed: int) -> list[list[Passage]]:
    """Batches of `size` passages of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(passages)), key=lambda i: len(passages[i].words))
    batches = [[passages[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    random.Random(seed).shuffle(batches)
    return batches
