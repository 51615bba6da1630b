"""Dispatch `python -m bench <suite>` to the suite's main()."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "overhead": "bench.overhead",
    "latency": "bench.latency",
    "kernels": "bench.kernels",
    "ci": "bench.ci",
    "sae_reads": "bench.sae_reads",
    "prefix_cache": "bench.prefix_cache",
    "admission": "bench.admission",
    "tables": "bench.tables",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m bench {{{','.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
