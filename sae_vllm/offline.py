"""Offline entry: the engine config, and the SamplingParams / BeamSearchParams of steered
`LLM.generate` and `LLM.beam_search` calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import (
    BEAM_STEERING_ATTR,
    CONFIG_KEY,
    EXTRA_ARGS_KEY,
    SteeringConfig,
    with_local_sae_paths,
)
from .sae_entries import checked_entry
from .spec import SteeringSpec, parse_spec


def steering_config(saes: list[Mapping[str, Any]], **options: Any) -> dict[str, Any]:
    """The `additional_config` that switches steering on, validated:
    `LLM(model, additional_config=steering_config([{"id": "res12", "path": ..., "layer": 12}]))`.
    An `hf://OWNER/REPO[@REVISION]/PATH` path is fetched here and replaced by its local copy.

    Each SAE's files are checked from their headers here, before an engine loads the model:
    raises SAEEntryError (a ValueError) naming the SAE for a path that is missing or no SAE,
    or an SAE whose layer neither the entry nor its files give, or that reads a site other than
    a layer's output; pydantic's ValidationError for a malformed config. What needs the model
    (hidden size, layer count) or every weight (NaN, infinities) the engine checks."""
    config = with_local_sae_paths(SteeringConfig.model_validate({"saes": list(saes), **options}))
    for entry in config.saes:
        checked_entry(entry, layer_hint='give its "layer"')
    return {CONFIG_KEY: config.model_dump(mode="json", exclude_none=True)}


def _validated(
    spec: SteeringSpec | Mapping[str, Any] | str,
    config: SteeringConfig | Mapping[str, Any] | None,
) -> str:
    """The spec's wire text (see resolved_specs): resolved when the config is given."""
    if config is None:
        return parse_spec(spec).model_dump_json()
    from .engine.sae_sizes import config_resolver

    if isinstance(config, Mapping):
        config = SteeringConfig.model_validate(config.get(CONFIG_KEY, config))
    return config_resolver(config).resolve(spec).text


def steering_params(
    spec: SteeringSpec | Mapping[str, Any] | str,
    *,
    config: SteeringConfig | Mapping[str, Any] | None = None,
    **sampling_kwargs: Any,
):
    """SamplingParams carrying a validated steering spec (as JSON text in `extra_args`).

    With `config` (the engine's steering config or its additional_config dict) the spec is
    also resolved against the SAEs (ids, feature ranges, duplicates); without it those checks
    run when the request is submitted. Raises SteeringSpecError on a bad spec."""
    from vllm import SamplingParams

    extra_args = dict(sampling_kwargs.pop("extra_args", None) or {})
    extra_args[EXTRA_ARGS_KEY] = _validated(spec, config)
    return SamplingParams(extra_args=extra_args, **sampling_kwargs)


def steering_beam_params(
    spec: SteeringSpec | Mapping[str, Any] | str,
    *,
    config: SteeringConfig | Mapping[str, Any] | None = None,
    **beam_kwargs: Any,
):
    """BeamSearchParams carrying a validated steering spec, for `LLM.beam_search`: every beam
    step is steered, the tokens generated so far staying in the spec's scope as generated.
    `config` and errors as in `steering_params`."""
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(**beam_kwargs)
    setattr(params, BEAM_STEERING_ATTR, _validated(spec, config))  # it keeps a __dict__
    return params
