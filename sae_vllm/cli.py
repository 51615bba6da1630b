"""The `sae-vllm` command: `serve` (the steering server), `demo` (the embedded demo) and
`inspect` (describe an SAE file)."""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: sae-vllm {serve,demo,inspect} [options]

  serve [MODEL] --sae ID=PATH[@LAYER] ... [vllm serve options]
        vLLM's OpenAI-compatible server with per-request SAE steering; without a model,
        the embedded default model and SAE (`sae-vllm serve --help=SAESteering` describes
        the steering options, `--help=all` every option)
  demo  steer the embedded default model and show what changes
  inspect PATH [--format F]
        an SAE file's format, sizes, architecture and the layer it steers, as JSON
        (read from the headers; no weights are loaded)
"""


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("sae_vllm.toy.demo")
    except ImportError:
        print("sae-vllm demo: error: the demo is not available in this build", file=sys.stderr)
        return 1
    return int(demo.main(argv) or 0)


def _serve(argv: list[str]) -> int:
    from sae_vllm.server.launch import serve

    return serve(argv)


def _inspect(argv: list[str]) -> int:
    from sae_vllm.inspect_cli import main as inspect_main

    return inspect_main(argv)


COMMANDS = {"serve": _serve, "demo": _demo, "inspect": _inspect}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"sae-vllm: error: unknown command {argv[0]!r}\n{USAGE}", end="", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
