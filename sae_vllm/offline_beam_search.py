"""Steered offline beam search: `LLM.beam_search` with BeamSearchParams from
`steering_beam_params`.

vLLM runs each beam step as a new request whose prompt is the original prompt plus the tokens
generated so far, with SamplingParams it builds itself. Every step must carry the spec and
where the original prompt ends (so the spec's scope still counts those tokens as generated).
That position is shared by all the beams of prompts of one length, so prompts are searched in
groups of equal token count, each group with its own step arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .config import BEAM_STEERING_ATTR, EXTRA_ARGS_KEY, GENERATION_START_KEY
from .engine.intake import check_beam_reach
from .engine.reach_report import sequence_end_reporter
from .engine.sequence_ends import CUT_SHORT
from .engine.vllm_adapter import with_added_extra_args, wrap_once
from .offline_reach import beam_sampled_count


class _SteeringLLM:
    """An LLM whose beam-search methods run with every step's request carrying `step_args`."""

    def __init__(self, llm: Any, step_args: dict[str, Any]):
        self._llm = llm
        self._step_args = step_args

    def _render_and_run_requests(self, prompts: Any, params: Any, *args: Any, **kwargs: Any):
        steered = {}  # one steered copy per distinct params object (vLLM shares one per step)
        for p in params:
            if id(p) not in steered:
                steered[id(p)] = with_added_extra_args(p, self._step_args)
        steered_params = [steered[id(p)] for p in params]
        return self._llm._render_and_run_requests(prompts, steered_params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # The LLM's own methods run with this proxy as `self`, so the steps they take come back
        # through `_render_and_run_requests` above; everything else is the LLM's.
        attribute = inspect.getattr_static(type(self._llm), name, None)
        if inspect.isfunction(attribute):
            return attribute.__get__(self)
        return getattr(self._llm, name)


def _report_beams(output: Any, spec: Any, prompt_length: int, prompt_index: int) -> None:
    """Report each beam a search returns as a sequence that ended (see reach_report)."""
    beam_ended = sequence_end_reporter(spec, prompt_length, f"beam_search[{prompt_index}]")
    for rank, beam in enumerate(output.sequences):
        if beam.finish_reason not in CUT_SHORT:
            beam_ended(beam_sampled_count(beam), rank)


def install() -> None:
    """Wrap vLLM's offline beam search (idempotent); unsteered searches run unchanged."""
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin

    def make(original: Callable) -> Callable:
        def beam_search(
            self: Any,
            prompts: list,
            params: Any,
            lora_request: Any = None,
            *args: Any,
            **kwargs: Any,
        ) -> list:
            spec = getattr(params, BEAM_STEERING_ATTR, None)
            if spec is None:
                return original(self, prompts, params, lora_request, *args, **kwargs)
            engine_inputs = self._preprocess_cmpl(prompts)
            lora_requests = self._lora_request_to_seq(lora_request, len(engine_inputs))
            groups: dict[int, list[int]] = {}
            for index, engine_input in enumerate(engine_inputs):
                if engine_input["type"] != "token":
                    raise NotImplementedError(
                        "steered beam search takes text or token prompts, not "
                        f"{engine_input['type']!r} inputs"
                    )
                groups.setdefault(len(engine_input["prompt_token_ids"]), []).append(index)
            vllm_config = self.llm_engine.vllm_config
            judged = {  # every group before any runs
                prompt_length: check_beam_reach(vllm_config, spec, prompt_length, params.max_tokens)
                for prompt_length in groups
            }
            outputs: list = [None] * len(engine_inputs)
            for prompt_length, indices in groups.items():
                step_args = {EXTRA_ARGS_KEY: spec, GENERATION_START_KEY: prompt_length}
                group_outputs = original(
                    _SteeringLLM(self, step_args),
                    [prompts[i] for i in indices],
                    params,
                    [lora_requests[i] for i in indices],
                    *args,
                    **kwargs,
                )
                for index, output in zip(indices, group_outputs, strict=True):
                    outputs[index] = output
                    _report_beams(output, judged[prompt_length], prompt_length, index)
            return outputs

        return beam_search

    wrap_once(BeamSearchOfflineMixin, "beam_search", make)
