"""What reading an SAE costs: the API process describing it, and a worker building its weights.

`python -m bench sae_reads [PATH ...] [--synthetic DIR] [--out FILE]` measures, for each SAE,
in a fresh process per measurement, as wall time and peak anonymous memory (sampled every
millisecond from /proc; Linux only):
- the API process: `load_sae(path).W_dec.float().norm(dim=1)` ("load", what the frontend did)
  against `inspect_sae(path)` + `non_finite_weight(path)` + `decoder_norms(path)` ("stream",
  what it does: the finiteness pass streams every weight once);
- a worker's startup: the steering op's bfloat16 CPU weights from the canonical SAE, held
  whole (`prepare_weights` on `load_sae(path)`: "weights_whole", what the worker did) against
  `steering_weights(open_sae(path))` ("weights_streamed", what it does: folded a block of
  features at a time from the memory-mapped file).
Each pair must agree exactly (the norms; the weights' bytes). `--synthetic DIR` first writes
four random SAEs at released shapes into DIR (about 4.6 GB)."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAYS = ("load", "stream", "weights_whole", "weights_streamed")
WEIGHTS_DTYPE = "bfloat16"  # the model dtype the weights ways build for, on the CPU


def anonymous_bytes() -> int | None:
    """This process's memory not backed by a file (None where /proc cannot tell: not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_anonymous_growth(work: Callable[[], Any]) -> tuple[Any, int | None]:
    """What work returns, and the most anonymous memory it added while it ran (sampled every
    millisecond; None where it cannot be read)."""
    baseline, peak, done = anonymous_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = anonymous_bytes()
            if now is not None and baseline is not None:
                peak[0] = max(peak[0], now - baseline)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, (peak[0] if baseline is not None else None)


def _digest(weights: Any) -> str:
    """A hash of the steering weights' bytes (every tensor, in a fixed order) and k."""
    import torch

    digest = hashlib.sha256(str(weights.k).encode())
    for tensor in (weights.enc_t, weights.b_enc, weights.threshold, weights.W_dec):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def measure(path: str, way: str) -> dict[str, Any]:
    """Time and peak anonymous memory of one way of reading the SAE, and what it read: the
    decoder norms' sum ("check", a float) or the steering weights' digest (a string)."""
    import torch

    from sae_vllm.engine.sae_weights import steering_weights
    from sae_vllm.kernels import prepare_weights
    from sae_vllm.sae import decoder_norms, inspect_sae, load_sae, non_finite_weight, open_sae

    dtype = getattr(torch, WEIGHTS_DTYPE)

    def stream() -> torch.Tensor:
        inspect_sae(path)
        bad = non_finite_weight(path)
        if bad is not None:
            raise ValueError(f"{path}: {bad} is NaN or infinite")
        return decoder_norms(path)

    def load() -> torch.Tensor:
        return load_sae(path).W_dec.float().norm(dim=1)

    def weights_whole() -> Any:
        sae = load_sae(path)
        return prepare_weights(
            sae.W_enc,
            sae.b_enc,
            sae.W_dec,
            sae.b_dec,
            sae.threshold,
            sae.k,
            sae.apply_b_dec_to_input,
            dtype=dtype,
            device="cpu",
        )

    def weights_streamed() -> Any:
        return steering_weights(open_sae(path), dtype=dtype, device="cpu")

    work = {"load": load, "stream": stream, "weights_whole": weights_whole,
            "weights_streamed": weights_streamed}[way]  # fmt: skip
    start = time.perf_counter()
    result, peak = peak_anonymous_growth(work)
    seconds = time.perf_counter() - start
    if way.startswith("weights"):
        check: float | str = _digest(result)
    else:
        check = float(result.to(torch.float64).sum())
    return {
        "seconds": seconds,
        "peak_anonymous_mib": None if peak is None else peak / 2**20,
        "check": check,
    }


def write_synthetic(folder: Path) -> list[Path]:
    """Random SAEs at the shapes of four releases: a Goodfire .pth (bf16), a Llama Scope
    folder (f32, dataset-norm fold), a Gemma Scope npz (f32) and a dictionary_learning folder
    (f32, decoder-norm fold)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    goodfire = folder / "goodfire" / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    goodfire.parent.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = 4096, 65536
    torch.save(
        {
            "encoder_linear.weight": normal(d_sae, d_in, dtype=torch.bfloat16),
            "encoder_linear.bias": normal(d_sae, dtype=torch.bfloat16),
            "decoder_linear.weight": normal(d_in, d_sae, dtype=torch.bfloat16),
            "decoder_linear.bias": normal(d_in, dtype=torch.bfloat16),
        },
        goodfire,
    )
    llama_scope = folder / "llama_scope"
    (llama_scope / "checkpoints").mkdir(parents=True, exist_ok=True)
    d_sae = 32768
    save_file(
        {
            "encoder.weight": normal(d_sae, d_in),
            "encoder.bias": normal(d_sae),
            "decoder.weight": normal(d_in, d_sae),
            "decoder.bias": normal(d_in),
        },
        llama_scope / "checkpoints" / "final.safetensors",
    )
    hook = "blocks.15.hook_resid_post"
    hyperparams = {
        "d_model": d_in, "d_sae": d_sae, "hook_point_in": hook, "hook_point_out": hook,
        "jump_relu_threshold": 0.1, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 20.0, "out": 20.0},
    }  # fmt: skip
    (llama_scope / "hyperparams.json").write_text(json.dumps(hyperparams))
    gemma_scope = folder / "gemma_scope" / "layer_12" / "width_65k" / "average_l0_50"
    gemma_scope.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = 2304, 65536
    np.savez(
        gemma_scope / "params.npz",
        W_enc=normal(d_in, d_sae).numpy(),
        W_dec=normal(d_sae, d_in).numpy(),
        b_enc=normal(d_sae).numpy(),
        b_dec=normal(d_in).numpy(),
        threshold=normal(d_sae).abs().numpy(),
    )
    # SAEBench's Gemma 2 2B width: a ReLU AutoEncoder, whose decoder is normalised on load.
    dictionary_learning = folder / "dictionary_learning" / "resid_post_layer_12" / "trainer_0"
    dictionary_learning.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "encoder.weight": normal(d_sae, d_in),
            "encoder.bias": normal(d_sae),
            "decoder.weight": normal(d_in, d_sae),
            "bias": normal(d_in),
        },
        dictionary_learning / "ae.pt",
    )
    trainer = {"dict_class": "AutoEncoder", "activation_dim": d_in, "dict_size": d_sae,
               "layer": 12, "submodule_name": "resid_post_layer_12"}  # fmt: skip
    (dictionary_learning / "config.json").write_text(json.dumps({"trainer": trainer}))
    return [goodfire, llama_scope, gemma_scope / "params.npz", dictionary_learning]


def _measure_in_subprocess(path: Path, way: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.sae_reads", "--measure", str(path), way]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sae_reads", description=__doc__)
    parser.add_argument("paths", nargs="*", help="SAE files or folders")
    parser.add_argument("--synthetic", type=Path, help="write four random SAEs here first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    paths = [Path(p) for p in args.paths]
    if args.synthetic:
        paths += write_synthetic(args.synthetic)
    if not paths:
        parser.error("give SAE paths or --synthetic DIR")
    rows = []
    print(f"weights ways: {WEIGHTS_DTYPE} on the CPU; {args.repeats} repeats; fresh process each")
    print("| SAE | way | seconds | peak anonymous MiB |\n|---|---|---|---|")
    for path in paths:
        for _ in range(args.repeats):
            for way in args.ways:
                row = {"path": str(path), "way": way, **_measure_in_subprocess(path, way)}
                rows.append(row)
                peak = row["peak_anonymous_mib"]
                shown = "n/a" if peak is None else f"{peak:.0f}"
                print(f"| {path.name} | {way} | {row['seconds']:.3f} | {shown} |")
        mine = [row for row in rows if row["path"] == str(path)]
        for pair in (WAYS[:2], WAYS[2:]):
            checks = {row["check"] for row in mine if row["way"] in pair}
            if len(checks) > 1:
                print(f"{path}: {' and '.join(pair)} disagree: {sorted(checks)}", file=sys.stderr)
                return 1
    if args.out:
        config = {"weights_dtype": WEIGHTS_DTYPE, "repeats": args.repeats}
        args.out.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
