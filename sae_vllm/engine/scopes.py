"""Which positions a steering spec steers, edit by edit: one rule for the worker's per-token rows
and scope mask and the prefix-cache keys of steered KV blocks."""

from __future__ import annotations

from ..spec import ApplyTo, Scope, SteeringSpec

UNBOUNDED = 2**63 - 1  # past every position: a span with no end (int64's largest, for numpy)


def segments(
    spec: SteeringSpec, num_prompt_tokens: int, generation_start: int | None = None
) -> tuple[list[int], list[tuple[int, ...]]]:
    """The request's positions cut where the set of edits in scope changes: the sorted finite
    edges, and for each edge the indices (into spec.edits, in order) of the edits that steer
    from it to the next edge, or on for good. Nothing is steered before the first edge."""
    if not spec.has_edit_scopes:
        lo, hi = scope_span(Scope(spec.apply_to, spec.window), num_prompt_tokens, generation_start)
        if lo == hi:
            return [], []
        every = tuple(range(len(spec.edits)))
        return ([lo], [every]) if hi == UNBOUNDED else ([lo, hi], [every, ()])
    edit_spans = [
        scope_span(spec.scope_of(edit), num_prompt_tokens, generation_start) for edit in spec.edits
    ]
    edges = sorted({edge for lo, hi in edit_spans if lo < hi for edge in (lo, hi)})
    edges = [edge for edge in edges if edge != UNBOUNDED]
    in_scope = [
        tuple(index for index, (lo, hi) in enumerate(edit_spans) if lo <= start < hi)
        for start in edges
    ]
    return edges, in_scope


def steered_spans(
    spec: SteeringSpec, num_prompt_tokens: int, generation_start: int | None = None
) -> list[tuple[int, int]]:
    """The span (see scope_span) of each of the spec's scopes, in `spec.scopes()` order."""
    return [scope_span(scope, num_prompt_tokens, generation_start) for scope, _ in spec.scopes()]


def scope_span(
    scope: Scope, num_prompt_tokens: int, generation_start: int | None = None
) -> tuple[int, int]:
    """(lo, hi): the scope holds the positions lo <= position < hi (none when lo == hi).

    Its generated tokens start at `generation_start` when given (a beam-search step re-submits
    the tokens generated so far as prompt, and they stay generated), else at the prompt's end.
    `generated` starts at the last prompt position, whose output is the first generated token;
    hi is UNBOUNDED past the prompt. The scope's window slices its positions as a Python
    slice would: offsets count from the scope's first position, negative ones back from the
    prompt's end (specs allow them in the `prompt` scope only)."""
    prompt_len = num_prompt_tokens if generation_start is None else generation_start
    scope_lo = prompt_len - 1 if scope.apply_to is ApplyTo.GENERATED else 0
    scope_hi = prompt_len if scope.apply_to is ApplyTo.PROMPT else UNBOUNDED
    window = scope.window
    if window is None:
        return scope_lo, scope_hi

    def position_of(offset: int) -> int:
        return (prompt_len if offset < 0 else scope_lo) + offset

    lo = max(scope_lo, position_of(window.start))
    hi = scope_hi if window.end is None else min(scope_hi, position_of(window.end))
    return lo, max(hi, lo)


def computed_end(num_prompt_tokens: int, max_tokens: int) -> int:
    """One past the last position whose output a request can return: its prompt and the inputs
    of its first `max_tokens - 1` generated tokens (the last one is sampled, never fed back).
    With max_tokens 0 (a prompt echoed for its logprobs), the prompt's positions but the last,
    whose output would be the first generated token."""
    return num_prompt_tokens + max_tokens - 1


def unreached_scopes(spec: SteeringSpec, num_prompt_tokens: int, max_tokens: int) -> list[Scope]:
    """The spec's scopes, when none of them holds a position the request can compute (it
    would run unsteered however it ends); else an empty list."""
    end = computed_end(num_prompt_tokens, max_tokens)
    if any(_holds_before(span, end) for span in steered_spans(spec, num_prompt_tokens)):
        return []
    return [scope for scope, _ in spec.scopes()]


def scopes_out_of_reach(spec: SteeringSpec, num_prompt_tokens: int, max_tokens: int) -> list[Scope]:
    """The spec's scopes that hold no position the request can compute: their edits would
    never apply, however it ends (all of them: it would run unsteered)."""
    end = computed_end(num_prompt_tokens, max_tokens)
    return [
        scope
        for scope, _ in spec.scopes()
        if not _holds_before(scope_span(scope, num_prompt_tokens), end)
    ]


def _holds_before(span: tuple[int, int], end: int) -> bool:
    """Whether the span (lo, hi) holds a position before `end`."""
    lo, hi = span
    return lo < min(hi, end)


def scope_text(scope: Scope) -> str:
    """A scope as a user reads it: `generated`, or with its window as a slice, `prompt[-8:]`."""
    if scope.window is None:
        return scope.apply_to.value
    end = "" if scope.window.end is None else scope.window.end
    return f"{scope.apply_to.value}[{scope.window.start}:{end}]"


def scopes_text(scopes: list[Scope]) -> str:
    """Scopes as a user reads them, comma-separated: `generated[4:], prompt[-8:]`."""
    return ", ".join(scope_text(scope) for scope in scopes)
