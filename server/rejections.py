"""Why a steering spec was refused: one short reason per rejection, the `reason` metric label."""

from __future__ import annotations

import re

MALFORMED = "malformed"
UNKNOWN_FIELD = "unknown_field"
MISSING_FIELD = "missing_field"
INVALID_TYPE = "invalid_type"
INVALID_VALUE = "invalid_value"
NON_FINITE = "non_finite"
VALUE_OUT_OF_RANGE = "value_out_of_range"
UNKNOWN_OP = "unknown_op"
UNKNOWN_SAE = "unknown_sae"
FEATURE_OUT_OF_RANGE = "feature_out_of_range"
DUPLICATE_FEATURE = "duplicate_feature"
TOO_MANY_EDITS = "too_many_edits"
CONFLICT = "conflict"
STEERING_DISABLED = "steering_disabled"

REASONS = (
    MALFORMED, UNKNOWN_FIELD, MISSING_FIELD, INVALID_TYPE, INVALID_VALUE, NON_FINITE,
    VALUE_OUT_OF_RANGE, UNKNOWN_OP, UNKNOWN_SAE, FEATURE_OUT_OF_RANGE, DUPLICATE_FEATURE,
    TOO_MANY_EDITS, CONFLICT, STEERING_DISABLED,
)  # fmt: skip

_LEAF = re.compile(r"([A-Za-z_]+)(?:\[\d+\])*$")


def reason_of(path: str, message: str) -> str:
    """Classify one (field path, message) error of a SteeringSpecError."""
    match = _LEAF.search(path)
    leaf = match.group(1) if match else ""
    if message == "unknown field":
        return UNKNOWN_FIELD
    if message == "field required" or message.startswith("required"):
        return MISSING_FIELD
    if message.startswith("duplicate"):
        return DUPLICATE_FEATURE
    if not path:
        return MALFORMED
    if "finite" in message:
        return NON_FINITE
    if leaf == "op":
        return UNKNOWN_OP
    if leaf == "sae" and message.startswith("unknown SAE"):
        return UNKNOWN_SAE
    if path == "edits" and message.startswith("at most"):
        return TOO_MANY_EDITS
    if message.startswith("Input should be a valid") or message == "must be a number":
        return INVALID_TYPE
    if leaf == "feature":
        return FEATURE_OUT_OF_RANGE
    if leaf == "value" and "magnitude" in message:
        return VALUE_OUT_OF_RANGE
    return INVALID_VALUE
