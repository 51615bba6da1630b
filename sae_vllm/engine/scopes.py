"""Which positions a steering scope covers: one rule for the worker's per-token scope mask and the
prefix-cache keys of steered KV blocks."""

from __future__ import annotations

import numpy as np

from ..spec import ApplyTo

SCOPE_CODES = {ApplyTo.GENERATED: 0, ApplyTo.ALL: 1, ApplyTo.PROMPT: 2}
UNBOUNDED = np.iinfo(np.int64).max


def steered_span(scope: np.ndarray, prompt_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the steered positions of each request are lo <= position < hi.

    `scope` holds SCOPE_CODES, `prompt_len` where each request's generated tokens start (the
    prompt's length, or a beam-search step's generation start). `generated` starts at the last
    prompt position, whose output is the first generated token; hi is UNBOUNDED past the prompt.
    Elementwise, so it takes arrays (the worker's batch) or scalars (one request)."""
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    lo = np.where(scope == SCOPE_CODES[ApplyTo.GENERATED], prompt_len - 1, 0)
    hi = np.where(scope == SCOPE_CODES[ApplyTo.PROMPT], prompt_len, UNBOUNDED)
    return lo, hi
