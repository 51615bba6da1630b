"""Kernel benchmark: time per call of the steering op, its bandwidth and its share of a decode step.

Every token is steered with its own row (distinct features). Reported per config: median time
per call; achieved bytes/s over the bytes the op must move (gathered weight rows, or the whole
encoder for TopK, plus hidden and residual read and hidden written; hidden is the float32
working copy the steered layer hands the op, whose cast inductor fuses into the neighbouring
kernels and is not timed here) against the device's copy bandwidth measured in the same run; and
the call's time as a share of a decode-step proxy, the dense GEMMs of one Llama-3.1-8B step at
the same token count, also measured in the same run. On CUDA the Triton kernels run (L2 flushed
before each call); on CPU the op's CPU path does, as in a CPU engine (kernels/cpu_decode.py: a
compiled loop for float32 and bfloat16, numpy for float16, the torch reference for TopK).

Also timed: each steered layer's placement of a step's tokens on the device, which engines whose
host positions run ahead (async scheduling with speculative decoding) add before the op
(sae_vllm/engine/device_placement.py): called eagerly, and on CUDA replayed from a CUDA graph."""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_vllm.engine.device_placement import DevicePlacement

from . import report

try:
    from sae_vllm.kernels import SET, SteeringWeights
except ImportError:  # bare checkout on PYTHONPATH (GPU box without the package installed)
    from kernels import SET, SteeringWeights

D_INS = (2304, 3584, 4096)
D_SAES = (16384, 65536, 131072)
TOKENS = (1, 8, 64, 256, 1024)
SLOTS = (1, 8, 32)
TOPK_K = 64
# Llama-3.1-8B: 32 layers of (qkv, o, gate_up, down) as (in, out) features.
LLAMA_LAYERS = 32
LLAMA_GEMMS = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))


@dataclass
class Config:
    path: str  # "sparse" (ReLU / JumpReLU) or "topk"
    d_in: int
    d_sae: int
    tokens: int
    slots: int
    samples_s: list[float] = field(default_factory=list)
    bytes_moved: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def configs(quick: bool) -> list[Config]:
    if quick:
        sparse = [Config("sparse", 2304, 16384, t, k) for t in (1, 8, 64, 256) for k in SLOTS]
        return sparse + [Config("topk", 2304, 16384, t, 8) for t in (1, 8, 64)]
    grid = list(itertools.product(D_INS, D_SAES, TOKENS))
    sparse = [Config("sparse", d, f, t, k) for d, f, t in grid for k in SLOTS]
    return sparse + [Config("topk", d, f, t, 8) for d, f, t in grid]


class Timer:
    """Times a callable: CUDA events with the L2 flushed before each call, or perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = None
        if device.type == "cuda":
            self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)

    def samples(self, fn: Callable[[], None], n: int, warmup: int = 2) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(n):
            if self.flush is not None:
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                out.append(time.perf_counter() - begin)
        return out


def copy_bandwidth(timer: Timer, device: torch.device, n: int) -> list[float]:
    """Bytes/s of a large tensor copy (read + write counted)."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return [2 * size / s for s in timer.samples(lambda: dst.copy_(src), n)]


def step_proxy(timer: Timer, device: torch.device, dtype: torch.dtype, tokens: int, n: int):
    """Seconds of the dense GEMMs of one Llama-3.1-8B decode step at `tokens` tokens. On CUDA
    all 32 layers run (one set of weights, far larger than L2); on CPU one layer is timed and
    scaled by 32 to keep the run short."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [
        torch.randn(out, inp, generator=gen, device=device, dtype=dtype) * 0.02
        for inp, out in LLAMA_GEMMS
    ]
    x = torch.randn(tokens, 4096, generator=gen, device=device, dtype=dtype)
    act = torch.randn(tokens, 14336, generator=gen, device=device, dtype=dtype)
    layers = LLAMA_LAYERS if device.type == "cuda" else 1

    def run() -> None:
        for _ in range(layers):
            for w, inp in zip(weights, (x, x, x, act), strict=True):
                torch.nn.functional.linear(inp, w)

    return [s * LLAMA_LAYERS / layers for s in timer.samples(run, n, warmup=1)]


PLACEMENT_ROWS = 2 * 256 * 7  # the worker's rows at 256 sequences of 4 scopes each
PLACEMENT_EDGES = 8


def placement_samples(
    timer: Timer, device: torch.device, tokens: int, n: int
) -> dict[str, list[float]]:
    """Seconds per placement of `tokens` tokens, each of a random request with four scopes:
    called eagerly, and on CUDA replayed from a CUDA graph captured once."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    shape = (PLACEMENT_ROWS + 1, PLACEMENT_EDGES)
    edges = torch.randint(0, 4096, shape, generator=gen, device=device).sort(dim=1).values
    rows = torch.randint(-1, PLACEMENT_ROWS, (shape[0], shape[1] + 1), generator=gen, device=device)
    first = torch.randint(0, PLACEMENT_ROWS, (tokens,), generator=gen, device=device)
    positions = torch.randint(0, 4096, (tokens,), generator=gen, device=device)
    placement = DevicePlacement(positions, first.to(torch.int32), edges, rows.to(torch.int32))
    samples = {"eager": timer.samples(lambda: placement(tokens), n)}
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, as capture requires
            placement(tokens)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            placement(tokens)
        samples["cuda_graph"] = timer.samples(graph.replay, n)
    return samples


class Problem:
    """Random SAE weights of one shape, with edit tables and activations for a token count."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator(device=device).manual_seed(d_in + d_sae)
        self.device, self.dtype, self.gen = device, dtype, gen
        scale = d_in**-0.5
        enc_t = torch.randn(d_sae, d_in, generator=gen, device=device, dtype=dtype) * scale
        dec = torch.randn(d_sae, d_in, generator=gen, device=device, dtype=dtype) * scale
        b_enc = torch.zeros(d_sae, device=device)
        self.weights = SteeringWeights(enc_t, b_enc, torch.zeros_like(b_enc), dec, 0)

    def call(self, tokens: int, slots: int, topk: bool) -> tuple[Callable[[], None], int]:
        """The op call to time, and the bytes it must move."""
        d_sae, d_in = self.weights.enc_t.shape
        dev, gen, dt = self.device, self.gen, self.dtype
        # As the steered layer hands it: a float32 working copy of a bf16/fp16 layer output.
        hidden = torch.randn(tokens, d_in, generator=gen, device=dev, dtype=torch.float32)
        residual = torch.randn(tokens, d_in, generator=gen, device=dev, dtype=dt)
        row_feat = torch.randint(0, d_sae, (tokens, slots), generator=gen, device=dev)
        row_feat = row_feat.to(torch.int32)
        row_val = torch.full((tokens, slots), 5.0, device=dev)
        row_op = torch.full((tokens, slots), SET, dtype=torch.int32, device=dev)
        tok_row = torch.arange(tokens, dtype=torch.int32, device=dev)
        tok_scope = torch.ones(tokens, dtype=torch.bool, device=dev)
        w = self.weights
        k = TOPK_K if topk else 0

        def fn() -> None:
            torch.ops.sae_vllm.steer_(
                hidden, residual, w.enc_t, w.b_enc, w.threshold, w.W_dec,
                row_feat, row_val, row_op, tok_row, tok_scope, k,
            )  # fmt: skip

        elem = w.enc_t.element_size()
        rows = int(torch.unique(row_feat).numel())
        weight_bytes = (d_sae + rows if topk else 2 * rows) * d_in * elem
        table_bytes = tokens * slots * 12 + tokens * 5
        activation_bytes = tokens * d_in * (2 * hidden.element_size() + residual.element_size())
        return fn, weight_bytes + activation_bytes + table_bytes


def summarize(cfg: Config, step_s: float, copy_bps: float) -> dict[str, Any]:
    """One table row: time per call, bandwidth against the copy bandwidth, share of a step."""
    achieved = cfg.bytes_moved / cfg.median_s
    return {
        "path": cfg.path,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "tokens": cfg.tokens,
        "K": cfg.slots,
        "us/call": cfg.median_s * 1e6,
        "GB/s": achieved / 1e9,
        "% copy BW": 100 * achieved / copy_bps,
        "step proxy ms": step_s * 1e3,
        "% of step": 100 * cfg.median_s / step_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    quick = args.quick
    timer = Timer(device)
    n = args.samples or (5 if quick or device.type == "cpu" else 20)
    chosen = configs(quick)
    copy_bw = copy_bandwidth(timer, device, n)
    proxies = {
        t: step_proxy(timer, device, dtype, t, 3) for t in sorted({c.tokens for c in chosen})
    }

    problems: dict[tuple[int, int], Problem] = {}
    for cfg in chosen:
        key = (cfg.d_in, cfg.d_sae)
        if key not in problems:
            problems.clear()  # one SAE in memory at a time
            problems[key] = Problem(cfg.d_in, cfg.d_sae, device, dtype)
        fn, cfg.bytes_moved = problems[key].call(cfg.tokens, cfg.slots, cfg.path == "topk")
        cfg.samples_s = timer.samples(fn, n)
        if args.verbose:
            print(
                f"{cfg.path} {cfg.d_in}x{cfg.d_sae} T={cfg.tokens} K={cfg.slots}: "
                f"{cfg.median_s * 1e6:.1f} us",
                file=sys.stderr,
            )

    placements = {t: placement_samples(timer, device, t, n) for t in TOKENS}
    bw = statistics.median(copy_bw)
    summary = [summarize(cfg, statistics.median(proxies[cfg.tokens]), bw) for cfg in chosen]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    impl = "Triton kernels" if device.type == "cuda" else "the CPU op (Triton runs on CUDA)"
    note = (
        f"device: {name}; timed: {impl}; dtype: {args.dtype};"
        f" CPU threads: {torch.get_num_threads()}; copy bandwidth: {bw / 1e9:.1f} GB/s;"
        f" TopK k={TOPK_K}; step proxy: Llama-3.1-8B dense GEMMs x {LLAMA_LAYERS} layers;"
        f" % of step is one call (one steered layer)"
    )
    headers = list(summary[0])
    table = note + "\n\n" + report.markdown_table(headers, [list(r.values()) for r in summary])
    ways = list(placements[TOKENS[0]])
    placement_rows = [
        [t, *(statistics.median(placements[t][way]) * 1e6 for way in ways)] for t in TOKENS
    ]
    table += "\n\nDevice placement, per steered layer (async scheduling with speculative decoding):"
    table += "\n\n" + report.markdown_table(
        ["tokens", *(f"{way} us/call" for way in ways)], placement_rows
    )
    return {
        "suite": "kernels",
        "machine": {**report.machine(), "device": name},
        "device": device.type,
        "config": {
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "quick": quick,
            "samples": n,
            "topk_k": TOPK_K,
            "implementation": impl,
            "l2_flushed": device.type == "cuda",
        },
        "copy_bandwidth_Bps": {"samples": copy_bw, "median": bw},
        "placement_s": {
            str(t): {
                way: {"samples": s, "median": statistics.median(s)} for way, s in ways_.items()
            }
            for t, ways_ in placements.items()
        },
        "step_proxy_s": {
            str(t): {"samples": s, "median": statistics.median(s)} for t, s in proxies.items()
        },
        "results": [
            {**asdict(cfg), "median_s": cfg.median_s, "summary": row}
            for cfg, row in zip(chosen, summary, strict=True)
        ],
        "table": table,
    }


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for result file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small subset (< 60 s on 2 CPUs)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--samples", type=int, help="timed calls per config")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU, idle OpenMP threads stall small ops)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/...)")
    parser.add_argument("--verbose", action="store_true", help="print each config as it ends")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run(args)
    default = (
        f"gpu-{device_slug(result['machine']['device'])}.json"
        if result["device"] == "cuda"
        else "kernels-cpu.json"
    )
    path = report.write_results(
        "kernels", result, result["table"], args.out or report.RESULTS_DIR / default
    )
    print(result["table"])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
