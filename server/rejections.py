"""Why a request's steering was refused: the `reason` label of the rejection metric.

A bad spec is labelled with its SpecErrorReason; the two reasons here refuse the request."""

from __future__ import annotations

from sae_vllm.spec import SpecErrorReason

CONFLICT = "conflict"  # a spec given both as `steering` and in vllm_xargs
STEERING_DISABLED = "steering_disabled"  # the server has no SAEs

REASONS = (*(reason.value for reason in SpecErrorReason), CONFLICT, STEERING_DISABLED)
