"""Prefix-cache keys of steered requests: every KV block that steering changed is keyed by the
spec and by which of its positions were steered; the blocks before that stay shared.

Steering a position at layer L changes the KV of that position and of every later one (they
attend to it), and nothing before it. So a block of positions [start, end) holds the KV of an
unsteered request with the same tokens when no position before `end` is steered, and otherwise
the KV of exactly those requests with the same spec, the same tokens and the same steered
positions before `end`, scope by scope (a spec's edits may steer different spans). vLLM chains
each block's hash to its parent's, so keying a block by the steered spans clipped to `end` is
exact, and a request whose prompt extends another's (the next turn of a chat, a resubmitted
beam) never reads KV steered at positions it does not steer."""

from __future__ import annotations

from typing import Any

from ..config import PREFIX_CACHE_KEY
from ..resolved_specs import ResolvedSpec
from .scopes import UNBOUNDED, steered_spans

_TAG = "sae_steering"


def key_fields(
    steering: ResolvedSpec, num_prompt_tokens: int, generation_start: int | None
) -> list:
    """What block_key needs of a steered request: [spec fingerprint, then lo and hi (None when
    it has no end) of each of its scopes' spans], as the worker steers them (a list: it
    travels in extra_args)."""
    fields: list = [steering.fingerprint]
    for lo, hi in steered_spans(steering.spec, num_prompt_tokens, generation_start):
        fields += [lo, None if hi == UNBOUNDED else hi]
    return fields


def session_key_fields(steering: ResolvedSpec, request_id: str) -> list:
    """key_fields for a streaming-input session (a resumable request): its prompt grows after
    intake, so which positions it steers is not known yet; every block is its own alone."""
    return [f"{steering.fingerprint}:{request_id}", 0, None]


def continued_session_extra_args(
    previous: dict[str, Any] | None, following: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The extra_args for a streaming-input session's next chunk when they must change (else
    None): a session steered before keeps its key through unsteered chunks, since their blocks
    hold KV the earlier steering changed (the first may even be one the steered chunk began)."""
    key = (previous or {}).get(PREFIX_CACHE_KEY)
    if key is None or (following and PREFIX_CACHE_KEY in following):
        return None
    return {**(following or {}), PREFIX_CACHE_KEY: key}


def block_key(extra_args: dict[str, Any], start: int, end: int) -> tuple[str, str] | None:
    """The extra hash key of the request's KV block of positions [start, end): None when no
    position before `end` is steered (unsteered requests, and a steered one's prefix)."""
    fields = extra_args.get(PREFIX_CACHE_KEY)
    if fields is None:
        return None
    fingerprint, *bounds = fields
    # Each span clipped to the block's end: empty when it starts at or after `end` or holds
    # nothing at all (a window past a short prompt's end).
    spans = zip(bounds[::2], bounds[1::2], strict=True)
    clipped = [(lo, end if hi is None else min(hi, end)) for lo, hi in spans]
    if all(lo >= until for lo, until in clipped):
        return None
    steered = "".join(f":{lo}:{until}" if lo < until else ":-" for lo, until in clipped)
    return (_TAG, fingerprint + steered)
