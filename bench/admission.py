"""What steering adds per request: batches of one-token requests on one engine, unsteered vs
steered, variants interleaved.

With one output token, a batch is one prefill step plus the work done once per request (vLLM's
own, and steering's: the spec checked in the frontend, the engine core and the worker, the
worker's table row), so what a steered request adds shows as time per request. "repeated"
specs are the same in every batch (each process answers them from memory after the first),
"fresh" ones are new in every batch (each process resolves each). Specs come from
`steering_params` (built before the clock starts; that cost is reported apart) or, "by hand",
as a dict in `extra_args`."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report
from .overhead import BENCH_SAE_ID, add_model_args, steered_engine


@dataclass(frozen=True)
class SAE:
    """The SAE the requests edit: its id in the engine's config and its feature count."""

    id: str
    d_sae: int


@dataclass(frozen=True)
class Steering:
    """How a variant's requests are steered: edits each, new specs every batch, how passed."""

    edits: int
    fresh: bool
    by_hand: bool = False


VARIANTS: dict[str, Steering | None] = {
    "unsteered": None,
    "K=1 repeated": Steering(1, fresh=False),
    "K=1 fresh": Steering(1, fresh=True),
    "K=8 repeated": Steering(8, fresh=False),
    "K=8 fresh": Steering(8, fresh=True),
    "K=8 fresh, by hand": Steering(8, fresh=True, by_hand=True),
}


def make_batch(
    steering: Steering | None, batch: int, batch_index: int, config: dict[str, Any], sae: SAE
) -> tuple[list[Any], float]:
    """`batch` SamplingParams, one spec each (distinct within the batch and, when fresh, from
    every earlier batch), and the seconds it took to build them."""
    from vllm import SamplingParams

    from sae_vllm import steering_params

    start = time.perf_counter()
    if steering is None:
        params = [SamplingParams(temperature=0.0, max_tokens=1)] * batch
        return params, time.perf_counter() - start
    params = []
    for i in range(batch):
        value = 0.5 + ((batch_index * batch + i) * 1e-6 if steering.fresh else 0.0)
        edits = [
            {
                "sae": sae.id,
                "feature": (i * steering.edits + j) % sae.d_sae,
                "op": "add",
                "value": value,
            }
            for j in range(steering.edits)
        ]
        if steering.by_hand:
            extra_args = {"sae_steering": {"edits": edits}}
            params.append(SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra_args))
        else:
            spec = {"edits": edits}
            params.append(steering_params(spec, config=config, temperature=0.0, max_tokens=1))
    return params, time.perf_counter() - start


def prompts(batch: int, prompt_len: int) -> list[dict[str, list[int]]]:
    return [
        {"prompt_token_ids": [1, *[(7 * i + 3 * j) % 50 + 4 for j in range(prompt_len - 1)]]}
        for i in range(batch)
    ]


def measure_variants(
    llm: Any,
    config: dict[str, Any],
    sae: SAE,
    batch: int,
    prompt_len: int,
    repeats: int,
    progress=print,
) -> dict[str, dict[str, list[float]]]:
    """Per variant, each repeat's batch seconds and seconds spent building its params, variants
    interleaved in an order that rotates between repeats (after one untimed batch of each)."""
    requests = prompts(batch, prompt_len)
    samples = {name: {"seconds": [], "build_seconds": []} for name in VARIANTS}
    names = list(VARIANTS)
    for repeat in range(-1, repeats):
        # Each repeat starts one variant later: a batch right after an unsteered one measured
        # up to 0.2 ms per request slower, whichever variant it was.
        shift = max(repeat, 0) % len(names)
        for name in names[shift:] + names[:shift]:
            steering = VARIANTS[name]
            params, build_seconds = make_batch(steering, batch, repeat + 1, config, sae)
            gc.collect()  # the garbage of building the params is not the batch's to collect
            start = time.perf_counter()
            llm.generate(requests, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            if repeat >= 0:
                samples[name]["seconds"].append(elapsed)
                samples[name]["build_seconds"].append(build_seconds)
        if repeat >= 0:
            progress(f"repeat {repeat + 1}/{repeats}")
    return samples


def summarise(samples: dict[str, dict[str, list[float]]], batch: int) -> dict[str, Any]:
    """Each variant's median batch time, its time over the same repeat's unsteered batch, and
    what it adds per request (median over repeats of the paired difference)."""
    unsteered = samples["unsteered"]["seconds"]
    results = {}
    for name, sample in samples.items():
        pairs = list(zip(sample["seconds"], unsteered, strict=True))
        results[name] = {
            **sample,
            "median_ms": report.median(sample["seconds"]) * 1e3,
            "time_ratio": report.median([s / u for s, u in pairs]),
            "added_us_per_request": report.median([s - u for s, u in pairs]) / batch * 1e6,
            "build_us_per_request": report.median(sample["build_seconds"]) / batch * 1e6,
        }
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = steered_engine(
        args,
        max_model_len=128,
        max_num_seqs=args.batch,
        enable_prefix_caching=False,  # the same prompts every batch: nothing may come cached
    )
    sae = SAE(BENCH_SAE_ID, engine.d_sae)
    samples = measure_variants(
        engine.llm, engine.config, sae, args.batch, args.prompt_len, args.repeats
    )
    results = summarise(samples, args.batch)
    rows = [
        [
            name,
            result["median_ms"],
            result["time_ratio"],
            result["added_us_per_request"],
            result["build_us_per_request"],
        ]
        for name, result in results.items()
    ]
    table = report.markdown_table(
        [
            "variant",
            "batch ms (median)",
            "time / unsteered",
            "added µs / request",
            "params built, µs / request",
        ],
        rows,
    )
    return {
        "machine": report.machine(),
        "config": {
            "model": engine.model,
            "sae": engine.sae,
            "layer": engine.layer,
            "d_sae": engine.d_sae,
            "engine": "compiled" if args.compiled else "eager",
            "dtype": str(engine.llm.llm_engine.model_config.dtype),
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "output_len": 1,
            "prefix_caching": False,
            "repeats": args.repeats,
            "ratio": "median over repeats of the variant's batch time / the unsteered batch "
            "time of the same repeat; added = the same for the difference, per request",
        },
        "results": results,
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench admission", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=18)  # each variant 3 times in each place
    parser.add_argument("--compiled", action="store_true", help="torch.compile'd engine")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "admission.json")
    args = parser.parse_args(argv)
    report.publish("admission", run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
