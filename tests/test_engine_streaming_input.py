"""Steering a streaming-input session (vLLM's resumable requests: AsyncLLM.generate fed an
async generator of StreamingInput chunks, the prompt growing after the request arrives).

Each chunk may bring its own SamplingParams, and its steering with them: a chunk's spec steers
the positions that chunk computes (its scope counted from the session's prompt so far), and
what earlier chunks computed keeps the steering it had. Checked against the HF float64
reference, per chunk, for a spec that starts, stops or changes between chunks; two sessions at
once keep their own; rows are given back when the sessions end; a session steered, then not,
or not, then steered, shares no block holding steered KV. On an eager engine and on one under
vLLM's async scheduling (its default on CUDA). vLLM's AsyncLLM keeps its engine core in a
process of its own (no in-process layout)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine_harness import (
    ENGINE_ENV,
    ENGINE_MODES,
    PROMPTS,
    engine_kwargs,
    steered_params,
    tiny_artifacts,
)
from hf_reference import Edit, HFReference, Span

pytestmark = pytest.mark.engine

MAX_TOKENS = 4  # per chunk
BLOCK_SIZE = 32  # KV block (the CPU attention backend takes multiples of 32 only)
SECOND_CHUNK = [5, 60, 7, 80]
SPECS = {  # name -> edits (sae, feature, op, value)
    "strong": [("relu", 3, "set", 8.0)],
    "other": [("jumprelu", 4, "add", 6.0), ("relu", 10, "ablate", None)],
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts(tmp_path_factory.mktemp("streaming-input"))


@pytest.fixture(scope="module")
def reference(artifacts):
    return HFReference(artifacts.model_dir)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: AsyncLLM's output handler runs in the loop it started in."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    pending = asyncio.all_tasks(event_loop)  # the engine's output handler, cancelled at shutdown
    event_loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    event_loop.close()


@pytest.fixture(scope="module", params=["eager", "async"])
def engine(request, artifacts, loop):
    import os

    from cpu_async_scheduling import honor_async_scheduling
    from cpu_model_inspection import inspect_model_classes_in_process
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ.update(ENGINE_ENV)
    inspect_model_classes_in_process()
    honor_async_scheduling()
    mode = ENGINE_MODES[request.param]
    kwargs = engine_kwargs(artifacts.model_dir, block_size=BLOCK_SIZE, **mode) | {
        "additional_config": artifacts.additional_config()
    }

    async def start():
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async_llm = loop.run_until_complete(start())
    yield async_llm
    async_llm.shutdown()


def chunk_params(
    artifacts, spec: str | None, apply_to: str = "generated", max_tokens: int = MAX_TOKENS
):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sampling = {
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "output_kind": RequestOutputKind.DELTA,
    }
    if spec is None:
        return SamplingParams(**sampling)
    return steered_params(artifacts, SPECS[spec], apply_to, **sampling)


async def run_session(engine, request_id: str, chunks: list[tuple[list[int], object]]):
    """Each chunk's generated tokens (in order; each chunk's params give their number)."""
    from vllm.engine.protocol import StreamingInput

    async def inputs():
        for prompt, params in chunks:
            # a copy: vLLM's frontend extends the first chunk's list with the later ones
            prompt_ids = list(prompt)
            yield StreamingInput(prompt={"prompt_token_ids": prompt_ids}, sampling_params=params)

    tokens: list[int] = []
    async for output in engine.generate(inputs(), chunks[0][1], request_id=request_id):
        tokens += output.outputs[0].token_ids
    per_chunk = [(params or chunks[0][1]).max_tokens for _, params in chunks]
    assert len(tokens) == sum(per_chunk)
    ends = np.cumsum(per_chunk)
    return [tokens[end - count : end] for end, count in zip(ends, per_chunk, strict=True)]


def expected_chunks(artifacts, reference, chunks: list[tuple[list[int], str | None, str]]):
    """What the HF reference generates for a session: each chunk's context is the context so
    far, the tokens it generated less the last (vLLM keeps those it computed) and the chunk's
    prompt; its spec steers, within its scope, the positions the chunk computes."""
    context: list[int] = []
    spans: list[Span] = []
    out: list[list[int]] = []
    for prompt, spec, apply_to in chunks:
        computed_from = len(context)  # positions before it were computed by earlier chunks
        context = context + prompt
        if spec is not None:
            edits = [Edit(artifacts.saes[s], f, op, v) for s, f, op, v in SPECS[spec]]
            start = len(context) - 1 if apply_to == "generated" else computed_from
            end = len(context) if apply_to == "prompt" else None
            spans.append(Span(start, end, edits))
        generated = reference.greedy_in_spans(context, MAX_TOKENS, spans)
        out.append(generated)
        context = context + generated[:-1]
        spans = [
            Span(span.lo, len(context) if span.hi is None else span.hi, span.edits)
            for span in spans
        ]
    return out


CASES = {  # id -> each chunk's (spec, scope)
    "steering-starts": [(None, "generated"), ("strong", "generated")],
    "steering-stops": [("strong", "generated"), (None, "generated")],
    "spec-changes": [("strong", "generated"), ("other", "generated")],
    "scope-all-then-prompt": [("other", "all"), ("strong", "prompt")],
}


@pytest.mark.parametrize("case", CASES)
def test_each_chunk_is_steered_by_its_own_spec(engine, loop, artifacts, reference, case):
    prompts = [PROMPTS[0], SECOND_CHUNK]
    chunks = [(p, spec, scope) for p, (spec, scope) in zip(prompts, CASES[case], strict=True)]
    got = loop.run_until_complete(
        run_session(
            engine, case, [(p, chunk_params(artifacts, s, scope)) for p, s, scope in chunks]
        )
    )
    assert got == expected_chunks(artifacts, reference, chunks)
    # and the reference tells the cases apart: the spec of each chunk changes its tokens
    unsteered = expected_chunks(artifacts, reference, [(p, None, "generated") for p in prompts])
    for index, (_, spec, _) in enumerate(chunks):
        if spec is not None:
            assert got[index] != unsteered[index], (case, index)


def test_a_chunk_without_params_keeps_the_sessions_spec(engine, loop, artifacts, reference):
    session = [(PROMPTS[0], chunk_params(artifacts, "strong")), (SECOND_CHUNK, None)]
    got = loop.run_until_complete(run_session(engine, "inherits", session))
    chunks = [(PROMPTS[0], "strong", "generated"), (SECOND_CHUNK, "strong", "generated")]
    assert got == expected_chunks(artifacts, reference, chunks)


def test_concurrent_sessions_keep_their_own_steering_and_give_their_rows_back(
    engine, loop, artifacts, reference
):
    cases = ["steering-starts", "steering-stops", "spec-changes"] * 2
    prompts = [PROMPTS[0], SECOND_CHUNK]

    async def all_sessions():
        return await asyncio.gather(
            *(
                run_session(
                    engine,
                    f"together-{i}",
                    [
                        (p, chunk_params(artifacts, spec, scope))
                        for p, (spec, scope) in zip(prompts, CASES[case], strict=True)
                    ],
                )
                for i, case in enumerate(cases)
            )
        )

    got = loop.run_until_complete(all_sessions())
    for case, chunks in zip(cases, got, strict=True):
        spec_chunks = [(p, s, scope) for p, (s, scope) in zip(prompts, CASES[case], strict=True)]
        assert chunks == expected_chunks(artifacts, reference, spec_chunks), case

    async def settled_stats():
        await run_session(engine, "settle", [(PROMPTS[1], chunk_params(artifacts, None))])
        return (await engine.collective_rpc("sae_steering_stats"))[0]

    stats = loop.run_until_complete(settled_stats())
    assert stats["rows_in_use"] == 0, stats
    # under async scheduling the settling session's own finish has not reached the worker yet
    assert stats["requests_known"] <= 1, stats


def test_a_session_steered_then_not_shares_no_block_holding_steered_kv(
    engine, loop, artifacts, reference
):
    """The session's first KV block fills only in its unsteered second chunk, yet holds positions
    its first chunk steered: it must not serve a later unsteered request with those tokens, as
    the block of a session never steered does."""
    from vllm import SamplingParams

    long_chunk = BLOCK_SIZE  # the second chunk's decoding fills the first block
    first_chunks = {"steered": chunk_params(artifacts, "strong"), "unsteered": None}

    async def session_then_replay(first) -> tuple[int, list[int]]:
        await engine.reset_prefix_cache()
        first = first or chunk_params(artifacts, None)
        second = chunk_params(artifacts, None, max_tokens=long_chunk)
        name = f"replayed-{first.extra_args is not None}"
        o1, o2 = await run_session(engine, name, [(PROMPTS[0], first), (SECOND_CHUNK, second)])
        # the session's tokens, as a plain prompt: the first block is the session's own
        replay = [*PROMPTS[0], *o1[:-1], *SECOND_CHUNK, *o2][: BLOCK_SIZE + 4]
        params = SamplingParams(temperature=0, max_tokens=4)
        outputs = engine.generate({"prompt_token_ids": replay}, params, f"{name}-r")
        final = [output async for output in outputs][-1]
        return final.num_cached_tokens, list(final.outputs[0].token_ids), replay

    for kind, first in first_chunks.items():
        cached, tokens, replay = loop.run_until_complete(session_then_replay(first))
        # the geometry shares the block when nothing steered it
        assert cached == (BLOCK_SIZE if kind == "unsteered" else 0), kind
        assert tokens == reference.greedy(replay, 4, [])[0], kind


def test_a_session_unsteered_then_steered_shares_no_block_its_steered_chunk_fills(
    engine, loop, artifacts, reference
):
    """A steered chunk after an unsteered one fills the session's first block from its prompt,
    steering those positions: the block must not serve an unsteered request with those tokens
    (vLLM hashes a chunk's new blocks before it hands the session the chunk's params; they
    were keyed as the unsteered chunk's, and the replay read the steered KV)."""
    from vllm import SamplingParams

    long_chunk = [(i * 29) % 300 + 4 for i in range(BLOCK_SIZE - 4)]  # fills the first block

    async def session_then_replay(second) -> tuple[int, list[int], list[int]]:
        await engine.reset_prefix_cache()
        first = chunk_params(artifacts, None)
        name = f"late-{second.extra_args is not None}"
        o1, _ = await run_session(engine, name, [(PROMPTS[0], first), (long_chunk, second)])
        replay = [*PROMPTS[0], *o1[:-1], *long_chunk][: BLOCK_SIZE + 4]
        params = SamplingParams(temperature=0, max_tokens=4)
        outputs = engine.generate({"prompt_token_ids": replay}, params, f"{name}-r")
        final = [output async for output in outputs][-1]
        return final.num_cached_tokens, list(final.outputs[0].token_ids), replay

    for kind in ("unsteered", "steered"):
        second = chunk_params(artifacts, None if kind == "unsteered" else "strong", "all")
        cached, tokens, replay = loop.run_until_complete(session_then_replay(second))
        assert cached == (BLOCK_SIZE if kind == "unsteered" else 0), kind
        assert tokens == reference.greedy(replay, 4, [])[0], kind


def test_a_session_is_not_judged_by_the_placeholder_vllm_checks_its_params_on(
    engine, loop, artifacts, reference
):
    """AsyncLLM checks a session's params on a one-token placeholder prompt, which a prompt
    window from position 2 does not reach; the frontend's steers_nothing check must leave that
    to the session, whose prompt it does reach and steer."""
    from vllm.sampling_params import RequestOutputKind

    params = steered_params(
        artifacts, SPECS["strong"], "prompt", {"start": 2}, max_tokens=MAX_TOKENS,
        output_kind=RequestOutputKind.DELTA,
    )  # fmt: skip
    (tokens,) = loop.run_until_complete(run_session(engine, "windowed", [(PROMPTS[0], params)]))
    edits = [Edit(artifacts.saes[s], f, op, v) for s, f, op, v in SPECS["strong"]]
    expected = reference.greedy_in_spans(PROMPTS[0], MAX_TOKENS, [Span(2, len(PROMPTS[0]), edits)])
    assert tokens == expected
    assert expected != reference.greedy_in_spans(PROMPTS[0], MAX_TOKENS, [])
