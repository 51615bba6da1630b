"""Steered requests on a shared prompt prefix: how much of the prompt the prefix cache serves,
and the time to serve a batch, steered vs unsteered, variants interleaved on one engine.

Each sample: the prefix cache is reset and warmed with the shared prefix by one unsteered
request (as a server with a common system prompt holds it), then a batch of requests, each the
prefix plus a suffix of its own, runs to its first tokens. `generated`-scoped requests can share
the prefix's KV blocks with unsteered traffic; `all`-scoped ones steer the prefix itself, so
they must compute it: the cost every steered request paid before they could share. `prompt`
with a window over the request's own suffix steers its prompt but not the shared prefix."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report
from .overhead import BENCH_SAE_ID, add_model_args, steered_engine


@dataclass(frozen=True)
class Workload:
    """The shared prefix, what each request adds to it, and how many of them."""

    prefix_len: int = 112
    suffix_len: int = 8
    output_len: int = 1
    batch: int = 16


def variants(workload: Workload) -> dict[str, dict[str, Any] | None]:
    """Each variant's name and the scope fields of its specs (None: unsteered)."""
    return {
        "unsteered": None,
        "steered generated": {"apply_to": "generated"},
        "steered all": {"apply_to": "all"},
        "steered own suffix": {"apply_to": "prompt", "window": {"start": -workload.suffix_len}},
    }


def make_batch(workload: Workload, scope: dict[str, Any] | None, sae_id: str, d_sae: int) -> list:
    """`batch` requests: the prefix, a suffix of their own, each steered by its own spec."""
    from vllm import SamplingParams

    prefix, requests = prefix_tokens(workload), []
    for i in range(workload.batch):
        suffix = [(11 * i + 3 * j) % 40 + 4 for j in range(workload.suffix_len)]
        params: dict[str, Any] = {
            "temperature": 0.0,
            "max_tokens": workload.output_len,
            "ignore_eos": True,
        }
        if scope is not None:
            edit = {"sae": sae_id, "feature": (37 * i) % d_sae, "op": "add", "value": 0.5}
            params["extra_args"] = {"sae_steering": {"edits": [edit], **scope}}
        requests.append(({"prompt_token_ids": prefix + suffix}, SamplingParams(**params)))
    return requests


def prefix_tokens(workload: Workload) -> list[int]:
    return [1, *[(7 * j) % 50 + 4 for j in range(workload.prefix_len - 1)]]


def measure(llm: Any, prefix: list[int], requests: list) -> tuple[float, float]:
    """(seconds for the batch, share of its prompt tokens served from the prefix cache), on a
    cache that holds the prefix alone."""
    from vllm import SamplingParams

    assert llm.reset_prefix_cache()
    warm = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([{"prompt_token_ids": prefix}], warm, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(
        [prompt for prompt, _ in requests], [params for _, params in requests], use_tqdm=False
    )
    elapsed = time.perf_counter() - start
    cached = sum(o.num_cached_tokens for o in outputs)
    return elapsed, cached / sum(len(o.prompt_token_ids) for o in outputs)


def measure_variants(
    llm: Any, workload: Workload, sae_id: str, d_sae: int, repeats: int, progress=print
) -> dict[str, dict[str, list[float]]]:
    """Per variant, each repeat's batch seconds and cached prompt share, variants interleaved
    (after one untimed warm-up of each)."""
    batches = {
        name: make_batch(workload, scope, sae_id, d_sae)
        for name, scope in variants(workload).items()
    }
    samples: dict[str, dict[str, list[float]]] = {
        name: {"seconds": [], "cached_share": []} for name in batches
    }
    prefix = prefix_tokens(workload)
    for name in batches:
        measure(llm, prefix, batches[name])
    for repeat in range(repeats):
        for name in batches:
            elapsed, share = measure(llm, prefix, batches[name])
            samples[name]["seconds"].append(elapsed)
            samples[name]["cached_share"].append(share)
        progress(f"repeat {repeat + 1}/{repeats}")
    return samples


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = steered_engine(
        args,
        max_model_len=args.max_model_len,
        max_num_seqs=args.batch,
        block_size=args.block_size,
        enable_prefix_caching=True,
    )
    workload = Workload(args.prefix_len, args.suffix_len, args.output_len, args.batch)
    samples = measure_variants(engine.llm, workload, BENCH_SAE_ID, engine.d_sae, args.repeats)
    unsteered = samples["unsteered"]["seconds"]
    rows, results = [], {}
    for name, sample in samples.items():
        median_ms = report.median(sample["seconds"]) * 1e3
        ratio = report.median([s / u for s, u in zip(sample["seconds"], unsteered, strict=True)])
        rows.append([name, report.median(sample["cached_share"]), median_ms, ratio])
        results[name] = {**sample, "median_ms": median_ms, "time_ratio": ratio}
    table = report.markdown_table(
        ["variant", "prompt share from cache", "batch ms (median)", "time / unsteered"], rows
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
            "block_size": args.block_size,
            "batch": args.batch,
            "prefix_len": args.prefix_len,
            "suffix_len": args.suffix_len,
            "output_len": args.output_len,
            "repeats": args.repeats,
            "ratio": "median over repeats of the variant's batch time / the unsteered batch "
            "time of the same repeat",
        },
        "results": results,
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench prefix_cache", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32)  # the CPU backend: multiples of 32
    parser.add_argument("--prefix-len", type=int, default=Workload.prefix_len)
    parser.add_argument("--suffix-len", type=int, default=Workload.suffix_len)
    parser.add_argument("--output-len", type=int, default=Workload.output_len)
    parser.add_argument("--batch", type=int, default=Workload.batch)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--compiled", action="store_true", help="torch.compile'd engine")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "prefix_cache.json")
    args = parser.parse_args(argv)
    report.publish("prefix_cache", run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
