"""How many tokens each sequence of a request sampled, read from vLLM's RequestOutputs as its
sequences end: what the unreached report judges each sequence by."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

CUT_SHORT = ("abort", "error")  # finish reasons of sequences the client does not get whole


def sampled_count(token_ids: Any, stop_reason: Any, last_token: int | None) -> int:
    """The tokens a finished sequence sampled, given its token ids (all of them) and the last
    token it received: a stop token is sampled too, and beam search leaves it out of them."""
    left_out = type(stop_reason) is int and last_token != stop_reason
    return len(token_ids) + left_out


class SequenceEnds:
    """Reads one request's RequestOutputs in order (`delta`: each carries only its new tokens)
    and calls `sequence_ended(tokens it sampled, its index)` once for each sequence that
    finishes, not for one aborted or failed."""

    def __init__(self, delta: bool, sequence_ended: Callable[[int, int], None]):
        self._delta = delta
        self._sequence_ended = sequence_ended
        self._generated: dict[int, int] = {}
        self._last_token: dict[int, int | None] = {}
        self._ended: set[int] = set()

    def see(self, output: Any) -> None:
        for sequence in output.outputs:
            index, token_ids = sequence.index, sequence.token_ids
            if self._delta:
                count = len(token_ids) + self._generated.get(index, 0)
                self._generated[index] = count
                token_ids = range(count)  # only its length is read below
            if sequence.token_ids:
                self._last_token[index] = sequence.token_ids[-1]
            reason = sequence.finish_reason
            if reason is None or reason in CUT_SHORT or index in self._ended:
                continue
            self._ended.add(index)
            last = self._last_token.get(index)
            self._sequence_ended(sampled_count(token_ids, sequence.stop_reason, last), index)


async def reporting_sequence_ends(
    outputs: AsyncGenerator[Any, None], delta: bool, sequence_ended: Callable[[int, int], None]
) -> AsyncGenerator[Any, None]:
    """vLLM's RequestOutputs, unchanged, read by a SequenceEnds as they pass."""
    ends = SequenceEnds(delta, sequence_ended)
    try:
        async for output in outputs:
            ends.see(output)
            yield output
    finally:
        await outputs.aclose()  # closing vLLM's generator aborts its request
