"""Deterministic sampling of toy-language passages, and a topic classifier for any text."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from sae_vllm.toy.grammar import CLAUSES, SLOTS, STARTS, TOPIC_NAMES, TOPICS, WORD_TOPIC

MAX_SENTENCES = 3


@dataclass(frozen=True)
class Passage:
    """One training text: one to three sentences on one topic (no BOS/EOS)."""

    words: tuple[str, ...]
    topic: str

    @property
    def text(self) -> str:
        return " ".join(self.words)


def sample_sentence(rng: random.Random, topic: str) -> tuple[str, ...]:
    """A start and a clause uniformly at random, slots filled from `topic` without repeats."""
    start = rng.choice(STARTS)
    clause = rng.choice(CLAUSES)
    used: set[str] = set()
    words: list[str] = list(start)
    for symbol in clause:
        if symbol in SLOTS:
            choices = [w for w in TOPICS[topic][symbol] if w not in used]
            symbol = rng.choice(choices)
            used.add(symbol)
        words.append(symbol)
    return tuple(words)


def sample_passage(rng: random.Random) -> Passage:
    """A uniform topic, then 1..MAX_SENTENCES sentences on it.

    Keeping the topic across sentences is what makes the model carry a topic representation at
    every position, including the neutral start of a later sentence; steering relies on it.
    """
    topic = rng.choice(TOPIC_NAMES)
    count = rng.randint(1, MAX_SENTENCES)
    words = tuple(w for _ in range(count) for w in sample_sentence(rng, topic))
    return Passage(words, topic)


def sample_passages(n: int, seed: int | str) -> list[Passage]:
    """`n` passages from a private generator seeded with `seed` (same seed, same list)."""
    rng = random.Random(seed)
    return [sample_passage(rng) for _ in range(n)]


@dataclass(frozen=True)
class SwitchPassage:
    """A sentence on `topic`, then one on `next_topic`, drawn uniformly (so maybe the same).

    Not in the toy language (whose passages keep one topic): model training uses these, with the
    first topic's direction ablated, to teach that a context without it leaves the topic open.
    """

    words: tuple[str, ...]
    topic: str
    next_topic: str
    switch: int  # index in words of the second sentence's first word


def sample_switch_passages(n: int, seed: int | str) -> list[SwitchPassage]:
    """`n` switch passages from a private generator seeded with `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic, next_topic = rng.choice(TOPIC_NAMES), rng.choice(TOPIC_NAMES)
        first = sample_sentence(rng, topic)
        out.append(
            SwitchPassage(first + sample_sentence(rng, next_topic), topic, next_topic, len(first))
        )
    return out


_WORD = re.compile(r"[a-z]+")


def classify(text: str) -> str | None:
    """The topic most of the text's topic words belong to; None if it has none or a tie."""
    counts = Counter(WORD_TOPIC[w] for w in _WORD.findall(text.lower()) if w in WORD_TOPIC)
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]
