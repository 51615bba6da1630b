"""The oracle of the reach tests: the positions a request computes, sliced as Python does."""

from __future__ import annotations


def windowed(*scopes: tuple[str, dict | None]) -> dict:
    """A spec with one edit per (apply_to, window) scope."""
    edits = [
        {"feature": index, "op": "ablate", "apply_to": apply_to}
        | ({} if window is None else {"window": window})
        for index, (apply_to, window) in enumerate(scopes)
    ]
    return {"edits": edits}


def python_slice_reaches(scopes, num_prompt_tokens: int, max_tokens: int) -> bool:
    """The oracle: list each scope's positions (far past any window drawn here), slice them as
    Python does, and see whether a slice holds a position whose output the request returns:
    one of its prompt's, or the input of one of its first max_tokens - 1 generated tokens
    (max_tokens 0: a prompt echoed for its logprobs, the last position's output dropped)."""
    positions = list(range(num_prompt_tokens + max_tokens + 64))
    returned = num_prompt_tokens + max_tokens - 1
    for apply_to, window in scopes:
        held = {
            "prompt": positions[:num_prompt_tokens],
            "generated": positions[num_prompt_tokens - 1 :],
            "all": positions,
        }[apply_to]
        window = window or {}
        if any(p < returned for p in held[window.get("start", 0) : window.get("end")]):
            return True
    return False


def every_scope_reaches(scopes, num_prompt_tokens: int, max_tokens: int) -> bool:
    """The oracle of the check before a request runs: each scope reaches a position (one that
    does not would leave its edits unapplied)."""
    return all(python_slice_reaches([scope], num_prompt_tokens, max_tokens) for scope in scopes)


def random_window(rng, apply_to: str) -> dict | None:
    if rng.random() < 0.2:
        return None
    lowest = -12 if apply_to == "prompt" else 0
    start = int(rng.integers(lowest, 16))
    if rng.random() < 0.4:
        return {"start": start}
    end = int(rng.integers(start + 1, start + 8 if start >= 0 else 1))
    return {"start": start} if end == 0 else {"start": start, "end": end}


def random_scopes(rng) -> list[tuple[str, dict | None]]:
    """One to three (apply_to, window) scopes, drawn to straddle short requests' ends."""
    return [
        (apply_to, random_window(rng, apply_to))
        for apply_to in rng.choice(["prompt", "generated", "all"], size=rng.integers(1, 4))
    ]
