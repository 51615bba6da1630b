"""The table benchmark's cases steer what they are named for, and the suite reports each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import tables as bench_tables
from sae_vllm.engine.tables import NO_ROW


@pytest.mark.parametrize("name", list(bench_tables.STEP_CASES))
def test_each_decode_batch_steers_the_share_and_scopes_it_is_named_for(name):
    case = bench_tables.STEP_CASES[name]
    batch = 8
    tables, orders = bench_tables.decode_batch(case, batch)
    assert len(orders) == (2 if case.layout_changes else 1) and len(set(orders[0])) == batch
    computed = np.full(batch, bench_tables.PROMPT_LEN + 3)  # a decode step in every window
    tables.write_step(orders[0], np.ones(batch, np.int64), computed)
    rows = tables.tok_row[:batch]
    if case.places_on_device:
        positions = torch.from_numpy(computed).to(torch.int64)
        rows, _ = tables.device_placement(positions)(batch)
    steered_tokens = int((rows != NO_ROW).sum())
    assert steered_tokens == round(case.steered_share * batch)
    assert len(bench_tables.staggered_scopes(case.scopes).scopes()) == case.scopes


def test_admission_cases_hold_the_edits_saes_and_scopes_they_name():
    one, eight, spread = (make() for make in bench_tables.ADMIT_CASES.values())
    assert (len(one.edits), len(eight.edits), len(spread.edits)) == (1, 8, 8)
    assert {edit.sae for edit in spread.edits} == {"a", "b"} and len(spread.scopes()) == 4


def test_the_suite_reports_every_case(tmp_path, capsys):
    out = tmp_path / "tables.json"
    assert (
        bench_tables.main(["--batch", "8", "--calls", "3", "--repeats", "2", "--out", str(out)])
        == 0
    )
    results = json.loads(out.read_text())["results"]
    placement = ["device placement, per steered layer"]
    assert list(results) == [
        *(f"write_step: {name}" for name in bench_tables.STEP_CASES),
        *placement,
        *(f"admit + release: {name}" for name in bench_tables.ADMIT_CASES),
    ]
    assert all(len(r["us_per_call"]) == 2 and r["best_us"] > 0 for r in results.values())
    assert "admit + release: 8 edits" in capsys.readouterr().out
