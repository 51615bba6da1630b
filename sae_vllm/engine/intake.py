"""Request intake: validate steering where a request enters, and key its prefix-cache blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import EXTRA_ARGS_KEY, GENERATION_START_KEY, PREFIX_CACHE_KEY, steering_config_from
from ..spec import SteeringSpec, resolve_spec
from . import vllm_adapter as vllm
from .prefix_cache import key_fields, session_key_fields
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


def key_request(vllm_config: Any, request: Any) -> None:
    """Engine-core check and prefix-cache keys: the KV blocks a steered request's steering
    changes are never shared with requests steered differently or not at all (see
    prefix_cache). A bad spec raises, failing only that request."""
    params = vllm.sampling_params_of(request)
    extra_args = vllm.extra_args_of(params)
    if not extra_args:
        return
    # A dict of this request's own: the caller's SamplingParams may share one between requests
    # (vLLM copies them shallowly with skip_clone), and KV blocks are hashed as tokens arrive.
    # PREFIX_CACHE_KEY is set here only, never taken from the client.
    own = {key: value for key, value in extra_args.items() if key != PREFIX_CACHE_KEY}
    vllm.set_extra_args(params, own)
    steering = _resolve_in_place(vllm_config, params)
    if steering is None:
        return
    spec, start = steering
    if vllm.is_resumable(request):
        own[PREFIX_CACHE_KEY] = session_key_fields(spec, vllm.request_id_of(request))
    else:
        own[PREFIX_CACHE_KEY] = key_fields(spec, vllm.num_prompt_tokens_of(request), start)
