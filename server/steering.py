"""The request-side gate: validate a request's steering before the engine sees it, count it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse

from sae_vllm.config import EXTRA_ARGS_KEY, internal_keys_in, looks_like_the_spec_key
from sae_vllm.engine.intake import EDITS_STEER_NOTHING, STEERS_NOTHING
from sae_vllm.resolved_specs import ResolvedSpec, SpecResolver, resolver_for
from sae_vllm.spec import SpecLimits, SteeringSpec, SteeringSpecError, joined_path

from . import metrics, rejections
from .errors import StartupError, error_response_for

STEERING_FIELD = "steering"
# On every successful response of a steered route: what the server handed the engine, so a
# client behind a proxy that drops unknown body fields can tell its spec never arrived.
STEERING_HEADER = "X-SAE-Steering"
STEERED, UNSTEERED = "steered", "unsteered"
# On a steered response sent whole: how many of its sequences ended (end of sequence, a stop
# string) before the first position its spec steers, and so came back unsteered.
UNREACHED_HEADER = "X-SAE-Steering-Unreached"
XARGS = "vllm_xargs"  # vLLM's body field of extra SamplingParams.extra_args
XARGS_FIELD = f"{XARGS}.{EXTRA_ARGS_KEY}"


class Rejection(Exception):
    """A request refused before it reached the engine (a 400 naming the field and the reason)."""

    def __init__(self, reason: str, param: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.param = param

    def response_for(self, path: str) -> JSONResponse:
        """What the client of the route at `path` gets."""
        return error_response_for(path, HTTPStatus.BAD_REQUEST, str(self), self.param, self.reason)


# How the engine's refusals of a spec start (checked once the prompt is tokenized, past the
# gate), and the reason each is given.
_ENGINE_REFUSALS = {
    STEERS_NOTHING: rejections.STEERS_NOTHING,
    EDITS_STEER_NOTHING: rejections.STEERS_NOTHING,
}


def engine_rejection(error_message: str, param: str) -> Rejection | None:
    """The Rejection for vLLM's client error about a spec the engine refused for this request
    (a scope of it steers none of its positions); None for any other error. `param` names
    where the spec came from."""
    reason = next(
        (reason for start, reason in _ENGINE_REFUSALS.items() if error_message.startswith(start)),
        None,
    )
    if reason is None:
        return None
    problem = error_message.removeprefix(f"{STEERING_FIELD}: ")
    problem = problem.removesuffix(f" (parameter={STEERING_FIELD})")  # vLLM's own addition
    return Rejection(reason, param, f"{param}: {problem}")


def error_message_of(body: bytes) -> str:
    """The message of an error response's JSON body, in OpenAI's or Anthropic's shape ("" when
    it has none)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return message if isinstance(message, str) else ""


def xargs_spec_of(xargs: Any) -> Any:
    """The spec a request's `vllm_xargs` carries the low-level way (None: none)."""
    return xargs.get(EXTRA_ARGS_KEY) if isinstance(xargs, Mapping) else None


def reserved_key_message(field: str) -> str:
    """The refusal of an extra_args key that sae-vllm's processes pass among themselves."""
    return (
        f"{field}: reserved for sae-vllm's own use between its processes; send the spec as "
        f"`{STEERING_FIELD}`"
    )


def check_placement(steering: Any, xargs: Any, extra_body: Any) -> None:
    """Refuse a spec nested where no route reads it (a literal `extra_body` field) or given
    twice (`steering` and `vllm_xargs`), and `vllm_xargs` keys that sae-vllm keeps for itself;
    the engine validates the spec's contents later."""
    if isinstance(extra_body, dict) and STEERING_FIELD in extra_body:
        nested = f"extra_body.{STEERING_FIELD}"
        raise Rejection(
            rejections.MISPLACED,
            nested,
            f"{nested}: put `{STEERING_FIELD}` at the top level of the JSON body "
            "(the openai client's extra_body argument does that)",
        )
    keys = list(xargs) if isinstance(xargs, Mapping) else []
    reserved = sorted(internal_keys_in(keys))
    if reserved:
        field = f"{XARGS}.{reserved[0]}"
        raise Rejection(rejections.RESERVED, field, reserved_key_message(field))
    misnamed = [key for key in keys if looks_like_the_spec_key(key)]
    if misnamed:
        field = f"{XARGS}.{misnamed[0]}"
        raise Rejection(
            rejections.MISPLACED,
            field,
            f"{field}: no key of sae-vllm's; send the spec as `{STEERING_FIELD}` (or as JSON "
            f"text in {XARGS_FIELD})",
        )
    if xargs_spec_of(xargs) is not None and steering is not None:
        raise Rejection(
            rejections.CONFLICT,
            XARGS_FIELD,
            f"{XARGS_FIELD}: give the steering spec once, in `{STEERING_FIELD}`",
        )


class ResolvedVariant(NamedTuple):
    """A steering variant as the gate keeps it: the served model it steers and its spec."""

    model: str
    spec: str  # the resolved spec's wire text


class SteeringGate:
    """Admits a request's steering (resolved against the registered SAEs) or refuses it."""

    def __init__(
        self,
        sae_sizes: Mapping[str, int],
        limits: SpecLimits,
        variants: Mapping[str, ResolvedVariant] | None = None,
    ):
        self.sae_sizes = dict(sae_sizes)
        self.limits = limits
        self.variants = dict(variants or {})  # by name (see `resolve_variants`)

    @property
    def resolver(self) -> SpecResolver:
        """This process's resolver for the gate's SAEs (the gate itself is pickled to each API
        server process; a resolver holds a lock and stays in its process)."""
        return resolver_for(self.sae_sizes, self.limits)

    def variant_named(self, model: Any) -> ResolvedVariant | None:
        """The steering variant a request's `model` names, if it names one."""
        return self.variants.get(model) if isinstance(model, str) else None

    def admit(
        self,
        steering: Any,
        xargs: Any = None,
        extra_body: Any = None,
        variant: str | None = None,
    ) -> str | None:
        """The resolved spec's wire text to hand the engine (None when unsteered); raises
        Rejection, and counts it (record_admitted counts the requests the engine takes).

        `steering` is the raw body field; `xargs` the body's `vllm_xargs`, where a spec may
        come the low-level way, as `vllm_xargs["sae_steering"]`; `extra_body` the body's own
        `extra_body` field, if any (no route reads it: a client that writes the openai client's
        keyword argument into the JSON by hand has nested its spec where it would be ignored);
        `variant` the steering variant the request's `model` names, whose spec it gets (and may
        not add its own)."""
        try:
            spec = self._resolve(steering, xargs, extra_body, variant)
        except Rejection as rejection:
            metrics.record_rejected(rejection.reason)
            raise
        return None if spec is None else spec.text

    def record_admitted(self, endpoint: str, spec: str | None, variant: str | None) -> None:
        """Count a request admitted with `spec` (admit's answer) that vLLM took on: not one
        it refused (a spec that steers none of its positions, or any other reason)."""
        if spec is None:
            metrics.record_unsteered(endpoint)
            return
        metrics.record_steered(endpoint, len(self.resolver.resolve(spec).spec.edits))
        if variant is not None:
            metrics.record_variant(variant)

    def _resolve(
        self, steering: Any, xargs: Any, extra_body: Any, variant: str | None
    ) -> ResolvedSpec | None:
        check_placement(steering, xargs, extra_body)
        xargs_spec = xargs_spec_of(xargs)
        if variant is not None:
            if steering is not None or xargs_spec is not None:
                field = STEERING_FIELD if xargs_spec is None else XARGS_FIELD
                raise Rejection(
                    rejections.CONFLICT,
                    field,
                    f"{field}: model '{variant}' is a steering variant with a spec of its own "
                    "(GET /v1/models shows it); send your own spec with the model it steers",
                )
            return self.resolver.resolve(self.variants[variant].spec)
        field, raw = (STEERING_FIELD, steering) if xargs_spec is None else (XARGS_FIELD, xargs_spec)
        if raw is None:
            return None
        if not self.sae_sizes:
            raise Rejection(
                rejections.STEERING_DISABLED,
                field,
                f"{field}: this server has no SAEs configured (start sae-vllm serve with --sae "
                'ID=PATH, or vllm serve with --additional-config \'{"sae_steering": {"saes": '
                "[...]}}')",
            )
        try:
            return self.resolver.resolve(raw)
        except SteeringSpecError as exc:
            raise Rejection(
                exc.reason.value, joined_path(field, exc.field), exc.message(prefix=field)
            ) from None


def resolve_variants(
    variants: Mapping[str, SteeringSpec],
    model: str,
    taken_names: Iterable[str],
    sae_sizes: Mapping[str, int],
    limits: SpecLimits,
) -> dict[str, ResolvedVariant]:
    """Each steering variant of the served `model`, its spec resolved against the SAEs; a spec
    that does not fit them, or a name already served (`taken_names`: the served model names and
    LoRA adapters), raises a one-line StartupError naming the variant."""
    taken = set(taken_names)
    resolver = resolver_for(dict(sae_sizes), limits)
    resolved: dict[str, ResolvedVariant] = {}
    for name, spec in variants.items():
        where = f"steering variant '{name}'"
        if name in taken:
            raise StartupError(f"{where}: the name of a served model or LoRA adapter")
        try:
            resolved[name] = ResolvedVariant(model, resolver.resolve(spec.model_dump_json()).text)
        except SteeringSpecError as exc:
            raise StartupError(f"{where}: {exc}") from None
    return resolved
