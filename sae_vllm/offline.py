"""Offline entry: the engine config, and the SamplingParams / BeamSearchParams of steered
`LLM.generate` and `LLM.beam_search` calls."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .config import (
    BEAM_STEERING_ATTR,
    CONFIG_KEY,
    EXTRA_ARGS_KEY,
    SteeringConfig,
    internal_keys_in,
    with_local_sae_paths,
)
from .sae_entries import checked_entry
from .spec import MAX_EDITS_BOUND, SpecLimits, SteeringSpec, SteeringSpecError, parse_spec


def steering_config(saes: list[Mapping[str, Any]], **options: Any) -> dict[str, Any]:
    """The `additional_config` that switches steering on, validated:
    `LLM(model, additional_config=steering_config([{"id": "res12", "path": ..., "layer": 12}]))`.
    An `hf://OWNER/REPO[@REVISION]/PATH` path is fetched here and replaced by its local copy.

    Each SAE's files are checked from their headers here, before an engine loads the model:
    raises SAEEntryError (a ValueError) naming the SAE for a path that is missing or no SAE,
    or an SAE whose layer neither the entry nor its files give, or that reads a site other than
    a layer's output; ValueError for a steering variant whose spec does not fit the SAEs;
    pydantic's ValidationError for a malformed config. What needs the model
    (hidden size, layer count) or every weight (NaN, infinities) the engine checks."""
    config = with_local_sae_paths(SteeringConfig.model_validate({"saes": list(saes), **options}))
    for entry in config.saes:
        checked_entry(entry, layer_hint='give its "layer"')
    if config.variants:  # a server's (vllm serve): checked here as its start-up would
        from .engine.sae_sizes import config_resolver

        resolver = config_resolver(config)
        for name, spec in config.variants.items():
            try:
                resolver.resolve(spec.model_dump_json())
            except SteeringSpecError as exc:
                raise ValueError(f"steering variant '{name}': {exc}") from None
    return {CONFIG_KEY: config.model_dump(mode="json", exclude_none=True)}


# Without the engine's config, a spec is held to the widest limits a config may set: the
# engine checks its own when the request is submitted.
_WIDEST_LIMITS = SpecLimits(max_edits=MAX_EDITS_BOUND, max_abs_value=math.inf)


def _validated(
    spec: SteeringSpec | Mapping[str, Any] | str,
    config: SteeringConfig | Mapping[str, Any] | None,
) -> str:
    """The spec's wire text (see resolved_specs): resolved when the config is given."""
    if config is None:
        return parse_spec(spec, _WIDEST_LIMITS).model_dump_json()
    from .engine.sae_sizes import config_resolver

    if isinstance(config, Mapping):
        config = SteeringConfig.model_validate(config.get(CONFIG_KEY, config))
    elif not isinstance(config, SteeringConfig):
        raise TypeError(
            f"config: the engine's steering config (steering_config()'s dict or a "
            f"SteeringConfig), not {type(config).__name__}"
        )
    return config_resolver(config).resolve(spec).text


def steering_params(
    spec: SteeringSpec | Mapping[str, Any] | str,
    *,
    config: SteeringConfig | Mapping[str, Any] | None = None,
    **sampling_kwargs: Any,
):
    """SamplingParams carrying a validated steering spec (as JSON text in `extra_args`).

    With `config` (the engine's steering config or its additional_config dict) the spec is
    also resolved against the SAEs (ids, feature ranges, duplicates) within the config's
    limits; without it those checks, and the engine's limits, run when the request is
    submitted. Raises SteeringSpecError on a bad spec, ValueError for `extra_args` naming a
    key of sae-vllm's (the spec's own, or one its processes pass among themselves)."""
    from vllm import SamplingParams

    extra_args = dict(sampling_kwargs.pop("extra_args", None) or {})
    taken = [key for key in extra_args if key == EXTRA_ARGS_KEY] + internal_keys_in(extra_args)
    if taken:
        raise ValueError(f"extra_args[{taken[0]!r}]: a key of sae-vllm's; give the spec as `spec`")
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
