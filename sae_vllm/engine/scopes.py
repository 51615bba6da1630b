"""Which positions a steering spec steers: one rule for the worker's per-token scope mask and the
prefix-cache keys of steered KV blocks."""

from __future__ import annotations

from ..spec import ApplyTo, SteeringSpec

UNBOUNDED = 2**63 - 1  # past every position: a span with no end (int64's largest, for numpy)


def steered_span(
    spec: SteeringSpec, num_prompt_tokens: int, generation_start: int | None = None
) -> tuple[int, int]:
    """(lo, hi): the request steers the positions lo <= position < hi (none when lo == hi).

    Its generated tokens start at `generation_start` when given (a beam-search step re-submits
    the tokens generated so far as prompt, and they stay generated), else at the prompt's end.
    `generated` starts at the last prompt position, whose output is the first generated token;
    hi is UNBOUNDED past the prompt. The spec's window slices the scope's positions as a Python
    slice would: offsets count from the scope's first position, negative ones back from the
    prompt's end (the spec allows them in the `prompt` scope only)."""
    prompt_len = num_prompt_tokens if generation_start is None else generation_start
    scope_lo = prompt_len - 1 if spec.apply_to is ApplyTo.GENERATED else 0
    scope_hi = prompt_len if spec.apply_to is ApplyTo.PROMPT else UNBOUNDED
    window = spec.window
    if window is None:
        return scope_lo, scope_hi

    def position_of(offset: int) -> int:
        return (prompt_len if offset < 0 else scope_lo) + offset

    lo = max(scope_lo, position_of(window.start))
    hi = scope_hi if window.end is None else min(scope_hi, position_of(window.end))
    return lo, max(hi, lo)
