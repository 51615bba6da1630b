"""`sae-vllm serve`: vLLM's OpenAI server with steering, from the command line to a running app."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from sae_vllm import LOGGER_NAME

from .errors import StartupError
from .options import (
    add_steering_options,
    fill_steering_defaults,
    quiet_repeated_steering_options,
    steering_additional_config,
)
from .registry import SAERegistry

logger = logging.getLogger(LOGGER_NAME + ".server")

PROG = "sae-vllm serve"
DESCRIPTION = (
    "vLLM's OpenAI-compatible server with per-request SAE steering (the `steering` body "
    "field). Takes every `vllm serve` option. Without a model it serves the embedded default "
    "model and SAE. --help=SAESteering describes the steering options, --help=all every option."
)
TOY_SERVED_NAME = "sae-vllm-toy"
TOY_KV_CACHE_BYTES = 1 << 30


def _toy_artifacts() -> Any:
    try:
        build = importlib.import_module("sae_vllm.toy.build")
    except ImportError:
        raise StartupError(
            "no model given and the embedded default model is not available; "
            "pass a model: sae-vllm serve MODEL --sae ID=PATH[@LAYER]"
        ) from None
    print(
        "sae-vllm: preparing the embedded default model (built once, then cached)...",
        file=sys.stderr,
    )
    return build.ensure_built()


def _toy_sae_entry(toy: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": toy.sae_id, "path": str(toy.sae_dir), "layer": toy.layer}
    labels = getattr(toy, "labels_path", None)
    if labels is not None and labels.is_file():
        entry["labels"] = str(labels)
    return entry


def _toy_variants(toy: Any, served_name: str) -> list[tuple[str, dict[str, Any]]]:
    """One steering variant per topic of the toy, `<served name>-<topic>`: the topic's feature
    set to its recommended value (the build measured both)."""
    variants = []
    for topic, info in toy.topics.items():
        value = info["steering_value"]
        edit = {"sae": toy.sae_id, "feature": info["feature"], "op": "set", "value": value}
        variants.append((f"{served_name}-{topic}", {"edits": [edit]}))
    return variants


def prepare(args: argparse.Namespace) -> None:
    """Resolve the model and SAEs, merge the steering config into args.additional_config and
    check everything that can be checked before the engine starts; the SAE registry and the
    steering gate are left on args for the app."""
    from . import app, vllm_app

    vllm_app.finish_args(args)
    saes = list(args.sae)
    variants = list(args.steering_variant)
    kv_cache_bytes = None
    if args.model is None:
        toy = _toy_artifacts()
        args.model = str(toy.model_dir)
        if any(entry["id"] == toy.sae_id for entry in saes):
            raise StartupError(
                f"--sae {toy.sae_id}=...: '{toy.sae_id}' is the id of the embedded default "
                "model's SAE, which it serves too; give yours another id"
            )
        saes.insert(0, _toy_sae_entry(toy))
        if args.served_model_name is None:
            args.served_model_name = [TOY_SERVED_NAME]
        given = {name for name, _ in variants}  # a variant the user names replaces the toy's
        toy_variants = _toy_variants(toy, args.served_model_name[0])
        variants[:0] = [(name, spec) for name, spec in toy_variants if name not in given]
        kv_cache_bytes = TOY_KV_CACHE_BYTES
    vllm_app.set_memory_default(args, kv_cache_bytes)
    args.additional_config, config = steering_additional_config(
        args.additional_config, saes, args.sae_labels, args.max_edits, variants
    )
    if config is None:
        logger.warning("sae-vllm serve: no SAE configured; requests cannot steer")
    registry = SAERegistry.load(config)
    try:
        hidden_size, num_layers = vllm_app.model_shape(args)
    except Exception as exc:  # vLLM's own message for an unusable model
        raise StartupError(f"model {args.model}: {exc}") from None
    registry.check_model(hidden_size, num_layers)
    setattr(args, app.PREPARED_STATE_ARG, (registry, app.steering_gate(config, registry, args)))


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve(argv: list[str]) -> int:
    """Parse `sae-vllm serve` arguments and serve until stopped; 1 with one line on stderr when
    the server cannot start."""
    from sae_vllm.engine.vllm_adapter import check_vllm_version

    from . import app, vllm_app

    try:
        check_vllm_version()
        parser = vllm_app.make_parser(PROG, DESCRIPTION)
        add_steering_options(parser)
        quiet_repeated_steering_options()
        args = parser.parse_args(argv)
        fill_steering_defaults(args)
        prepare(args)
    except (StartupError, ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"{PROG}: error: {_line(exc)}", file=sys.stderr)
        return 1
    try:
        app.install()
        vllm_app.run(args)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        print(f"{PROG}: error: {type(exc).__name__}: {_line(exc)}", file=sys.stderr)
        return 1
    return 0
