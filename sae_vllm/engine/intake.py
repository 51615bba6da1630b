"""Request intake: validate steering where a request enters, and salt its prefix cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import EXTRA_ARGS_KEY, GENERATION_START_KEY, steering_config_from
from ..spec import SteeringSpec, derive_cache_salt, resolve_spec
from . import vllm_adapter as vllm
from .sae_sizes import sae_sizes


def generation_start_of(extra_args: Mapping[str, Any]) -> int | None:
    """The request's generation start (None: the end of its prompt); raises ValueError."""
    value = extra_args.get(GENERATION_START_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{GENERATION_START_KEY}: expected a positive integer, got {value!r}")
    return value


def _resolve_in_place(vllm_config: Any, params: Any) -> tuple[SteeringSpec, int | None] | None:
    """The request's resolved spec and generation start (None when unsteered); the resolved
    spec replaces the raw one in extra_args. Raises ValueError on a bad spec."""
    extra_args = vllm.extra_args_of(params)
    data = extra_args.get(EXTRA_ARGS_KEY) if extra_args else None
    if data is None:
        return None
    config = steering_config_from(vllm_config.additional_config)
    if config is None:
        raise ValueError(
            "steering: this server has no SAEs configured "
            "(start the engine with additional_config {'sae_steering': ...})"
        )
    spec = resolve_spec(data, sae_sizes(config), config.limits)
    start = generation_start_of(extra_args)
    extra_args[EXTRA_ARGS_KEY] = spec.model_dump(mode="json")
    return spec, start


def check_params(vllm_config: Any, params: Any) -> None:
    """Frontend check: a bad spec raises ValueError (a client error) before reaching the engine."""
    _resolve_in_place(vllm_config, params)


def salt_request(vllm_config: Any, request: Any) -> None:
    """Engine-core check and prefix-cache salt: a steered request never shares KV blocks with
    requests steered differently or not at all. A bad spec raises, failing only that request."""
    steering = _resolve_in_place(vllm_config, vllm.sampling_params_of(request))
    if steering is None:
        return
    spec, start = steering
    user_salt = vllm.cache_salt_of(request)
    if start is not None:  # the generation start moves the scope, so the KV depends on it
        user_salt = f"{user_salt or ''}|generation-start={start}"
    vllm.set_cache_salt(request, derive_cache_salt(user_salt, spec))
