"""The steering options of `sae-vllm serve` and the engine config they become."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sae_vllm.config import CONFIG_KEY, SteeringConfig, with_local_sae_paths
from sae_vllm.sae import SAEFormatError
from sae_vllm.sae.hub import is_hub_path

from .errors import StartupError


def sae_argument(text: str) -> dict[str, Any]:
    """`ID=PATH[@LAYER]` -> an SAE entry of the steering config."""
    sae_id, sep, rest = text.partition("=")
    if not sep or not sae_id or not rest:
        raise argparse.ArgumentTypeError(f"expected ID=PATH[@LAYER], got {text!r}")
    path, at, layer = rest.rpartition("@")
    if at and not layer.isdigit() and _meant_as_layer(layer, rest):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the layer after '@' must be a non-negative integer, got {layer!r}"
        )
    if not at or not layer.isdigit():
        path, layer = rest, ""
    if not is_hub_path(path):
        path = str(Path(path).expanduser().absolute())
    entry: dict[str, Any] = {"id": sae_id, "path": path}
    if layer:
        entry["layer"] = int(layer)
    return entry


def _meant_as_layer(suffix: str, path: str) -> bool:
    """Whether the text after a path's last '@' was meant as a layer ('', '-1', '12x'), not as
    part of a path (a hub path's revision, a folder named `sae@v2`, one that exists)."""
    if suffix and not (suffix[0].isdigit() or suffix[0] == "-"):
        return False
    return "/" not in suffix and not is_hub_path(path) and not Path(path).expanduser().exists()


def labels_argument(text: str) -> tuple[str, str]:
    """`ID=PATH` -> (SAE id, labels file)."""
    sae_id, sep, path = text.partition("=")
    if not sep or not sae_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=PATH, got {text!r}")
    return sae_id, str(Path(path).expanduser().absolute())


def variant_argument(text: str) -> tuple[str, Any]:
    """`NAME=SPEC` -> (variant name, spec as parsed JSON); SPEC is the JSON text of a steering
    spec or the path of a file holding it (validated when the server starts)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=SPEC (JSON or a file), got {text!r}")
    source = "JSON"
    if not spec.lstrip().startswith("{"):
        source = str(Path(spec).expanduser())
        try:
            spec = Path(source).read_text()
        except OSError as exc:
            message = f"variant '{name}': {exc.strerror}: {source}"
            raise argparse.ArgumentTypeError(message) from None
    try:
        return name, json.loads(spec)
    except ValueError as exc:
        message = f"variant '{name}': {source} is not valid JSON: {exc}"
        raise argparse.ArgumentTypeError(message) from None


# Titled as vLLM titles its own option groups, so that `--help=SAESteering` shows this one
STEERING_GROUP = "SAESteering"
# Each steering option's default, by its dest, filled in after parsing (fill_steering_defaults)
# rather than by argparse: vLLM's help formatter would print "(default: [])" or "(default:
# None)" beside the default each option's help describes.
_STEERING_DEFAULTS: dict[str, Callable[[], Any]] = {}


_REPEATABLE_FLAGS: set[str] = set()


def _add_steering_option(group: Any, flag: str, *, repeatable: bool, **kwargs: Any) -> None:
    """Add `flag` to `group`; unset, it is an empty list when `repeatable`, else None."""
    action = "append" if repeatable else "store"
    added = group.add_argument(flag, action=action, default=argparse.SUPPRESS, **kwargs)
    _STEERING_DEFAULTS[added.dest] = list if repeatable else lambda: None
    if repeatable:
        _REPEATABLE_FLAGS.add(flag)


# vLLM's parser warns of any option given twice; its logger and message (vllm 0.32)
_PARSER_LOGGER = "vllm.utils.argparse_utils"
_REPEATED_OPTIONS_WARNING = "Found duplicate keys %s"


class _RepeatedSteeringOptionsFilter(logging.Filter):
    """Drops vLLM's parser warning when only repeatable steering options repeat (`--sae A
    --sae B` is how they are used); any other repeat still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _REPEATED_OPTIONS_WARNING or not record.args:
            return True
        repeated = {name.strip() for name in str(record.args[0]).split(",")}
        return not repeated <= _REPEATABLE_FLAGS


def quiet_repeated_steering_options() -> None:
    """Install the filter on vLLM's parser logger (once)."""
    parser_logger = logging.getLogger(_PARSER_LOGGER)
    if not any(isinstance(f, _RepeatedSteeringOptionsFilter) for f in parser_logger.filters):
        parser_logger.addFilter(_RepeatedSteeringOptionsFilter())


def add_steering_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        STEERING_GROUP,
        "Per-request SAE feature steering (sae-vllm): the SAEs requests may steer, their "
        f"labels, steering variants and the edit limit (--help={STEERING_GROUP}).",
    )
    _add_steering_option(
        group,
        "--sae",
        repeatable=True,
        type=sae_argument,
        metavar="ID=PATH[@LAYER]",
        help="An SAE requests may steer with, by ID (repeatable). PATH is a local file or "
        "folder, or hf://OWNER/REPO[@REVISION]/PATH on the Hugging Face Hub. LAYER is the "
        "decoder layer whose output it reads; defaults to the layer in the SAE's config. "
        "Without a model and without --sae, the embedded default model and SAE are served.",
    )
    _add_steering_option(
        group,
        "--sae-labels",
        repeatable=True,
        type=labels_argument,
        metavar="ID=PATH",
        help="A feature-labels JSON for the SAE ID (default: labels.json in the SAE folder).",
    )
    _add_steering_option(
        group,
        "--steering-variant",
        repeatable=True,
        type=variant_argument,
        metavar="NAME=SPEC",
        help="A served model name that steers every request sent to it with SPEC, a steering "
        "spec as JSON or the path of a .json file holding one (repeatable). Listed in "
        "/v1/models; clients pick it as their model, no `steering` field needed.",
    )
    _add_steering_option(
        group,
        "--max-edits",
        repeatable=False,
        type=int,
        help="Most feature edits one request may make (default 32).",
    )


def fill_steering_defaults(args: argparse.Namespace) -> None:
    """Give each steering option its default where the command line did not set it."""
    for dest, default in _STEERING_DEFAULTS.items():
        if not hasattr(args, dest):
            setattr(args, dest, default())


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def steering_additional_config(
    additional_config: dict[str, Any] | None,
    saes: list[dict[str, Any]],
    labels: list[tuple[str, str]],
    max_edits: int | None,
    variants: Sequence[tuple[str, Any]] = (),
) -> tuple[dict[str, Any], SteeringConfig | None]:
    """Merge the steering options into a user's --additional-config; returns the merged
    additional_config and the validated steering config (None when no SAE is configured)."""
    config = dict(additional_config or {})
    section = dict(config.get(CONFIG_KEY) or {})
    entries = [dict(entry) for entry in section.get("saes") or []] + [dict(e) for e in saes]
    by_id = {entry.get("id"): entry for entry in entries}
    for sae_id, path in labels:
        if sae_id not in by_id:
            raise StartupError(f"--sae-labels names SAE '{sae_id}', which is not configured")
        by_id[sae_id]["labels"] = path
    if max_edits is not None:
        section["max_edits"] = max_edits
    if variants:
        merged = dict(section.get("variants") or {})
        for name, spec in variants:
            if name in merged:
                raise StartupError(f"steering variant '{name}' is given twice")
            merged[name] = spec
        section["variants"] = merged
    if not entries:
        if section:
            raise StartupError("steering options given, but no SAE: add --sae ID=PATH[@LAYER]")
        return config, None
    section["saes"] = entries
    try:
        steering = SteeringConfig.model_validate(section)
    except ValidationError as exc:
        raise StartupError(f"steering config: {_one_line(exc)}") from None
    try:
        steering = with_local_sae_paths(steering)
    except SAEFormatError as exc:
        raise StartupError(str(exc)) from None
    config[CONFIG_KEY] = steering.model_dump(mode="json", exclude_none=True)
    return config, steering
