"""The engine-side steering configuration: `additional_config["sae_steering"]`."""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from .spec import (
    DEFAULT_MAX_ABS_VALUE,
    DEFAULT_MAX_EDITS,
    MAX_EDITS_BOUND,
    SpecLimits,
    SteeringSpec,
)

CONFIG_KEY = "sae_steering"
EXTRA_ARGS_KEY = "sae_steering"
# Internal: the position of a request's first generated token, when it is not the end of its
# prompt (set by the server for each step of a steered beam search).
GENERATION_START_KEY = "sae_steering_generation_start"
# Internal: set by the server on a completion that echoes its prompt with max_tokens 0, which
# vLLM runs for one generated token and drops: it returns the outputs of its prompt positions
# but the last, so the reach check counts no generated token.
DROPPED_GENERATION_KEY = "sae_steering_drops_generation"
# Internal: what the engine core records of a steered request for its prefix-cache keys
# (engine/prefix_cache.py); removed from every request that arrives with it.
PREFIX_CACHE_KEY = "sae_steering_prefix_cache"
INTERNAL_KEY_PREFIX = f"{EXTRA_ARGS_KEY}_"  # every internal extra_args key starts with it


def internal_keys_in(extra_args: Iterable[Any]) -> list[str]:
    """The keys of `extra_args` (a mapping, or its keys) that only sae-vllm itself may set
    (never a client)."""
    return [
        key for key in extra_args if isinstance(key, str) and key.startswith(INTERNAL_KEY_PREFIX)
    ]


# What the spec's key is mistyped as: the HTTP field's name, the key with a dash or capitals
_SPEC_KEY_LOOKALIKES = frozenset({"steering", EXTRA_ARGS_KEY})


def looks_like_the_spec_key(key: Any) -> bool:
    """Whether an extra_args key looks meant as the spec's but is not it (`steering`,
    `sae-steering`, `SAE_STEERING`): a spec under it would be read by nobody."""
    return (
        isinstance(key, str)
        and key != EXTRA_ARGS_KEY
        and key.lower().replace("-", "_") in _SPEC_KEY_LOOKALIKES
    )


# The attribute that carries a (resolved) spec on vLLM's BeamSearchParams, online and offline.
BEAM_STEERING_ATTR = "sae_steering"


def _not_bool_or_text(value: Any) -> Any:
    # pydantic would read `true` as 1 and "3" as 3; numbers.Real: numpy's numbers too, but
    # not numpy's booleans or arrays
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"must be a number, got {value!r}")
    return value


# A path as a config gives it: text, or a pathlib.Path in a Python script
PathText = Annotated[
    str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)
]

# Numbers as a config gives them: JSON's, or numpy's in a Python script; never true or "3".
ConfigInt = Annotated[int, BeforeValidator(_not_bool_or_text)]
ConfigFloat = Annotated[float, BeforeValidator(_not_bool_or_text)]


class SAEEntry(BaseModel):
    """One SAE the engine serves: its id (what requests name), file and layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    path: PathText = Field(min_length=1)
    layer: ConfigInt | None = Field(default=None, ge=0)
    format: str | None = None
    labels: PathText | None = None


# A steering variant's name: what a client puts in a request's `model` (vLLM's model names may
# hold slashes, as in "org/model", so variant names may too).
VariantName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/-]+$")
]


class SteeringConfig(BaseModel):
    """Everything the plugin needs to steer; its presence in additional_config switches it on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    saes: list[SAEEntry] = Field(min_length=1)
    max_edits: ConfigInt = Field(default=DEFAULT_MAX_EDITS, ge=1, le=MAX_EDITS_BOUND)
    max_abs_value: ConfigFloat = Field(default=DEFAULT_MAX_ABS_VALUE, gt=0)
    # Served model names that steer every request sent to them with a fixed spec (the HTTP
    # server lists them in /v1/models); checked against the SAEs when the server starts.
    variants: dict[VariantName, SteeringSpec] = Field(default_factory=dict)

    @field_validator("saes")
    @classmethod
    def _ids_are_unique(cls, saes: list[SAEEntry]) -> list[SAEEntry]:
        ids = [entry.id for entry in saes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate SAE ids: {', '.join(duplicates)}")
        return saes

    @property
    def limits(self) -> SpecLimits:
        return SpecLimits(max_edits=self.max_edits, max_abs_value=self.max_abs_value)


def with_local_sae_paths(config: SteeringConfig) -> SteeringConfig:
    """config with every `hf://` SAE path replaced by its local copy (fetched when needed), so
    the engine's processes read files and never contact the Hub; raises SAEFormatError."""
    from .sae.hub import local_sae_path

    entries = [
        entry.model_copy(update={"path": local_sae_path(entry.path)}) for entry in config.saes
    ]
    return config.model_copy(update={"saes": entries})


def steering_config_from(additional_config: Any) -> SteeringConfig | None:
    """The steering config inside vLLM's additional_config, or None when steering is off."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    return SteeringConfig.model_validate(additional_config[CONFIG_KEY])
