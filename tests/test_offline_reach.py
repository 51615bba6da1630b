"""Offline outputs of steered requests: unreached_sequences finds the sequences that ended
before their spec's first steered position as the Python-slice oracle does, for generate's
outputs and beam search's, and a steered beam search reports each beam it returns.

The outputs are vLLM's own classes, built here (the real engine's are in test_engine.py),
imported inside the tests: vLLM imported while pytest collects would import Triton before
test_kernels.py sets its interpreter mode."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from reach_oracle import python_slice_reaches, random_scopes, windowed
from sae_vllm import unreached_sequences
from sae_vllm.config import EXTRA_ARGS_KEY
from sae_vllm.engine import reach_report
from sae_vllm.offline_beam_search import _report_beams
from sae_vllm.offline_reach import spec_of_params

LATE = {"edits": [{"feature": 3, "op": "set", "value": 2.0}], "window": {"start": 5}}


def params(spec: dict | None, **sampling):
    from vllm import SamplingParams

    extra_args = None if spec is None else {EXTRA_ARGS_KEY: spec}
    return SamplingParams(max_tokens=16, extra_args=extra_args, **sampling)


def beam_params(spec: dict):
    from sae_vllm import steering_beam_params

    return steering_beam_params(spec, beam_width=2, max_tokens=16)


def completion(index: int, num_tokens: int, finish_reason="length", stop_reason=None):
    from vllm.outputs import CompletionOutput

    return CompletionOutput(
        index=index, text="", token_ids=list(range(4, 4 + num_tokens)), cumulative_logprob=None,
        logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason,
    )  # fmt: skip


def request_output(num_prompt_tokens: int, *sequences):
    from vllm.outputs import RequestOutput

    prompt = list(range(1, num_prompt_tokens + 1))
    return RequestOutput("7", None, prompt, None, list(sequences), True)


def beam_output(num_prompt_tokens: int, *sampled: int, finish_reason=None):
    from vllm.entrypoints.generate.beam_search.utils import BeamSearchOutput, BeamSearchSequence

    prompt = {"type": "token", "prompt_token_ids": list(range(1, num_prompt_tokens + 1))}
    beams = []
    for n in sampled:
        tokens = prompt["prompt_token_ids"] + [9] * n
        beams.append(BeamSearchSequence(prompt, tokens, [], finish_reason=finish_reason))
    return BeamSearchOutput(sequences=beams)


def oracle_unreached(scopes, num_prompt_tokens: int, counts: list[int]) -> list[int]:
    return [
        position
        for position, count in enumerate(counts)
        if not python_slice_reaches(scopes, num_prompt_tokens, count)
    ]


def test_generate_outputs_are_judged_as_python_slices_judge_them():
    rng = np.random.default_rng(11)
    unreached = reached = 0
    for _ in range(300):
        scopes = random_scopes(rng)
        num_prompt_tokens = int(rng.integers(1, 14))
        counts = [int(n) for n in rng.integers(1, 8, size=int(rng.integers(1, 4)))]
        sequences = [completion(index, count) for index, count in enumerate(counts)]
        output = request_output(num_prompt_tokens, *sequences)
        expected = oracle_unreached(scopes, num_prompt_tokens, counts)
        assert unreached_sequences(output, params(windowed(*scopes))) == expected, scopes
        unreached += len(expected)
        reached += len(counts) - len(expected)
    assert reached > 100 and unreached > 50


def test_beam_search_outputs_are_judged_by_the_tokens_each_beam_sampled():
    rng = np.random.default_rng(12)
    for _ in range(200):
        scopes = random_scopes(rng)
        num_prompt_tokens = int(rng.integers(1, 14))
        counts = [int(n) for n in rng.integers(1, 8, size=2)]
        expected = oracle_unreached(scopes, num_prompt_tokens, counts)
        output = beam_output(num_prompt_tokens, *counts)
        assert unreached_sequences(output, beam_params(windowed(*scopes))) == expected, scopes


def test_a_sequence_counts_the_stop_token_it_sampled():
    # LATE steers P + 4 on: a sequence steered there sampled at least 6 tokens.
    output = request_output(3, completion(0, 5), completion(1, 6), completion(2, 5, "stop", 99))
    assert unreached_sequences(output, params(LATE)) == [0]  # the stop token left out: 6


def test_sequences_not_finished_aborted_or_failed_are_not_judged():
    output = request_output(
        3, completion(0, 1, None), completion(1, 1, "abort"), completion(2, 1, "error"),
        completion(3, 1, "stop"),
    )  # fmt: skip
    assert unreached_sequences(output, params(LATE)) == [3]
    aborted = beam_output(3, 1, 1, finish_reason="abort")
    assert unreached_sequences(aborted, beam_params(LATE)) == []


def test_unsteered_params_judge_nothing_and_deltas_are_refused():
    from vllm.sampling_params import RequestOutputKind

    early = request_output(3, completion(0, 1))
    assert unreached_sequences(early, params(None)) == []
    assert spec_of_params(params(None)) is None
    as_text = spec_of_params(params('{"edits": [{"feature": 3, "op": "ablate"}]}'))
    assert as_text == spec_of_params(params({"edits": [{"feature": 3, "op": "ablate"}]}))
    with pytest.raises(ValueError, match="not deltas"):
        unreached_sequences(early, params(LATE, output_kind=RequestOutputKind.DELTA))


def test_a_steered_beam_search_reports_each_beam_it_returns():
    spec = spec_of_params(beam_params(LATE))
    with reach_report.tallying() as tally:
        _report_beams(beam_output(3, 2, 5, 6), spec, 3, prompt_index=0)
        _report_beams(beam_output(3, 1, 1, finish_reason="abort"), spec, 3, prompt_index=1)
    assert (tally.ended, tally.unreached) == (3, 2)


def test_the_plugin_installs_the_offline_hooks_before_the_script_imports_llm():
    """vLLM loads plugins when EngineArgs is built, which a script may do before it imports LLM
    or LLMEngine (`EngineArgs(...)`, then `LLM.from_engine_args`): the offline report and the
    steered beam search are installed all the same."""
    script = """
import sys
import vllm.engine.arg_utils
from vllm.plugins import load_general_plugins
assert "vllm.entrypoints.llm" not in sys.modules
assert "vllm.v1.engine.llm_engine" not in sys.modules
load_general_plugins()
from vllm.v1.engine.llm_engine import LLMEngine
from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
wrapped = [LLMEngine.add_request, LLMEngine.step, LLMEngine.abort_request,
           BeamSearchOfflineMixin.beam_search]
print([getattr(method, "_sae_vllm_wrapped", False) for method in wrapped])
"""
    env = {key: value for key, value in os.environ.items() if key != "VLLM_PLUGINS"}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[True, True, True, True]"
