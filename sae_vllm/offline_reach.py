"""Which sequences of a steered offline request came back unsteered: those that ended before
the first position their spec steers."""

from __future__ import annotations

from typing import Any

from .config import BEAM_STEERING_ATTR, EXTRA_ARGS_KEY
from .engine.scopes import unreached_scopes
from .engine.sequence_ends import CUT_SHORT, sampled_count
from .spec import SteeringSpec, parse_spec_shape


def spec_of_params(params: Any) -> SteeringSpec | None:
    """The spec that SamplingParams or BeamSearchParams carry (None: unsteered)."""
    data = getattr(params, BEAM_STEERING_ATTR, None)
    if data is None:
        extra_args = getattr(params, "extra_args", None) or {}
        data = extra_args.get(EXTRA_ARGS_KEY)
    if data is None:
        return None
    # Its reach needs its scopes only; the engine has checked its values against its limits.
    return data if isinstance(data, SteeringSpec) else parse_spec_shape(data)


def beam_sampled_count(beam: Any) -> int:
    """The tokens a finished beam (vLLM's BeamSearchSequence) sampled: its tokens hold its
    prompt, then every token it sampled, an end of sequence included."""
    return len(beam.tokens) - len(beam.orig_prompt["prompt_token_ids"])


def unreached_sequences(output: Any, params: Any) -> list[int]:
    """Where in a finished `LLM.generate` output's `outputs` (an `LLM.beam_search` output's
    `sequences`) the sequences are that ended before any position the spec in `params` steers,
    so came back unsteered (the engine also logs a warning for each); [] for unsteered params.
    Sequences not finished, aborted or failed are not judged."""
    spec = spec_of_params(params)
    if spec is None:
        return []
    if hasattr(output, "sequences"):  # a beam search's; every beam it returns has ended
        sampled = [
            None
            if beam.finish_reason in CUT_SHORT
            else (len(beam.orig_prompt["prompt_token_ids"]), beam_sampled_count(beam))
            for beam in output.sequences
        ]
    else:
        from vllm.sampling_params import RequestOutputKind

        if getattr(params, "output_kind", None) == RequestOutputKind.DELTA:
            raise ValueError("unreached_sequences reads whole outputs, not deltas (output_kind)")
        sampled = [_completion_sampled(output, sequence) for sequence in output.outputs]
    return [
        position
        for position, judged in enumerate(sampled)
        if judged is not None and unreached_scopes(spec, *judged)
    ]


def _completion_sampled(output: Any, sequence: Any) -> tuple[int, int] | None:
    """(prompt length, tokens sampled) of a finished sequence of a whole RequestOutput; None
    when it is not judged."""
    if sequence.finish_reason is None or sequence.finish_reason in CUT_SHORT:
        return None
    token_ids = sequence.token_ids
    last = token_ids[-1] if token_ids else None
    return len(output.prompt_token_ids), sampled_count(token_ids, sequence.stop_reason, last)
