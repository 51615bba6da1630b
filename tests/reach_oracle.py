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
    """The oracle: list the positions a request computes (its prompt, then the inputs of its
    first max_tokens - 1 generated tokens), slice each scope's list as Python does, and see
    whether any slice holds one."""
    computed = list(range(num_prompt_tokens + max_tokens - 1))
    for apply_to, window in scopes:
        held = {
            "prompt": computed[:num_prompt_tokens],
            "generated": computed[num_prompt_tokens - 1 :],
            "all": computed,
        }[apply_to]
        window = window or {}
        if held[window.get("start", 0) : window.get("end")]:
            return True
    return False


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
