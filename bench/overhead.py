"""Offline engine throughput with and without steering, variants interleaved in one run.

Axes: plugin absent / loaded but idle / steered share / distinct specs per batch / edits per
request / scopes per spec / output length / eager vs compiled. Each variant's median throughput
is reported as a ratio to the same-mode "absent" baseline measured in the same run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_vllm import cpu_amx

from . import report


@dataclass
class Variant:
    """One measured configuration: which engine, and how its batch's requests are steered."""

    name: str
    axis: str
    axis_value: Any
    engine: str  # key into the engines dict: "<mode>-absent" or "<mode>-plugin"
    steered_share: float = 0.0
    distinct_specs: int = 1
    edits: int = 1
    scopes: int = 1  # the edits split among this many windows of the generated tokens
    output_len: int = 32
    samples: list[float] = field(default_factory=list)


def default_model() -> tuple[str, str, int, int]:
    """The embedded default model and SAE: (model dir, SAE dir, layer, d_sae)."""
    from sae_vllm import load_sae
    from sae_vllm.toy.build import ensure_built

    toy = ensure_built()
    return str(toy.model_dir), str(toy.sae_dir), toy.layer, load_sae(toy.sae_dir).d_sae


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --sae and --layer, read by model_from_args."""
    parser.add_argument("--model", help="model dir (default: the embedded toy model)")
    parser.add_argument("--sae", help="SAE dir (with --model)")
    parser.add_argument("--layer", type=int, help="SAE layer (with --model)")


def model_from_args(args: argparse.Namespace) -> tuple[str, str, int, int]:
    """The model and SAE given by --model, --sae and --layer, or else the embedded default:
    (model dir, SAE dir, layer, d_sae)."""
    if not args.model:
        return default_model()
    from sae_vllm import load_sae

    return args.model, args.sae, args.layer, load_sae(args.sae).d_sae


BENCH_SAE_ID = "bench"  # the id every benchmark registers its SAE under


@dataclass(frozen=True)
class SteeredEngine:
    """An engine with the plugin, steering one SAE (BENCH_SAE_ID), and what it was built from."""

    llm: Any
    config: dict[str, Any]  # its additional_config
    model: str
    sae: str
    layer: int
    d_sae: int


def steered_engine(args: argparse.Namespace, **engine_settings: Any) -> SteeredEngine:
    """The model and SAE of model_from_args in one engine with the plugin, eager unless
    `args.compiled`, seed 0; `engine_settings` are the benchmark's own LLM(...) arguments."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from sae_vllm import steering_config

    model, sae, layer, d_sae = model_from_args(args)
    config = steering_config([{"id": BENCH_SAE_ID, "path": sae, "layer": layer}])
    llm = LLM(
        model=model,
        enforce_eager=not args.compiled,
        seed=0,
        additional_config=config,
        **engine_settings,
    )
    return SteeredEngine(llm, config, model, sae, layer, d_sae)


def build_variants(modes: list[str], batch: int, quick: bool) -> list[Variant]:
    variants: list[Variant] = []
    for mode in modes:
        variants += [
            Variant(f"{mode}/absent", "plugin", "absent", f"{mode}-absent"),
            Variant(f"{mode}/idle", "plugin", "idle", f"{mode}-plugin"),
        ]
        shares = [0.5, 1.0]
        distinct = [1, batch] if quick else [1, 4, batch]
        edits = [1, 8] if quick else [1, 8, 32]
        scopes = [1, 4] if quick else [1, 2, 4]
        lengths = [] if quick else [8, 128]
        for share in shares:
            variants.append(
                Variant(
                    f"{mode}/share{share:.0%}",
                    "steered share",
                    share,
                    f"{mode}-plugin",
                    steered_share=share,
                    distinct_specs=batch,
                )
            )
        for count in distinct:
            variants.append(
                Variant(
                    f"{mode}/distinct{count}",
                    "distinct specs",
                    count,
                    f"{mode}-plugin",
                    steered_share=1.0,
                    distinct_specs=count,
                )
            )
        for k in edits:
            variants.append(
                Variant(
                    f"{mode}/K{k}",
                    "edits per request",
                    k,
                    f"{mode}-plugin",
                    steered_share=1.0,
                    distinct_specs=batch,
                    edits=k,
                )
            )
        for count in scopes:
            variants.append(
                Variant(
                    f"{mode}/scopes{count}",
                    "scopes per spec (K=8)",
                    count,
                    f"{mode}-plugin",
                    steered_share=1.0,
                    distinct_specs=batch,
                    edits=8,
                    scopes=count,
                )
            )
        for length in lengths:
            variants.append(
                Variant(
                    f"{mode}/absent-len{length}",
                    "output length (absent)",
                    length,
                    f"{mode}-absent",
                    output_len=length,
                )
            )
            variants.append(
                Variant(
                    f"{mode}/len{length}",
                    "output length",
                    length,
                    f"{mode}-plugin",
                    steered_share=1.0,
                    distinct_specs=batch,
                    output_len=length,
                )
            )
    return variants


def make_requests(variant: Variant, batch: int, d_sae: int, sae_id: str, prompts: list[list[int]]):
    from vllm import SamplingParams

    requests = []
    steered = round(variant.steered_share * batch)
    for i in range(batch):
        params: dict[str, Any] = {
            "temperature": 0.0,
            "max_tokens": variant.output_len,
            "ignore_eos": True,
        }
        if i < steered:
            spec_index = i % variant.distinct_specs
            edits = [
                {
                    "sae": sae_id,
                    "feature": (spec_index * variant.edits + j) % d_sae,
                    "op": "add",
                    "value": 0.5,
                }
                | scope_window(j % variant.scopes, variant.scopes)
                for j in range(variant.edits)
            ]
            params["extra_args"] = {"sae_steering": {"edits": edits}}
        requests.append(({"prompt_token_ids": prompts[i % len(prompts)]}, SamplingParams(**params)))
    return requests


def scope_window(scope: int, scopes: int) -> dict[str, Any]:
    """The window of an edit in the scope-th of `scopes` scopes (none when there is one):
    overlapping, their edges spread over the first 32 generated tokens, so that most decode
    steps still have an edge ahead and rewrite the step's token rows."""
    if scopes == 1:
        return {}
    return {"window": {"start": 4 * scope, "end": 24 + 2 * scope}}


def start_engines(
    modes: list[str], model: str, sae: str, layer: int, max_edits: int, batch: int
) -> dict[str, Any]:
    """Plugin engines first: vLLM loads plugins once per process, at the first engine."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from sae_vllm import steering_config

    config = steering_config(
        [{"id": BENCH_SAE_ID, "path": sae, "layer": layer}], max_edits=max_edits
    )
    common = {"model": model, "max_model_len": 128, "max_num_seqs": batch, "seed": 0}
    engines: dict[str, Any] = {}
    for mode in modes:
        print(f"starting {mode} engine with the plugin ...", flush=True)
        engines[f"{mode}-plugin"] = LLM(
            **common, enforce_eager=mode == "eager", additional_config=config
        )
    for mode in modes:
        print(f"starting {mode} engine without the plugin ...", flush=True)
        # Inherited by the new engine's processes only; vllm-cpu needs the AMX request.
        os.environ["VLLM_PLUGINS"] = cpu_amx.PLUGIN_NAME
        try:
            engines[f"{mode}-absent"] = LLM(**common, enforce_eager=mode == "eager")
        finally:
            del os.environ["VLLM_PLUGINS"]
    return engines


# vLLM's shared-memory queue readers spin for 1 s after their last message, and every engine's
# worker is bound to the same core: switching engines without a pause measures the next engine
# while the previous one still spins beside it.
_SPIN_SECONDS = 1.1
_last_engine: list[Any] = [None]


def settle(llm: Any) -> None:
    """Wait out the previous engine's spin when the next measurement uses another engine."""
    if _last_engine[0] is not None and _last_engine[0] is not llm:
        time.sleep(_SPIN_SECONDS)
    _last_engine[0] = llm


def measure(llm: Any, requests: list) -> float:
    """Output tokens per second for one batch."""
    settle(llm)
    prompts = [prompt for prompt, _ in requests]
    params = [p for _, p in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def run(args: argparse.Namespace, progress: Callable[[str], None] = print) -> dict[str, Any]:
    model, sae, layer, d_sae = model_from_args(args)
    modes = ["eager"] if args.eager_only else ["eager", "compiled"]
    variants = build_variants(modes, args.batch, args.quick)
    engines = start_engines(modes, model, sae, layer, max(32, args.batch), args.batch)
    prompts = [[1, *[(7 * i + j) % 50 + 4 for j in range(args.prompt_len)]] for i in range(8)]
    for variant in variants:  # warm-up, untimed
        measure(
            engines[variant.engine],
            make_requests(variant, args.batch, d_sae, BENCH_SAE_ID, prompts),
        )
    for repeat in range(args.repeats):
        for variant in variants:  # interleaved: A B C ... A B C ...
            requests = make_requests(variant, args.batch, d_sae, BENCH_SAE_ID, prompts)
            variant.samples.append(measure(engines[variant.engine], requests))
        progress(f"repeat {repeat + 1}/{args.repeats} done")
    rows, results = [], []
    for variant in variants:
        mode = variant.name.split("/")[0]
        base_name = (
            f"{mode}/absent"
            if variant.output_len == 32
            else f"{mode}/absent-len{variant.output_len}"
        )
        base = next(v for v in variants if v.name == base_name)
        ratio = report.median(variant.samples) / report.median(base.samples)
        rows.append(
            [variant.name, variant.axis, variant.axis_value, report.median(variant.samples), ratio]
        )
        results.append(
            {
                **{k: v for k, v in vars(variant).items()},
                "median_tok_s": report.median(variant.samples),
                "ratio_to_absent": ratio,
            }
        )
    table = report.markdown_table(
        ["variant", "axis", "value", "median output tok/s", "ratio to absent"], rows
    )
    return {
        "machine": report.machine(),
        "config": {
            "model": model,
            "sae": sae,
            "layer": layer,
            "d_sae": d_sae,
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "repeats": args.repeats,
            "modes": modes,
        },
        "variants": results,
        "table": table,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled engines")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "overhead.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    path = report.write_results("overhead", result, result["table"], args.out)
    axes: dict[str, tuple[list[Any], list[float]]] = {}
    for variant in result["variants"]:
        if variant["axis"] != "plugin" or variant["axis_value"] == "idle":
            xs, ys = axes.setdefault(
                f"{variant['name'].split('/')[0]}: {variant['axis']}", ([], [])
            )
            xs.append(variant["axis_value"])
            ys.append(variant["ratio_to_absent"])
    report.plot_ratios(path.with_suffix(".png"), "sae-vllm steering overhead (offline)", axes)
    print(result["table"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
