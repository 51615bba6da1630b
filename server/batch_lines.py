"""`vllm run-batch` lines that carry steering: refused as the server refuses the same request,
the refusal written as the line's error in the server's 400 body shape (reason included)."""

from __future__ import annotations

from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from sae_vllm.config import SteeringConfig
from sae_vllm.spec import SpecLimits

from . import errors, rejections
from .steering import (
    STEERING_FIELD,
    XARGS_FIELD,
    Rejection,
    SteeringGate,
    check_placement,
    engine_rejection,
    xargs_spec_of,
)

STEERED_ROUTE = "/v1/chat/completions"  # the one generative text route run-batch has

# The gate of the batch this context runs (set around vLLM's run_batch).
batch_gate: ContextVar[SteeringGate | None] = ContextVar("sae_vllm_batch_gate", default=None)


def gate_for(config: SteeringConfig | None) -> SteeringGate:
    """The gate that admits a batch's specs against the engine's SAEs, within its limits."""
    if config is None:
        return SteeringGate({}, SpecLimits())  # every steered line: steering_disabled
    from sae_vllm.engine.sae_sizes import sae_sizes

    return SteeringGate(sae_sizes(config), config.limits)


def spec_field(body: Any) -> str | None:
    """Where a line's body carries its spec (the error's `param`), or None when it has none."""
    if xargs_spec_of(getattr(body, "vllm_xargs", None)) is not None:
        return XARGS_FIELD
    return STEERING_FIELD if STEERING_FIELD in (getattr(body, "model_extra", None) or {}) else None


def line_refusal(url: str, body: Any, gate: SteeringGate | None) -> Rejection | None:
    """Why a line's steering cannot apply as sent: on a route that cannot apply it, nested in
    a literal `extra_body`, given twice, or (with the gate) a bad spec; None when it can."""
    extra = getattr(body, "model_extra", None) or {}
    steering = extra.get(STEERING_FIELD)
    xargs = getattr(body, "vllm_xargs", None)
    if url != STEERED_ROUTE and (steering is not None or xargs_spec_of(xargs) is not None):
        field = STEERING_FIELD if steering is not None else XARGS_FIELD
        message = f"{field}: not supported on {url} (use {STEERED_ROUTE})"
        return Rejection(rejections.UNSUPPORTED_ROUTE, field, message)
    try:
        if gate is None or url != STEERED_ROUTE:
            check_placement(steering, xargs, extra.get("extra_body"))
        else:
            gate.admit(steering, xargs, extra.get("extra_body"))
    except Rejection as rejection:
        return rejection
    return None


def error_body(rejection: Rejection) -> dict[str, Any]:
    """The line's `error`: the server's 400 body for the same refusal."""
    status = HTTPStatus.BAD_REQUEST
    return errors.error_body(status, str(rejection), rejection.param, rejection.reason)


def engine_refusal_body(error: Any, param: str) -> dict[str, Any] | None:
    """The server's 400 body for vLLM's error line when the engine refused the line's spec
    (see steering.engine_rejection); None for any other error."""
    message = getattr(getattr(error, "error", None), "message", None)
    rejection = engine_rejection(message, param) if isinstance(message, str) else None
    return None if rejection is None else error_body(rejection)
