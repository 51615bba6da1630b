"""Steering tables: row lifecycle and the per-step token->row map and scope mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_reference import scope_span
from sae_vllm.engine.tables import NO_ROW, ROWS_PER_REQUEST, SteeringTables
from sae_vllm.kernels import OP_CODES
from sae_vllm.spec import MAX_SCOPES, resolve_spec

SIZES = {"a": 64, "b": 32}


def spec(apply_to="generated", sae="a", feature=3, op="set", value=2.0, window=None):
    edit = {"sae": sae, "feature": feature, "op": op}
    if op != "ablate":
        edit["value"] = value
    data = {"edits": [edit], "apply_to": apply_to}
    if window is not None:
        data["window"] = window
    return resolve_spec(data, SIZES)


def make(max_rows=4, max_tokens=32, places_on_device=False):
    return SteeringTables(
        ["a", "b"],
        max_rows,
        max_edits=3,
        max_tokens=max_tokens,
        device="cpu",
        places_on_device=places_on_device,
    )


def test_admit_writes_each_saes_slots_and_release_clears_them():
    tables = make()
    two = resolve_spec(
        {
            "edits": [
                {"sae": "a", "feature": 5, "op": "scale", "value": 0.5},
                {"sae": "b", "feature": 9, "op": "ablate"},
                {"sae": "a", "feature": 6, "op": "cap", "value": 1.0},
            ]
        },
        SIZES,
    )
    row = tables.admit("r1", two, 4)
    a, b = tables.tables["a"], tables.tables["b"]
    assert a.feature[row].tolist() == [5, 6, -1]
    assert a.op[row, :2].tolist() == [OP_CODES["scale"], OP_CODES["cap"]]
    assert a.value[row, :2].tolist() == [0.5, 1.0]
    assert b.feature[row].tolist() == [9, -1, -1] and b.op[row, 0] == OP_CODES["ablate"]
    assert tables.rows_in_use == 1
    tables.release("r1")
    assert a.feature[row].tolist() == [-1, -1, -1] and b.feature[row].tolist() == [-1, -1, -1]
    assert tables.rows_in_use == 0 and tables.rows_free == 4


def test_unsteered_requests_take_no_row_and_rows_are_reused():
    tables = make(max_rows=2)
    assert tables.admit("plain", None, 4) == NO_ROW
    rows = {tables.admit("x", spec(), 4), tables.admit("y", spec(), 4)}
    assert rows == {0, 1}
    with pytest.raises(RuntimeError, match="exhausted"):
        tables.admit("z", spec(), 4)
    tables.release("x")
    tables.release("plain")
    assert tables.admit("z", spec(), 4) in rows


def placed_on_device(tables: SteeringTables) -> SteeringTables:
    """`tables` (built with places_on_device) with a DevicePlacement reading a positions buffer
    of its own, as the steered layer reads the runner's; `step` then reads its rows."""
    positions = torch.zeros(tables.tok_first.shape[0], dtype=torch.int64)
    tables.placement = tables.device_placement(positions)
    return tables


# How far ahead of the model's positions the host's run in `step` on device-placed tables, as
# under async scheduling with speculative decoding when the last step's drafts were rejected.
HOST_POSITIONS_AHEAD = 3
PADDING_TOKENS = 2


def step(tables, req_ids, scheduled, computed):
    """Write one step and return each token's row and scope: the token buffers, or for tables
    placed on the device, what DevicePlacement derives from the true positions while the host
    is given positions that run ahead."""
    n = sum(scheduled)
    placement = getattr(tables, "placement", None)
    if placement is None:
        tables.write_step(req_ids, np.array(scheduled), np.array(computed))
        return tables.tok_row[:n].tolist(), tables.tok_scope[:n].tolist()
    host_computed = np.array(computed) + HOST_POSITIONS_AHEAD
    tables.write_step(req_ids, np.array(scheduled), host_computed)
    true_positions = [c + i for c, k in zip(computed, scheduled, strict=True) for i in range(k)]
    placement.positions[:n] = torch.tensor(true_positions, dtype=torch.int64)
    padding = min(PADDING_TOKENS, placement.positions.shape[0] - n)
    placement.positions[n : n + padding] = 5  # whatever padding tokens hold
    rows, scope = placement(n + padding)
    assert rows[n:].tolist() == [NO_ROW] * padding and not scope[n:].any()
    assert rows.dtype == torch.int32 and scope.dtype == torch.bool
    return rows[:n].tolist(), scope[:n].tolist()


def in_scope_rows(owners: list[int], scope: list[bool]) -> list[int]:
    """Each token's row as the tables write it: its request's row in scope, NO_ROW out of it."""
    return [row if steered else NO_ROW for row, steered in zip(owners, scope, strict=True)]


def test_scopes_in_a_mixed_prefill_and_decode_batch():
    tables = make()
    g = tables.admit("gen", spec("generated"), 4)
    a = tables.admit("all", spec("all"), 5)
    p = tables.admit("prompt", spec("prompt"), 4)
    tables.admit("none", None, 9)
    # gen: prefill of a 4-token prompt; all: decode at position 6 (prompt 5);
    # prompt: chunked prefill positions 2..4 of a 4-token prompt + first decode pos; none: 2 tokens
    rows, scope = step(tables, ["gen", "all", "prompt", "none"], [4, 1, 3, 2], [0, 6, 2, 0])
    assert scope == [False, False, False, True, True, True, True, False, False, False]
    assert rows == in_scope_rows([g] * 4 + [a] + [p] * 3 + [NO_ROW] * 2, scope)


def test_generated_scope_steers_every_decode_position():
    tables = make()
    r = tables.admit("gen", spec("generated"), 4)
    for position in range(3, 8):
        rows, scope = step(tables, ["gen"], [1], [position])
        assert rows == [r] and scope == [True]


def test_a_generation_start_scopes_resubmitted_tokens_as_generated():
    # A beam-search step: prompt = 4 original tokens + 3 generated ones, prefilled at once.
    tables = make()
    g = tables.admit("gen", spec("generated"), 7, generation_start=4)
    p = tables.admit("prompt", spec("prompt"), 7, generation_start=4)
    a = tables.admit("all", spec("all"), 7, generation_start=4)
    plain = tables.admit("plain-gen", spec("generated"), 7)  # its own prompt end: position 6
    rows, scope = step(tables, ["gen", "prompt", "all", "plain-gen"], [7] * 4, [0] * 4)
    assert rows == in_scope_rows([g] * 7 + [p] * 7 + [a] * 7 + [plain] * 7, scope)
    assert scope == (
        [False] * 3 + [True] * 4  # generated: from the last original prompt position on
        + [True] * 4 + [False] * 3  # prompt: the original prompt only
        + [True] * 7
        + [False] * 6 + [True]
    )  # fmt: skip
    tables.release("gen")
    assert tables.admit("gen2", spec("generated"), 7) == g  # the reused row forgets the start
    rows, scope = step(tables, ["gen2"], [7], [0])
    assert scope == [False] * 6 + [True]


def test_tokens_past_the_step_are_reset_and_idle_batches_clear_the_buffer():
    tables = make()
    r = tables.admit("s", spec("all"), 10)
    step(tables, ["s"], [10], [0])
    step(tables, ["s"], [1], [10])
    assert tables.tok_row[1:].eq(NO_ROW).all() and not tables.tok_scope[1:].any()
    tables.admit("plain", None, 5)
    rows, _ = step(tables, ["plain"], [5], [0])
    assert rows == [NO_ROW] * 5
    assert tables.tok_row.eq(NO_ROW).all() and not tables.tok_scope.any()
    assert r >= 0


def test_write_step_is_vectorised_over_large_batches():
    tables = SteeringTables(["a"], 512, 2, 8192, torch.device("cpu"))
    ids = [f"r{i}" for i in range(256)]
    for i, rid in enumerate(ids):
        tables.admit(rid, spec() if i % 2 else None, 16)
    sched = np.full(256, 32)
    tables.write_step(ids, sched, np.zeros(256, np.int64))
    rows = tables.tok_row[: 256 * 32].view(256, 32)
    assert (rows[0::2] == NO_ROW).all() and (rows[1::2, 15:] >= 0).all()
    assert (rows[1::2, :15] == NO_ROW).all()  # before the generated scope
    scope = tables.tok_scope[: 256 * 32].view(256, 32)
    assert scope[1, 15] and not scope[1, 14] and not scope[0, 20]


def test_steady_decode_steps_reuse_the_buffers_and_changes_invalidate_them():
    tables = make()
    g = tables.admit("g", spec("generated"), 4)
    p = tables.admit("p", spec("prompt"), 4)
    assert step(tables, ["g", "p"], [4, 4], [0, 0]) == (
        [NO_ROW] * 3 + [g] + [p] * 4,
        [False, False, False, True, True, True, True, True],
    )
    assert step(tables, ["g", "p"], [1, 1], [4, 4]) == ([g, NO_ROW], [True, False])
    tables.tok_scope[1] = True  # a reused step leaves the buffers as the last full write left them
    assert step(tables, ["g", "p"], [1, 1], [5, 5]) == ([g, NO_ROW], [True, True])
    tables.release("p")  # any row change forces a full write
    assert step(tables, ["g", "p"], [1, 1], [6, 6]) == ([g, NO_ROW], [True, False])


BOTH_PLACEMENTS = pytest.mark.parametrize("places_on_device", [False, True], ids=["host", "device"])


def made(places_on_device: bool) -> SteeringTables:
    """make()'s tables, placed on the device when asked."""
    tables = make(places_on_device=places_on_device)
    return placed_on_device(tables) if places_on_device else tables


@BOTH_PLACEMENTS
def test_a_settled_batch_is_written_again_after_a_step_without_its_steered_request(
    places_on_device,
):
    """vLLM's runner drops a running request that a step does not schedule from its batch, and
    adds it back at the end when it is: a step of the unsteered requests alone clears the
    buffers, so the settled batch that follows is written again, not reused."""
    tables = made(places_on_device)
    tables.admit("plain", None, 4)
    g = tables.admit("g", spec("generated"), 4)
    assert step(tables, ["plain", "g"], [1, 1], [4, 4]) == ([NO_ROW, g], [False, True])
    assert step(tables, ["plain"], [1], [5]) == ([NO_ROW], [False])
    assert step(tables, ["plain", "g"], [1, 1], [6, 5]) == ([NO_ROW, g], [False, True])
    assert step(tables, ["plain", "g"], [1, 1], [7, 6]) == ([NO_ROW, g], [False, True])


@BOTH_PLACEMENTS
def test_a_request_admitted_again_under_its_id_reads_its_new_rows_in_the_same_layout(
    places_on_device,
):
    """A streaming-input session's next chunk is released and admitted again under the same
    id, and may bring another spec: the same batch layout must not keep the old rows, which
    may belong to another request by then."""
    tables = made(places_on_device)
    s = tables.admit("s", spec("generated", feature=3), 4)
    assert step(tables, ["s"], [1], [4]) == ([s], [True])
    assert step(tables, ["s"], [1], [5]) == ([s], [True])
    tables.release("s")
    x = tables.admit("x", spec("generated", feature=9), 4)  # takes s's old row
    s_again = tables.admit("s", spec("generated", feature=5), 6)
    assert x == s and s_again != s
    assert step(tables, ["s"], [1], [6]) == ([s_again], [True])
    tables.release("s")
    tables.admit("s", None, 7)  # the next chunk unsteered
    assert step(tables, ["s"], [1], [7]) == ([NO_ROW], [False])


@BOTH_PLACEMENTS
def test_a_settled_batch_whose_positions_move_back_is_written_again(places_on_device):
    """vLLM recomputes a running request's KV that failed to load (kv_load_failure_policy
    "recompute") by moving its position back, with no release: the same layout at lower
    positions is written again, not reused."""
    tables = made(places_on_device)
    r = tables.admit("r", spec("all", window={"end": 8}), 100)
    assert step(tables, ["r"], [16], [32]) == ([NO_ROW] * 16, [False] * 16)
    assert step(tables, ["r"], [16], [0]) == ([r] * 8 + [NO_ROW] * 8, [True] * 8 + [False] * 8)


@BOTH_PLACEMENTS
def test_staged_tables_reach_the_device_exactly_as_direct_writes_do(places_on_device):
    """The staged path (host copies flushed to the device, used on CUDA) run on CPU against the
    direct one, through admissions, releases, prefill, decode, steady and idle steps."""
    direct, staged = (
        SteeringTables(
            ["a", "b"],
            6,
            3,
            24,
            torch.device("cpu"),
            staged=flag,
            places_on_device=places_on_device,
        )
        for flag in (False, True)
    )
    token_buffers = ["tok_first"] if places_on_device else ["tok_row", "tok_scope"]
    rng = np.random.default_rng(0)
    computed: dict[str, int] = {}
    prompt_len: dict[str, int] = {}
    steered_steps = 0
    for step_index in range(300):
        running = list(computed)
        if running and rng.random() < 0.25:
            gone = running[int(rng.integers(len(running)))]
            for tables in (direct, staged):
                tables.release(gone)
            del computed[gone], prompt_len[gone]
        if len(computed) < 5 and rng.random() < 0.35:
            new = f"r{step_index}"
            request_spec = None
            if rng.random() < 0.7:
                request_spec = spec(
                    apply_to=("generated", "all", "prompt")[int(rng.integers(3))],
                    sae=("a", "b")[int(rng.integers(2))],
                    feature=int(rng.integers(32)),
                    op=("set", "add", "ablate")[int(rng.integers(3))],
                )
            computed[new], prompt_len[new] = 0, int(rng.integers(1, 6))
            for tables in (direct, staged):
                tables.admit(new, request_spec, prompt_len[new])
        ids = list(computed)
        scheduled = [
            1 if computed[r] >= prompt_len[r] else prompt_len[r] - computed[r] for r in ids
        ]
        args = (np.array(scheduled, dtype=np.int64), np.array([computed[r] for r in ids]))
        for tables in (direct, staged):
            tables.write_step(ids, *args)
        for r, n in zip(ids, scheduled, strict=True):
            computed[r] += n
        for name in token_buffers:
            assert torch.equal(getattr(staged, name), getattr(direct, name)), (step_index, name)
        for name in ("edges", "rows"):
            got = getattr(staged.segments, name)
            assert torch.equal(got, getattr(direct.segments, name)), (step_index, name)
        for sae in ("a", "b"):
            for name in ("feature", "value", "op"):
                got = getattr(staged.tables[sae], name)
                assert torch.equal(got, getattr(direct.tables[sae], name)), (step_index, sae)
        steered_steps += bool(getattr(direct, token_buffers[0]).ge(0).any())
    assert steered_steps > 100  # the sequence steered tokens on most steps


def test_device_placement_follows_the_models_positions_not_the_hosts():
    """Under async scheduling with speculative decoding the host counts the last step's drafts
    as accepted; the model's positions, corrected on the device, decide each token's segment.
    The same batch layout reuses the first rows at every position, across window edges."""
    tables = placed_on_device(make(max_tokens=16, places_on_device=True))
    w = tables.admit("w", spec("generated", window={"start": 3, "end": 9}), 4)  # positions 6..11
    tables.admit("plain", None, 4)
    assert step(tables, ["w", "plain"], [4, 4], [0, 0]) == ([NO_ROW] * 8, [False] * 8)
    for position in range(4, 16, 3):  # a decode step of a token and two drafts
        rows, scope = step(tables, ["w", "plain"], [3, 1], [position, position])
        expected = [w if 6 <= p < 12 else NO_ROW for p in range(position, position + 3)]
        assert rows == [*expected, NO_ROW], position
        assert scope == [row != NO_ROW for row in rows]
    assert tables.tok_first[:4].tolist() == [w, w, w, NO_ROW]


def test_device_placement_needs_tables_that_keep_their_bounds_on_the_device():
    with pytest.raises(ValueError, match="on the host"):
        make().device_placement(torch.zeros(32, dtype=torch.int64))


def test_a_window_slices_its_scope_in_prefill_and_decode():
    tables = make(max_tokens=40)
    first = tables.admit("first", spec("generated", window={"end": 3}), 4)
    late = tables.admit("late", spec("generated", window={"start": 2}), 4)
    tail = tables.admit("tail", spec("prompt", window={"start": -2}), 4)
    inner = tables.admit("inner", spec("all", window={"start": 1, "end": 4}), 4)
    # 4-token prompts prefilled whole, then decoded one position a step
    rows, scope = step(tables, ["first", "late", "tail", "inner"], [4] * 4, [0] * 4)
    assert rows == in_scope_rows([first] * 4 + [late] * 4 + [tail] * 4 + [inner] * 4, scope)
    assert scope == (
        [False] * 3 + [True]  # generated from 3: its first 3 positions are 3, 4, 5
        + [False] * 4  # generated from 3, window from 2: 5 and on
        + [False, False, True, True]  # the last 2 prompt positions
        + [False, True, True, True]  # positions 1..3
    )  # fmt: skip
    decoded = [step(tables, ["first", "late", "tail", "inner"], [1] * 4, [p] * 4)[1]
               for p in range(4, 8)]  # fmt: skip
    assert decoded == [
        [True, False, False, False],  # position 4
        [True, True, False, False],  # 5
        [False, True, False, False],  # 6: past the first window
        [False, True, False, False],  # 7
    ]


def test_a_window_past_a_short_prompt_steers_nothing():
    tables = make()
    tables.admit("r", spec("prompt", window={"start": 6}), 4)
    assert step(tables, ["r"], [4], [0])[1] == [False] * 4


def test_decode_steps_are_reused_only_once_no_window_edge_lies_ahead():
    tables = make()
    r = tables.admit("r", spec("generated", window={"start": 1, "end": 3}), 3)
    step(tables, ["r"], [3], [0])  # prompt: positions 0..2; the window steers 3 and 4
    assert [step(tables, ["r"], [1], [p])[1] for p in (3, 4, 5)] == [[True]] * 2 + [[False]]
    tables.tok_scope[0] = True  # a reused step leaves the buffers as the last full write left them
    assert step(tables, ["r"], [1], [6])[1] == [True]  # past both edges: reused
    assert r >= 0


def python_slice_mask(apply_to, window, prompt_len, positions):
    """Whether each position is steered, by the HF reference's own rule (Python slices of the
    scope's positions, written apart from sae_vllm.engine.scopes)."""
    span = scope_span(prompt_len, [], apply_to, window)
    return [span.lo <= p and (span.hi is None or p < span.hi) for p in positions]


def random_window(rng, negative: bool) -> dict | None:
    """A valid window (None half the time); negative offsets only where the scope allows."""
    if rng.random() < 0.5:
        return None
    start = int(rng.integers(-6 if negative else 0, 6))
    if rng.random() < 0.4:
        return {"start": start}
    return {"start": start, "end": int(rng.integers(start + 1, start + 8))}


def random_steps(tables, rng, steps: int, draw_spec):
    """Drive `tables` through random admissions (specs from `draw_spec(rng)`), releases,
    chunked prefills and decode runs (steady steps included, steps that leave some running
    requests out, as vLLM's runner drops a request a step does not schedule, and positions
    moved back, as vLLM recomputes KV that failed to load). Yields, for
    each step, its index, its rows and scope, and each scheduled request (a dict: spec,
    prompt, row) with its positions and its tokens' slice of the step."""
    requests: dict[str, dict] = {}
    for step_index in range(steps):
        if requests and rng.random() < 0.08:
            gone = list(requests)[int(rng.integers(len(requests)))]
            tables.release(gone)
            del requests[gone]
        if len(requests) < 6 and rng.random() < 0.15:
            request_spec = draw_spec(rng)
            new, prompt_len = f"r{step_index}", int(rng.integers(1, 12))
            row = tables.admit(new, request_spec, prompt_len)
            requests[new] = {"spec": request_spec, "prompt": prompt_len, "computed": 0, "row": row}
        if requests and rng.random() < 0.03:  # KV recomputed after a failed load: no release
            moved = requests[list(requests)[int(rng.integers(len(requests)))]]
            moved["computed"] = int(rng.integers(0, moved["computed"] + 1))
        ids = list(requests)
        if len(ids) > 1 and rng.random() < 0.15:  # a step that leaves some running ones out
            ids = [r for r in ids if rng.random() < 0.5] or ids[:1]
        if not ids:
            continue
        scheduled = []
        for r in ids:
            left = requests[r]["prompt"] - requests[r]["computed"]
            scheduled.append(int(rng.integers(1, left + 1)) if left > 0 else 1)
        rows, scope = step(tables, ids, scheduled, [requests[r]["computed"] for r in ids])
        scheduled_requests, at = [], 0
        for r, n in zip(ids, scheduled, strict=True):
            request = requests[r]
            positions = range(request["computed"], request["computed"] + n)
            scheduled_requests.append((request, positions, slice(at, at + n)))
            request["computed"] += n
            at += n
        yield step_index, rows, scope, scheduled_requests


@pytest.mark.parametrize("places_on_device", [False, True], ids=["host", "device"])
def test_windowed_masks_match_python_slices_through_random_batches(places_on_device):
    """Every token's scope bit equals the Python slice of its request's scope."""

    def draw_spec(rng):
        apply_to = ("generated", "all", "prompt")[int(rng.integers(3))]
        window = random_window(rng, negative=apply_to == "prompt")
        return None if rng.random() < 0.2 else spec(apply_to, window=window)

    tables = SteeringTables(["a"], 8, 2, 64, torch.device("cpu"), places_on_device=places_on_device)
    if places_on_device:
        placed_on_device(tables)
    checked_in = checked_out = 0
    batches = random_steps(tables, np.random.default_rng(1), 400, draw_spec)
    for step_index, rows, scope, scheduled in batches:
        for request, positions, tokens in scheduled:
            n = len(positions)
            if request["spec"] is None:
                assert rows[tokens] == [NO_ROW] * n and scope[tokens] == [False] * n
                continue
            window = request["spec"].window
            window = None if window is None else window.model_dump(exclude_none=True)
            expected = python_slice_mask(
                request["spec"].apply_to.value, window, request["prompt"], positions
            )
            assert scope[tokens] == expected, (step_index, window, positions)
            assert rows[tokens] == in_scope_rows([request["row"]] * n, expected)
            checked_in += sum(expected)
            checked_out += n - sum(expected)
    assert checked_in > 200 and checked_out > 200


def scoped_spec(*edits: dict, apply_to: str = "generated"):
    """A spec of the given edits, each a dict with optional `apply_to` / `window` of its own."""
    return resolve_spec({"edits": list(edits), "apply_to": apply_to}, SIZES)


def row_edits(tables, row: int) -> set[tuple[str, int, int]]:
    """(sae, feature, op code) of every edit slot filled in `row`."""
    if row == NO_ROW:
        return set()
    return {
        (sae, int(f), int(o))
        for sae, table in tables.tables.items()
        for f, o in zip(table.feature[row], table.op[row], strict=True)
        if f >= 0
    }


def test_edits_with_their_own_scopes_get_a_row_per_distinct_edit_set():
    tables = make(max_rows=8)
    two_scopes = scoped_spec(
        {"sae": "a", "feature": 1, "op": "set", "value": 1.0},  # the spec's: generated
        {"sae": "b", "feature": 2, "op": "ablate", "apply_to": "all", "window": {"end": 5}},
    )
    tables.admit("r", two_scopes, 4)
    assert tables.rows_in_use == 3
    rows, scope = step(tables, ["r"], [4], [0])
    rows += [step(tables, ["r"], [1], [p])[0][0] for p in range(4, 8)]
    # positions 0..2: b's edit alone; 3 and 4: both; 5 and on: a's alone
    only_b, both, only_a = rows[0], rows[3], rows[5]
    assert rows == [only_b] * 3 + [both] * 2 + [only_a] * 3 and scope == [True] * 4
    set_a, ablate_b = ("a", 1, OP_CODES["set"]), ("b", 2, OP_CODES["ablate"])
    assert row_edits(tables, only_b) == {ablate_b}
    assert row_edits(tables, both) == {set_a, ablate_b}
    assert row_edits(tables, only_a) == {set_a}
    tables.release("r")
    assert tables.rows_in_use == 0
    assert all(row_edits(tables, row) == set() for row in (only_b, both, only_a))


def test_a_spec_of_max_scopes_staggered_windows_takes_rows_per_request_rows():
    staggered = scoped_spec(
        *[
            {
                "sae": "a",
                "feature": i,
                "op": "add",
                "value": 1.0,
                "window": {"start": i, "end": i + 5},
            }
            for i in range(MAX_SCOPES)
        ],
        apply_to="all",
    )
    tables = SteeringTables(["a", "b"], ROWS_PER_REQUEST + 1, MAX_SCOPES, 16, torch.device("cpu"))
    tables.admit("r", staggered, 4)
    assert tables.rows_in_use == ROWS_PER_REQUEST
    with pytest.raises(RuntimeError, match="exhausted"):
        tables.admit("s", staggered, 4)
    assert tables.rows_in_use == ROWS_PER_REQUEST and not tables.knows("s")  # nothing taken
    rows, _ = step(tables, ["r"], [12], [0])
    sets = [row_edits(tables, row) for row in rows]
    expected = [
        {("a", i, OP_CODES["add"]) for i in range(MAX_SCOPES) if i <= p < i + 5} for p in range(12)
    ]
    assert sets == expected


def random_scoped_edit(rng, feature: int) -> dict:
    edit = {"sae": ("a", "b")[int(rng.integers(2))], "feature": feature, "op": "set", "value": 1.0}
    if rng.random() < 0.6:
        apply_to = ("generated", "all", "prompt")[int(rng.integers(3))]
        edit["apply_to"] = apply_to
        window = random_window(rng, negative=apply_to == "prompt")
        if window is not None:
            edit["window"] = window
    return edit


@pytest.mark.parametrize("places_on_device", [False, True], ids=["host", "device"])
def test_each_tokens_row_holds_exactly_its_edits_in_scope_through_random_batches(
    places_on_device,
):
    """Specs whose edits have scopes of their own: each token's row holds exactly the edits
    whose Python slice of positions contains it."""

    def draw_spec(rng):
        features = rng.choice(32, size=int(rng.integers(1, 5)), replace=False)
        return scoped_spec(
            *[random_scoped_edit(rng, int(f)) for f in features],
            apply_to=("generated", "all")[int(rng.integers(2))],
        )

    tables = SteeringTables(
        ["a", "b"],
        6 * ROWS_PER_REQUEST,
        4,
        64,
        torch.device("cpu"),
        places_on_device=places_on_device,
    )
    if places_on_device:
        placed_on_device(tables)
    multi_edit_tokens = 0
    batches = random_steps(tables, np.random.default_rng(2), 300, draw_spec)
    for step_index, rows, scope, scheduled in batches:
        for request, positions, tokens in scheduled:
            request_spec = request["spec"]
            for position, row, steered in zip(positions, rows[tokens], scope[tokens], strict=True):
                expected = set()
                for edit in request_spec.edits:
                    edit_scope = request_spec.scope_of(edit)
                    window = edit_scope.window and edit_scope.window.model_dump(exclude_none=True)
                    prompt, apply_to = request["prompt"], edit_scope.apply_to.value
                    if python_slice_mask(apply_to, window, prompt, [position])[0]:
                        expected.add((edit.sae, edit.feature, OP_CODES["set"]))
                assert row_edits(tables, row) == expected, (step_index, position)
                assert steered == bool(expected)
                multi_edit_tokens += len(expected) > 1
    assert multi_edit_tokens > 100
