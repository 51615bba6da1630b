"""The worker's host-side steering bookkeeping alone: one decode step's table write
(`SteeringTables.write_step`) at a batch of decoding requests, a request's admission and
release, and, for engines whose host positions run ahead, the per-layer placement of each
token on the device (`DevicePlacement`, here on the CPU); each timed as the best of several
runs of many calls (no engine, no model)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import report

SIZES = {"a": 512, "b": 512}  # two SAEs of the toy's width
PROMPT_LEN = 8


def edit(feature: int, sae: str = "a", **scope: Any) -> dict[str, Any]:
    return {"sae": sae, "feature": feature, "op": "add", "value": 0.5, **scope}


def spec_of(edits: list[dict[str, Any]]) -> Any:
    from sae_vllm.spec import resolve_spec

    return resolve_spec({"edits": edits}, SIZES)


def staggered_scopes(num_scopes: int, first_feature: int = 0, sae_ids: tuple = ("a",)) -> Any:
    """Two edits per scope, scope i a `generated` window [i, 10**6 + i): two edges each."""
    edits = []
    for scope in range(num_scopes):
        window = {"window": {"start": scope, "end": 10**6 + scope}} if num_scopes > 1 else {}
        for j in range(2):
            sae = sae_ids[(scope + j) % len(sae_ids)]
            edits.append(edit(first_feature + 2 * scope + j, sae, **window))
    return spec_of(edits)


@dataclass(frozen=True)
class StepCase:
    """A decode batch: how many of its requests are steered, their scopes, and whether the
    batch's layout (request order) changes every step, which forces the full write, and
    whether the tables leave placing tokens in their segments to the device."""

    steered_share: float
    scopes: int
    layout_changes: bool
    places_on_device: bool = False


STEP_CASES = {
    "nothing steered": StepCase(0.0, 1, layout_changes=True),
    "all steered, 1 scope, same layout": StepCase(1.0, 1, layout_changes=False),
    "all steered, 1 scope, layout changing": StepCase(1.0, 1, layout_changes=True),
    "half steered, 1 scope, layout changing": StepCase(0.5, 1, layout_changes=True),
    "all steered, 2 scopes, layout changing": StepCase(1.0, 2, layout_changes=True),
    "all steered, 4 scopes, layout changing": StepCase(1.0, 4, layout_changes=True),
    "device placement: all steered, 4 scopes, same layout": StepCase(
        1.0, 4, layout_changes=False, places_on_device=True
    ),
    "device placement: all steered, 4 scopes, layout changing": StepCase(
        1.0, 4, layout_changes=True, places_on_device=True
    ),
}

ADMIT_CASES: dict[str, Callable[[], Any]] = {
    "1 edit": lambda: spec_of([edit(3)]),
    "8 edits": lambda: spec_of([edit(f) for f in range(8)]),
    "8 edits, 2 SAEs, 4 scopes": lambda: staggered_scopes(4, sae_ids=("a", "b")),
}


def best_per_call(run: Callable[[int], None], calls: int, repeats: int) -> list[float]:
    """Microseconds per call of each repeat of `run(calls)`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(calls)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


def new_tables(batch: int, places_on_device: bool = False) -> Any:
    import torch

    from sae_vllm.engine.tables import ROWS_PER_REQUEST, SteeringTables

    return SteeringTables(
        list(SIZES),
        batch * ROWS_PER_REQUEST,
        max_edits=32,
        max_tokens=4 * batch,
        device=torch.device("cpu"),
        places_on_device=places_on_device,
    )


def decode_batch(case: StepCase, batch: int) -> tuple[Any, list[list[str]]]:
    """Tables with the case's `batch` requests admitted, and the request orders its steps take
    in turn."""
    tables = new_tables(batch, case.places_on_device)
    req_ids = [f"r{i}" for i in range(batch)]
    steered = round(case.steered_share * batch)
    for index, req_id in enumerate(req_ids):
        spec = staggered_scopes(case.scopes, index % 64) if index < steered else None
        tables.admit(req_id, spec, PROMPT_LEN)
    return tables, [req_ids, req_ids[::-1]] if case.layout_changes else [req_ids]


def time_steps(case: StepCase, batch: int, calls: int, repeats: int) -> list[float]:
    tables, orders = decode_batch(case, batch)
    one_token = np.ones(batch, dtype=np.int64)
    # positions from the first decode step on, one more each step (built before the clock)
    computed = [np.full(batch, PROMPT_LEN + step, dtype=np.int64) for step in range(calls)]

    def run(steps: int) -> None:
        for step in range(steps):
            tables.write_step(orders[step % len(orders)], one_token, computed[step])

    return best_per_call(run, calls, repeats)


def time_placement(batch: int, calls: int, repeats: int) -> list[float]:
    """One steered layer's placement of a decode step's tokens, all steered with 4 scopes."""
    import torch

    tables, orders = decode_batch(
        StepCase(1.0, 4, layout_changes=False, places_on_device=True), batch
    )
    tables.write_step(orders[0], np.ones(batch, dtype=np.int64), np.zeros(batch, np.int64))
    positions = torch.full((4 * batch,), PROMPT_LEN + 2, dtype=torch.int64)
    placement = tables.device_placement(positions)

    def run(steps: int) -> None:
        for _ in range(steps):
            placement(batch)

    return best_per_call(run, calls, repeats)


def time_admissions(
    make_spec: Callable[[], Any], batch: int, calls: int, repeats: int
) -> list[float]:
    tables = new_tables(batch)
    spec = make_spec()

    def run(cycles: int) -> None:
        for _ in range(cycles):
            tables.admit("r", spec, PROMPT_LEN)
            tables.release("r")

    return best_per_call(run, calls, repeats)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = []
    for name, case in STEP_CASES.items():
        samples = time_steps(case, args.batch, args.calls, args.repeats)
        results[f"write_step: {name}"] = {"us_per_call": samples, "best_us": min(samples)}
        label = f"write_step, batch {args.batch}: {name}"
        rows.append([label, min(samples), report.median(samples)])
    samples = time_placement(args.batch, args.calls, args.repeats)
    results["device placement, per steered layer"] = {
        "us_per_call": samples,
        "best_us": min(samples),
    }
    label = f"DevicePlacement, batch {args.batch}, per steered layer"
    rows.append([label, min(samples), report.median(samples)])
    for name, make_spec in ADMIT_CASES.items():
        samples = time_admissions(make_spec, args.batch, args.calls, args.repeats)
        results[f"admit + release: {name}"] = {"us_per_call": samples, "best_us": min(samples)}
        rows.append([f"admit + release: {name}", min(samples), report.median(samples)])
    table = report.markdown_table(["case", "µs per call (best)", "µs per call (median)"], rows)
    return {
        "machine": report.machine(),
        "config": {
            "batch": args.batch,
            "calls": args.calls,
            "repeats": args.repeats,
            "saes": SIZES,
            "prompt_len": PROMPT_LEN,
            "device": "cpu",
            "edits": "add; two edits a scope; scope i of n > 1: a generated window [i, 10**6 + i)",
            "timing": "per call, over `calls` calls; best and median of `repeats` runs",
        },
        "results": results,
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tables", description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "tables.json")
    args = parser.parse_args(argv)
    report.publish("tables", run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
