"""The toy language: topic lexicons, sentence templates, and which next words the grammar allows."""

from __future__ import annotations

from collections.abc import Sequence

EOS = "</s>"

# Content words by topic and word class. No word appears twice anywhere, so a single word names
# its topic and class; function words (in templates and starts) belong to no topic.
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "weather": {
        "N": ("rain", "snow", "wind", "storm", "cloud", "fog", "sun", "thunder"),
        "A": ("cold", "warm", "wet", "windy", "grey", "sunny"),
        "V": ("falls", "blows", "returns", "clears"),
    },
    "animals": {
        "N": ("dog", "cat", "horse", "rabbit", "fox", "bird", "lion", "cow"),
        "A": ("furry", "wild", "hungry", "sleepy", "tame", "fierce"),
        "V": ("sleeps", "hunts", "jumps", "hides"),
    },
    "food": {
        "N": ("bread", "cheese", "soup", "apple", "cake", "rice", "pasta", "pizza"),
        "A": ("sweet", "salty", "fresh", "spicy", "crispy", "tasty"),
        "V": ("bakes", "cools", "smells", "burns"),
    },
    "music": {
        "N": ("song", "guitar", "drum", "piano", "melody", "band", "violin", "choir"),
        "A": ("loud", "soft", "catchy", "slow", "rhythmic", "melodic"),
        "V": ("plays", "starts", "echoes", "ends"),
    },
    "sports": {
        "N": ("football", "tennis", "runner", "team", "match", "goal", "coach", "race"),
        "A": ("fast", "tough", "competitive", "athletic", "fit", "strong"),
        "V": ("wins", "begins", "scores", "trains"),
    },
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
SLOTS = ("N", "A", "V")

# Neutral sentence starts: any topic may follow each of them.
STARTS: tuple[tuple[str, ...], ...] = (
    (),
    ("i", "think", "that"),
    ("today",),
    ("yesterday",),
    ("my", "friend", "said", "that"),
    ("we", "know", "that"),
    ("in", "the", "morning"),
)

# Clause templates: upper-case symbols are slots filled from one topic's lexicon.
CLAUSES: tuple[tuple[str, ...], ...] = tuple(
    tuple(t.split())
    for t in (
        "the N is A .",
        "the N is very A .",
        "the N and the N are A .",
        "the A N V .",
        "the N V and the N V .",
        "i like the A N a lot .",
        "there is a A N near the N .",
        "the N is as A as the N .",
        "the N V when the N is A .",
        "i like the N more than the N .",
    )
)

WORD_TOPIC: dict[str, str] = {
    word: topic for topic, classes in TOPICS.items() for words in classes.values() for word in words
}
FUNCTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(w for seq in (*STARTS, *CLAUSES) for w in seq if w not in SLOTS)
)
CONTENT_WORDS: tuple[str, ...] = tuple(WORD_TOPIC)
VOCABULARY: tuple[str, ...] = FUNCTION_WORDS + CONTENT_WORDS

# Every full sentence shape is a start followed by a clause.
TEMPLATES: tuple[tuple[str, ...], ...] = tuple(s + c for s in STARTS for c in CLAUSES)


def _slot_words(slot: str, topic: str | None) -> tuple[str, ...]:
    topics = TOPIC_NAMES if topic is None else (topic,)
    return tuple(w for t in topics for w in TOPICS[t][slot])


_State = tuple[int, int, str | None]  # (template, position in it, topic fixed so far or None)


def _closure(states: set[_State]) -> set[_State]:
    """A finished sentence may be followed by another one on the same topic."""
    out = set(states)
    for ti, pos, topic in states:
        if pos == len(TEMPLATES[ti]):
            out.update((tj, 0, topic) for tj in range(len(TEMPLATES)))
    return out


def _options(states: set[_State]) -> frozenset[str]:
    out: set[str] = set()
    for ti, pos, topic in states:
        template = TEMPLATES[ti]
        if pos == len(template):
            out.add(EOS)
        elif template[pos] in SLOTS:
            out.update(_slot_words(template[pos], topic))
        else:
            out.add(template[pos])
    return frozenset(out)


def _advance(states: set[_State], word: str) -> set[_State]:
    moved: set[_State] = set()
    for ti, pos, topic in states:
        template = TEMPLATES[ti]
        if pos == len(template):
            continue
        symbol = template[pos]
        if symbol in SLOTS:
            if word in _slot_words(symbol, topic):
                moved.add((ti, pos + 1, WORD_TOPIC[word]))
        elif symbol == word:
            moved.add((ti, pos + 1, topic))
    return _closure(moved)


def next_options(words: Sequence[str]) -> list[frozenset[str]]:
    """For a passage followed by EOS: every word (or EOS) the grammar allows at each step.

    Entry t is the set allowed after the first t words (t = 0 is the BOS position); the list has
    len(words) + 1 entries. The grammar is one or more sentences (start + clause), all on one
    topic, then EOS. It runs as a nondeterministic automaton whose state remembers the topic once
    a content word fixed it. It ignores the sampler's no-repeated-word and sentence-count rules,
    so a set can only be too large: a one-member set means the next token is truly determined.
    """
    states: set[_State] = {(i, 0, None) for i in range(len(TEMPLATES))}
    out = [_options(states)]
    for word in words:
        states = _advance(states, word)
        out.append(_options(states))
    return out


def determined_positions(words: Sequence[str]) -> list[bool]:
    """Per entry of next_options(words): whether the grammar allows exactly one next token."""
    return [len(options) == 1 for options in next_options(words)]
