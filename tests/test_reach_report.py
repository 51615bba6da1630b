"""Sequences of steered requests that end before the first position their spec steers: found as
the Python-slice oracle finds them, each reported once, vLLM's outputs passed on unchanged.

The vLLM config is a stand-in (only its `additional_config` is read); SamplingParams,
RequestOutput and CompletionOutput are vLLM's own, imported inside the tests: vLLM imported
while pytest collects would import Triton before test_kernels.py sets its interpreter mode."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from reach_oracle import python_slice_reaches, random_scopes, windowed
from sae_vllm import LOGGER_NAME
from sae_vllm.config import EXTRA_ARGS_KEY, GENERATION_START_KEY
from sae_vllm.engine import intake, reach_report
from sae_vllm.engine.sequence_ends import reporting_sequence_ends
from tiny_model import stand_in_vllm_config

LATE = {"edits": [{"feature": 3, "op": "set", "value": 2.0}], "window": {"start": 5}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return stand_in_vllm_config(tmp_path_factory.mktemp("sae"))


def sampling_params(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=16, extra_args=extra_args or None)


@pytest.fixture
def unreached_calls():
    """How many times the listener was called during the test."""
    calls: list[None] = []
    reach_report.add_unreached_listener(lambda: calls.append(None))
    yield calls
    reach_report._listeners.pop()


def test_sequences_that_end_unsteered_are_found_as_python_slices_find_them(engine, unreached_calls):
    rng = np.random.default_rng(5)
    unreached = reached = 0
    for _ in range(300):
        scopes = random_scopes(rng)
        num_prompt_tokens, num_sampled = int(rng.integers(1, 14)), int(rng.integers(1, 8))
        params = sampling_params(**{EXTRA_ARGS_KEY: windowed(*scopes)})
        spec = intake.judged_spec(engine, params)
        with reach_report.tallying() as tally:
            reach_report.sequence_end_reporter(spec, num_prompt_tokens, "r")(num_sampled)
        steered = python_slice_reaches(scopes, num_prompt_tokens, num_sampled)
        assert (tally.ended, tally.unreached) == (1, 0 if steered else 1), (scopes, tally)
        reached += steered
        unreached += not steered
    assert reached > 100 and unreached > 50
    assert len(unreached_calls) == unreached


def test_unsteered_requests_and_beam_steps_are_not_watched(engine):
    """The frontend watches the sequences of a request whose spec check_reach judged."""
    assert intake.check_reach(engine, sampling_params(), 4, 16) is None
    step = sampling_params(**{EXTRA_ARGS_KEY: LATE, GENERATION_START_KEY: 4})
    assert intake.check_reach(engine, step, 9, 16) is None
    steered = sampling_params(**{EXTRA_ARGS_KEY: LATE})
    assert intake.check_reach(engine, steered, 3, 16) == intake.judged_spec(engine, steered)


def test_the_tally_open_where_a_request_is_made_counts_its_sequences_wherever_they_end(
    engine, unreached_calls
):
    """vLLM fans a request's prompts out to tasks (which copy the context), and a stream's
    sequences end after the request's context has closed: both count in the request's tally."""
    spec = intake.judged_spec(engine, sampling_params(**{EXTRA_ARGS_KEY: LATE}))  # P + 4 on

    async def end(ended: reach_report.SequenceEnd, num_sampled: int) -> None:
        ended(num_sampled)

    async def fan_out() -> tuple[reach_report.SequenceTally, reach_report.SequenceEnd]:
        with reach_report.tallying() as tally:
            ended = reach_report.sequence_end_reporter(spec, 3, "cmpl-7")
            sampled = [1, 5, 6]  # 5 tokens come from positions 2..6, the 6th from 7
            await asyncio.gather(*(end(ended, n) for n in sampled))  # a task each, as vLLM's
        return tally, ended

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        tally, ended = asyncio.run(fan_out())
        ended(9)  # after its context closed, as a stream's last sequence ends
        with reach_report.tallying() as elsewhere:
            reach_report.sequence_end_reporter(spec, 3, "cmpl-8")(2)
        made_outside = reach_report.sequence_end_reporter(spec, 3, "cmpl-9")
        with reach_report.tallying() as unrelated:
            made_outside(1)  # made where no tally was open: counted by the listener only
    finally:
        logger.removeHandler(handler)
    assert (tally.ended, tally.unreached) == (4, 2)
    assert (elsewhere.ended, elsewhere.unreached, unrelated.ended) == (1, 1, 0)
    assert len(unreached_calls) == 4
    assert [r.levelno for r in records] == [logging.WARNING] * 4
    message = records[0].getMessage()
    assert message.startswith("Request cmpl-7: a sequence ended after 1 generated tokens")
    assert "prompt of 3 tokens, scope generated[5:]" in message
    records.clear()
    logger.addHandler(handler)
    try:  # a sequence whose index is known (a choice of n > 1, a beam's rank) is named by it
        reach_report.sequence_end_reporter(spec, 3, "cmpl-8")(1, 2)
    finally:
        logger.removeHandler(handler)
    assert records[0].getMessage().startswith("Request cmpl-8: sequence 2 ended after 1 generated")


# --- counting the tokens each sequence sampled -----------------------------------------------


def sequence(index: int, token_ids: list[int], finish_reason=None, stop_reason=None):
    from vllm.outputs import CompletionOutput

    return CompletionOutput(
        index=index, text="", token_ids=token_ids, cumulative_logprob=None, logprobs=None,
        finish_reason=finish_reason, stop_reason=stop_reason,
    )  # fmt: skip


def output(*sequences, finished: bool = False):
    from vllm.outputs import RequestOutput

    return RequestOutput("r", None, [1, 2], None, list(sequences), finished)


def reported(outputs: list, delta: bool) -> list[tuple[int, int]]:
    """The (count, sequence index) pairs reported while the outputs pass through, checking
    they pass unchanged."""
    ends: list[tuple[int, int]] = []

    def sequence_ended(count: int, index: int) -> None:
        ends.append((count, index))

    async def source():
        for item in outputs:
            yield item

    async def drain() -> list:
        return [item async for item in reporting_sequence_ends(source(), delta, sequence_ended)]

    assert asyncio.run(drain()) == outputs
    return ends


def test_deltas_of_interleaved_sequences_are_summed_and_each_ending_reported_once():
    outputs = [
        output(sequence(0, [1, 2])),
        output(sequence(1, [5])),
        output(sequence(0, [3], "stop"), sequence(1, [6])),
        output(sequence(1, [], "length")),  # a last delta may carry no token
        output(sequence(1, [], "length"), finished=True),
    ]
    assert reported(outputs, delta=True) == [(3, 0), (2, 1)]


def test_whole_outputs_are_counted_as_they_stand_and_repeated_endings_once():
    cumulative = [
        output(sequence(0, [1]), sequence(1, [4])),
        output(sequence(0, [1, 2], "stop"), sequence(1, [4, 5])),
        output(sequence(0, [1, 2], "stop"), sequence(1, [4, 5, 6, 7], "length"), finished=True),
    ]
    assert reported(cumulative, delta=False) == [(2, 0), (4, 1)]
    final_only = [output(sequence(0, [9] * 7, "length"), sequence(1, [8], "stop"), finished=True)]
    assert reported(final_only, delta=False) == [(7, 0), (1, 1)]


@pytest.mark.parametrize(  # (token ids, finish reason, stop reason), as vLLM's outputs end
    ("ending", "count"),
    [
        (([4, 5], "stop", 2), 3),  # beam search leaves the EOS out
        (([4, 5, 2], "stop", 2), 3),  # a stop token kept in the tokens
        (([4, 5], "stop", "x"), 2),  # a stop string
        (([4, 5, 2], "stop", None), 3),  # end of sequence
        (([4, 5], "repetition", None), 2),
    ],
)
def test_a_sequence_counts_every_token_it_sampled(ending, count):
    token_ids, finish_reason, stop_reason = ending
    ended = sequence(0, token_ids, finish_reason, stop_reason)
    assert reported([output(ended, finished=True)], delta=False) == [(count, 0)]


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_sequences_cut_short_are_not_reported(reason):
    assert reported([output(sequence(0, [4], reason), finished=True)], delta=True) == []


def test_closing_the_report_closes_vllms_generator():
    """Closing vLLM's generator is how a server aborts a request whose client went away."""
    closed: list[bool] = []

    async def source():
        try:
            yield output(sequence(0, [1]))
            yield output(sequence(0, [1, 2], "stop"), finished=True)
        finally:
            closed.append(True)

    async def read_one_and_close() -> list[bool]:
        report = reporting_sequence_ends(source(), False, lambda n: None)
        await anext(report)
        await report.aclose()
        return list(closed)  # now, not when asyncio.run finalizes what was left open

    assert asyncio.run(read_one_and_close()) == [True]
