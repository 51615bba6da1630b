"""Why a request's steering was refused: the `reason` of the 400 body and of the metric.

A bad spec is labelled with its SpecErrorReason; the reasons here refuse the request itself."""

from __future__ import annotations

from sae_vllm.spec import SpecErrorReason

CONFLICT = "conflict"  # a spec given both as `steering` and in vllm_xargs
STEERING_DISABLED = "steering_disabled"  # the server has no SAEs
UNSUPPORTED_ROUTE = "unsupported_route"  # `steering` sent to a route that cannot apply it
MISPLACED = "misplaced"  # `steering` where no route reads it: the query string, `extra_body`
STEERS_NOTHING = "steers_nothing"  # no position of the request lies in a scope of the spec
RESERVED = "reserved"  # a vllm_xargs key sae-vllm's processes pass among themselves

REASONS = (
    *(reason.value for reason in SpecErrorReason),
    CONFLICT,
    STEERING_DISABLED,
    UNSUPPORTED_ROUTE,
    MISPLACED,
    STEERS_NOTHING,
    RESERVED,
)
