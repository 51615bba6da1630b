"""Sequences of steered requests that ended before any position their spec steers: each is
logged, announced to listeners (the server's metric) and counted in the caller's tally."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass

from .. import LOGGER_NAME
from ..spec import SteeringSpec
from .scopes import scopes_text, unreached_scopes

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class SequenceTally:
    """The sequences of steered requests that ended while this tally was open (see tallying),
    and how many of them ended before their first steered position (they came back unsteered)."""

    ended: int = 0
    unreached: int = 0


# (tokens a sequence sampled, its index among the request's sequences when known)
SequenceEnd = Callable[[int, int | None], None]

_open_tally: ContextVar[SequenceTally | None] = ContextVar("sae_vllm_sequence_tally", default=None)
_listeners: list[Callable[[], None]] = []


def add_unreached_listener(listener: Callable[[], None]) -> None:
    """Call `listener()` for every sequence that ends unreached, in this process."""
    if listener not in _listeners:
        _listeners.append(listener)


@contextmanager
def tallying(tally: SequenceTally | None = None) -> Iterator[SequenceTally]:
    """A tally (`tally`, else a new one) of the sequences of the requests made in this context
    and the tasks it starts (vLLM fans a request's prompts out to tasks, which copy the context
    and so share the tally), as they end, wherever they are then consumed."""
    tally = SequenceTally() if tally is None else tally
    token = _open_tally.set(tally)
    try:
        yield tally
    finally:
        with suppress(ValueError):  # an async generator closed from another context (it ends)
            _open_tally.reset(token)


def sequence_end_reporter(
    spec: SteeringSpec, num_prompt_tokens: int, request_id: str
) -> SequenceEnd:
    """What to call with the generated-token count of each sequence of a request steered by
    `spec` (a beam search's beams included) as it ends, and its index (a choice's, a beam's
    rank) where known, counted in the tally open now."""
    tally = _open_tally.get()  # a stream's sequences end after the request's context has closed

    def sequence_ended(num_generated: int, index: int | None = None) -> None:
        if tally is not None:
            tally.ended += 1
        # Its k tokens were sampled from positions before P + k - 1: a sequence that ends
        # before a scope starts is unsteered, as a request that could not reach one would be.
        scopes = unreached_scopes(spec, num_prompt_tokens, num_generated)
        if not scopes:
            return
        if tally is not None:
            tally.unreached += 1
        for listener in _listeners:
            listener()
        logger.warning(
            "Request %s: %s ended after %d generated tokens, before any position its "
            "steering steers (prompt of %d tokens, scope %s); it came back unsteered.",
            request_id,
            "a sequence" if index is None else f"sequence {index}",
            num_generated,
            num_prompt_tokens,
            scopes_text(scopes),
        )

    return sequence_ended
