"""Serving latency through the HTTP server (TTFT, time per output token, end-to-end),
steered vs unsteered, at several concurrencies, interleaved in one run."""

# Starts `sae-vllm serve` (the embedded default model unless --model is given), streams
# completions of a fixed length (ignore_eos) and times each request on the client.

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report

VARIANTS = ("unsteered", "steered")
METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass
class Sample:
    """One request's timings, in milliseconds, as the client saw them."""

    concurrency: int
    variant: str
    round: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    tokens: int
    chunks: int  # streamed chunks with text: fewer than tokens when outputs coalesce


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__)
    parser.add_argument("--model", help="model to serve (default: the embedded default model)")
    parser.add_argument("--sae", action="append", default=[], metavar="ID=PATH[@LAYER]",
                        help="SAE to serve with --model (repeatable)")  # fmt: skip
    parser.add_argument("--sae-id", help="SAE the steered requests edit (default: the first)")
    parser.add_argument("--feature", type=int, help="feature the steered requests set")
    parser.add_argument("--value", type=float, help="value the feature is set to")
    parser.add_argument("--prompt", default="i think that")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=32,
                        help="at least this many samples per (concurrency, variant)")  # fmt: skip
    parser.add_argument("--min-rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds per cell")
    parser.add_argument("--enforce-eager", action="store_true", help="serve without compile")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra `sae-vllm serve` argument (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR / "latency.json")
    return parser.parse_args(argv)


def steering_target(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The server arguments and the steered requests' spec."""
    if args.model is None:
        from sae_vllm.toy.build import ensure_built

        toy = ensure_built()
        topic, info = next(iter(toy.topics.items()))
        feature = args.feature if args.feature is not None else info["feature"]
        value = args.value if args.value is not None else info["steering_value"]
        sae_id, serve_args = toy.sae_id, []
        print(f"steering the embedded model toward '{topic}': feature {feature} = {value:.2f}")
    else:
        if not args.sae or args.feature is None or args.value is None:
            raise SystemExit("with --model, give --sae, --feature and --value")
        sae_id = args.sae_id or args.sae[0].split("=", 1)[0]
        feature, value = args.feature, args.value
        serve_args = [args.model] + [a for sae in args.sae for a in ("--sae", sae)]
    spec = {"edits": [{"sae": sae_id, "feature": feature, "op": "set", "value": value}]}
    serve_args += ["--disable-uvicorn-access-log"]
    if args.enforce_eager:
        serve_args.append("--enforce-eager")
    return serve_args + args.server_arg, spec


async def timed_request(client: Any, body: dict[str, Any]) -> tuple[float, float, float, int, int]:
    """(ttft, tpot, e2e) in ms, output tokens and text chunks of one streamed completion.

    TPOT is (e2e - ttft) / (tokens - 1), the usual definition (vLLM's bench uses it)."""
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices") or ()):
                chunks += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the server streamed no text")
    tpot = (end - first) / (tokens - 1) if tokens > 1 else math.nan
    return (first - start) * 1e3, tpot * 1e3, (end - start) * 1e3, tokens, chunks


async def measure(base_url: str, args: argparse.Namespace, spec: dict) -> list[Sample]:
    import httpx

    limits = httpx.Limits(max_connections=max(args.concurrency) * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        base = {
            "model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        bodies = {"unsteered": base, "steered": base | {"steering": spec}}

        async def batch(concurrency: int, variant: str) -> list[tuple]:
            jobs = (timed_request(client, bodies[variant]) for _ in range(concurrency))
            return await asyncio.gather(*jobs)

        for concurrency in args.concurrency:
            for _ in range(args.warmup):
                for variant in VARIANTS:
                    await batch(concurrency, variant)
        rounds = {c: max(args.min_rounds, math.ceil(args.requests / c)) for c in args.concurrency}
        samples: list[Sample] = []
        for round_index in range(max(rounds.values())):
            for concurrency in args.concurrency:
                if round_index >= rounds[concurrency]:
                    continue
                order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    for timing in await batch(concurrency, variant):
                        samples.append(Sample(concurrency, variant, round_index, *timing))
        return samples


def summarize(samples: list[Sample], levels: list[int]) -> dict[str, Any]:
    """Per concurrency and variant: p50/p95 of each metric; per concurrency: steered/unsteered
    ratios of the p50s."""
    cells: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for concurrency in levels:
        for variant in VARIANTS:
            chosen = [s for s in samples if s.concurrency == concurrency and s.variant == variant]
            cell: dict[str, Any] = {
                "n": len(chosen),
                "chunks_per_request": report.median([s.chunks for s in chosen]),
            }
            for metric in METRICS:
                values = [getattr(s, metric) for s in chosen if not math.isnan(getattr(s, metric))]
                cell[metric] = {
                    "p50": report.median(values),
                    "p95": report.percentile(values, 95),
                }
            cells[f"{concurrency}/{variant}"] = cell
        ratios[str(concurrency)] = {
            metric: cells[f"{concurrency}/steered"][metric]["p50"]
            / cells[f"{concurrency}/unsteered"][metric]["p50"]
            for metric in METRICS
        }
    return {"cells": cells, "ratios_p50": ratios}


def table(summary: dict[str, Any], levels: list[int]) -> str:
    headers = ["concurrency", "variant", "n", "chunks/req", "TTFT p50 ms", "TTFT p95 ms",
               "TPOT p50 ms", "TPOT p95 ms", "E2E p50 ms", "E2E p95 ms"]  # fmt: skip
    rows: list[list[Any]] = []
    for concurrency in levels:
        for variant in VARIANTS:
            cell = summary["cells"][f"{concurrency}/{variant}"]
            row: list[Any] = [concurrency, variant, cell["n"], cell["chunks_per_request"]]
            for metric in METRICS:
                row += [cell[metric]["p50"], cell[metric]["p95"]]
            rows.append(row)
        ratio = summary["ratios_p50"][str(concurrency)]
        rows.append([concurrency, "**steered / unsteered (p50)**", "", ""]
                    + [x for m in METRICS for x in (f"**{ratio[m]:.3f}×**", "")])  # fmt: skip
    return report.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sae_vllm.server.process import ServerProcess

    serve_args, spec = steering_target(args)
    log_path = args.out.with_name(args.out.stem + "-server.log")
    started = time.perf_counter()
    with ServerProcess(serve_args, log_path) as server:
        print(f"server up in {time.perf_counter() - started:.0f} s; measuring...")
        samples = asyncio.run(measure(server.base_url, args, spec))
    summary = summarize(samples, args.concurrency)
    text = table(summary, args.concurrency)
    payload = {
        "suite": "latency",
        "machine": report.machine(),
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "serve_args": serve_args,
            "steering": spec,
            "variants": list(VARIANTS),
            "interleaving": "per round: every concurrency, variants alternating order",
        },
        "samples": [asdict(sample) for sample in samples],
        "summary": summary,
    }
    path = report.write_results("latency", payload, text, args.out)
    print(text)
    print(f"\nwrote {path}")
    return 0
