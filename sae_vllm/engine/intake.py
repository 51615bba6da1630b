"""Request intake: validate steering where a request enters, and key its prefix-cache blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import (
    DROPPED_GENERATION_KEY,
    EXTRA_ARGS_KEY,
    GENERATION_START_KEY,
    INTERNAL_KEY_PREFIX,
    PREFIX_CACHE_KEY,
    looks_like_the_spec_key,
    steering_config_from,
)
from ..resolved_specs import ResolvedSpec, SpecResolver
from ..spec import Scope, SteeringSpec
from . import vllm_adapter as vllm
from .prefix_cache import key_fields, session_key_fields
from .sae_sizes import config_resolver
from .scopes import scope_text, scopes_out_of_reach

# How the messages of these refusals start: the server finds them in vLLM's error response by
# this text, the only thing that crosses vLLM's frontend.
STEERS_NOTHING = "steering: steers no position of this request"
EDITS_STEER_NOTHING = "steering: some of its edits steer no position of this request"


def generation_start_of(extra_args: Mapping[str, Any]) -> int | None:
    """The request's generation start (None: the end of its prompt); raises ValueError."""
    value = extra_args.get(GENERATION_START_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{GENERATION_START_KEY}: expected a positive integer, got {value!r}")
    return value


_NO_STEERING = (
    "steering: this server has no SAEs configured "
    "(start the engine with additional_config {'sae_steering': ...})"
)
# additional_config dict -> (that dict, its resolver or None when steering is off), by identity:
# vLLM keeps one additional_config per engine, unchanged after start-up.
_resolvers: dict[int, tuple[Any, SpecResolver | None]] = {}
_MAX_ENGINES = 16


def _resolver_of(vllm_config: Any) -> SpecResolver | None:
    """The spec resolver of this engine's steering config (None when steering is off)."""
    additional = vllm_config.additional_config
    known = _resolvers.get(id(additional))
    if known is not None and known[0] is additional:
        return known[1]
    config = steering_config_from(additional)
    resolver = None if config is None else config_resolver(config)
    if len(_resolvers) >= _MAX_ENGINES:
        _resolvers.clear()
    _resolvers[id(additional)] = (additional, resolver)
    return resolver


def _resolve(vllm_config: Any, extra_args: Mapping[str, Any] | None) -> ResolvedSpec | None:
    """The resolved spec in a request's extra_args (None when unsteered); raises ValueError
    on a bad spec."""
    data = extra_args.get(EXTRA_ARGS_KEY) if extra_args else None
    if data is None:
        return None
    resolver = _resolver_of(vllm_config)
    if resolver is None:
        raise ValueError(_NO_STEERING)
    return resolver.resolve(data)


_INTERNAL_KEYS = frozenset({GENERATION_START_KEY, DROPPED_GENERATION_KEY, PREFIX_CACHE_KEY})


def _check_keys(extra_args: Mapping[str, Any]) -> None:
    """Raise ValueError for a key that looks meant for sae-vllm but is not one of its keys: the
    spec under it would be silently ignored (`steering`, `sae-steering`, `sae_steering_spec`)."""
    for key in extra_args:
        if not isinstance(key, str) or key == EXTRA_ARGS_KEY or key in _INTERNAL_KEYS:
            continue
        if key.startswith(INTERNAL_KEY_PREFIX) or looks_like_the_spec_key(key):
            raise ValueError(
                f"extra_args: {key!r} is no key of sae-vllm's; a steering spec goes in "
                f"extra_args[{EXTRA_ARGS_KEY!r}] (over HTTP: the body's `steering` field)"
            )


def check_params(vllm_config: Any, params: Any) -> Any:
    """Frontend check: a bad spec raises ValueError (a client error) before reaching the engine,
    as does, on a steering engine, an extra_args key that looks meant for sae-vllm but is none
    of its keys. Returns the params to submit: the caller's own, or, when their spec is not yet
    the resolved text, a shallow copy carrying it (the caller's object is never changed: it may
    be shared between prompts and engines)."""
    extra_args = vllm.extra_args_of(params)
    if extra_args and _resolver_of(vllm_config) is not None:
        _check_keys(extra_args)
    steering = _resolve(vllm_config, extra_args)
    if steering is None:
        return params
    generation_start_of(extra_args)  # raises on a bad one
    if extra_args[EXTRA_ARGS_KEY] == steering.text:
        return params
    return vllm.with_replaced_extra_args(params, {**extra_args, EXTRA_ARGS_KEY: steering.text})


def reach_problem(spec: SteeringSpec, num_prompt_tokens: int, max_tokens: int) -> str | None:
    """Why a request of this prompt length and max_tokens would not be steered as its spec
    says (a scope's window lies past the positions it can compute: that scope's edits would
    never apply, and with every scope so the request would run unsteered), or None."""
    scopes = scopes_out_of_reach(spec, num_prompt_tokens, max_tokens)
    if not scopes:
        return None
    scope_count = len(spec.scopes())
    if scope_count == 1:
        named = scope_text(scopes[0])
    else:  # name each scope's edits
        named = "; ".join(_scope_named(spec, scope) for scope in scopes)
    scope_holds = "scope ({}) holds" if len(scopes) == 1 else "scopes ({}) hold"
    problem = STEERS_NOTHING if len(scopes) == scope_count else EDITS_STEER_NOTHING
    return (
        f"{problem}: its prompt has {num_prompt_tokens} tokens and it generates at most "
        f"{max_tokens}, and the spec's {scope_holds.format(named)} none of their positions"
    )


def _scope_named(spec: SteeringSpec, scope: Scope) -> str:
    """One of a spec's scopes as a user reads it, with the edits it holds: `generated[16:] of
    edits[0, 2]`."""
    held = [str(index) for index, edit in enumerate(spec.edits) if spec.scope_of(edit) == scope]
    return f"{scope_text(scope)} of edits[{', '.join(held)}]"


def judged_spec(vllm_config: Any, params: Any) -> SteeringSpec | None:
    """The spec whose reach a request (SamplingParams) is judged by: None when it is unsteered
    or a beam-search step (its search is judged whole, check_beam_reach); raises ValueError on
    a bad spec."""
    extra_args = vllm.extra_args_of(params)
    if not extra_args or GENERATION_START_KEY in extra_args:
        return None
    steering = _resolve(vllm_config, extra_args)
    return None if steering is None else steering.spec


def check_reach(
    vllm_config: Any, params: Any, num_prompt_tokens: int, max_tokens: int | None
) -> SteeringSpec | None:
    """Raises ValueError when the spec in `params` (SamplingParams) steers none of the positions
    whose outputs a request of this prompt length and max_tokens (None: to the model's length)
    can return: it would run unsteered under a steered request's name. Returns the spec it
    judged (None: unsteered, or a beam-search step)."""
    spec = judged_spec(vllm_config, params)
    if spec is None:
        return None
    if vllm.extra_args_of(params).get(DROPPED_GENERATION_KEY):
        max_tokens = 0
    elif max_tokens is None:
        max_tokens = vllm.max_model_len(vllm_config) - num_prompt_tokens
    _raise_if_unreached(spec, num_prompt_tokens, max_tokens)
    return spec


def check_beam_reach(
    vllm_config: Any, spec_text: str, num_prompt_tokens: int, max_tokens: int
) -> SteeringSpec:
    """check_reach for a whole beam search, before its first step: raises ValueError. Returns
    the spec it judged, by which the search's beams are reported as they end."""
    steering = _resolve(vllm_config, {EXTRA_ARGS_KEY: spec_text})
    assert steering is not None  # a spec text is steering
    _raise_if_unreached(steering.spec, num_prompt_tokens, max_tokens)
    return steering.spec


def _raise_if_unreached(spec: SteeringSpec, num_prompt_tokens: int, max_tokens: int) -> None:
    problem = reach_problem(spec, num_prompt_tokens, max_tokens)
    if problem is not None:
        raise ValueError(problem)


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
    steering = _resolve(vllm_config, own)
    if steering is None:
        return
    start = generation_start_of(own)
    own[EXTRA_ARGS_KEY] = steering.text
    if vllm.is_resumable(request):
        own[PREFIX_CACHE_KEY] = session_key_fields(steering, vllm.request_id_of(request))
    else:
        own[PREFIX_CACHE_KEY] = key_fields(steering, vllm.num_prompt_tokens_of(request), start)
