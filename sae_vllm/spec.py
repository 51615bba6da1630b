"""The steering spec: the one wire format of the HTTP `steering` field and offline requests."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

DEFAULT_MAX_EDITS = 32
MAX_EDITS_BOUND = 256  # the most edits a server may allow a spec (its edit tables' width)
DEFAULT_MAX_ABS_VALUE = 1.0e4
MAX_WINDOW_OFFSET = 2**31 - 1  # far past any model's context; keeps position arithmetic in int64
MAX_SCOPES = 4  # distinct (apply_to, window) pairs among a spec's edits; bounds a request's rows


class EditOp(StrEnum):
    """What an edit does to a feature's activation a (DESIGN.md gives the math)."""

    SET = "set"  # a' = v
    ADD = "add"  # a' = a + v
    SCALE = "scale"  # a' = a * v
    ABLATE = "ablate"  # a' = 0
    FLOOR = "floor"  # a' = max(a, v)
    CAP = "cap"  # a' = min(a, v)


class ApplyTo(StrEnum):
    """Which token positions of a request are steered."""

    GENERATED = "generated"  # the last prompt position and every decode position
    ALL = "all"  # every prompt and generated position
    PROMPT = "prompt"  # prompt positions only


class SpecErrorReason(StrEnum):
    """Why a spec was refused, one short machine-readable code per error."""

    MALFORMED = "malformed"  # not a JSON object
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
    TOO_MANY_SCOPES = "too_many_scopes"


class SpecIssue(NamedTuple):
    """One thing wrong with a spec: where ("" for the whole spec), what, and its reason code."""

    path: str
    message: str
    reason: SpecErrorReason


def _plain_integer(value: Any) -> Any:
    """numpy's integers as Python's (an offline script's features often come from an array);
    anything else as given, for the strict check: JSON's `true` or 3.0 is no integer."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    return value


_Integer = Annotated[StrictInt, BeforeValidator(_plain_integer)]
_Offset = Annotated[_Integer, Field(ge=-MAX_WINDOW_OFFSET, le=MAX_WINDOW_OFFSET)]


class ScopeWindow(BaseModel):
    """A slice [start, end) of the scope's positions, numbered from 0 in order: for `generated`,
    position 0 is the one whose output is the first generated token. Negative values count back
    from the end of the prompt (`prompt` scope only: the others have no end)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: _Offset = 0
    end: _Offset | None = None  # None: to the end of the scope


def _narrowing(window: ScopeWindow | None) -> ScopeWindow | None:
    """The window, or None when it covers its whole scope (the same positions as none)."""
    if window is not None and window.start == 0 and window.end is None:
        return None
    return window


class Scope(NamedTuple):
    """The positions an edit steers: a scope and, optionally, a slice of it."""

    apply_to: ApplyTo
    window: ScopeWindow | None


class FeatureEdit(BaseModel):
    """One edit of one SAE feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str | None = Field(default=None, min_length=1, max_length=128)
    feature: _Integer = Field(ge=0)
    op: EditOp
    value: float | None = None
    # An edit's own scope, replacing the spec's; left out of the wire text when absent. A
    # resolved spec keeps them only where they differ from the spec's, apply_to always named.
    apply_to: ApplyTo | None = Field(default=None, exclude_if=lambda apply_to: apply_to is None)
    window: ScopeWindow | None = Field(default=None, exclude_if=lambda window: window is None)

    @property
    def has_own_scope(self) -> bool:
        """Whether the edit names an apply_to or a window of its own."""
        return self.apply_to is not None or self.window is not None

    @field_validator("value", mode="before")
    @classmethod
    def _value_is_a_finite_number(cls, value: Any) -> Any:
        if value is None:
            return value
        # numbers.Real: numpy's floats and integers too, as offline scripts pass them
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise PydanticCustomError(SpecErrorReason.INVALID_TYPE.value, "must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer past the largest float
            raise PydanticCustomError(
                SpecErrorReason.VALUE_OUT_OF_RANGE.value, "magnitude must fit a float"
            ) from None
        if not math.isfinite(number):
            raise PydanticCustomError(SpecErrorReason.NON_FINITE.value, "must be finite")
        return number


class SteeringSpec(BaseModel):
    """A request's steering: a list of feature edits and the positions they apply to. Frozen:
    a resolved spec is shared by every request of a process that sends the same one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edits: list[FeatureEdit] = Field(min_length=1)
    apply_to: ApplyTo = ApplyTo.GENERATED
    # Left out of the wire text when absent, so a spec without one keeps its text and key.
    window: ScopeWindow | None = Field(default=None, exclude_if=lambda window: window is None)

    @field_validator("window", mode="after")
    @classmethod
    def _whole_scope_is_no_window(cls, window: ScopeWindow | None) -> ScopeWindow | None:
        return _narrowing(window)  # the same positions as no window: same spec, text, KV key

    def scope_of(self, edit: FeatureEdit) -> Scope:
        """The positions `edit` steers: its own scope when it names one (its apply_to, else
        the spec's; its window, else none), else the spec's."""
        if not edit.has_own_scope:
            return Scope(self.apply_to, self.window)
        return Scope(edit.apply_to or self.apply_to, _narrowing(edit.window))

    @property
    def has_edit_scopes(self) -> bool:
        """Whether any edit names a scope of its own (else the spec's scope is every edit's)."""
        # FeatureEdit.has_own_scope inlined: this runs at every stage a request passes
        return any(edit.apply_to is not None or edit.window is not None for edit in self.edits)

    def scopes(self) -> list[tuple[Scope, list[FeatureEdit]]]:
        """The spec's distinct scopes, in the order the edits first name them, with their edits."""
        if not self.has_edit_scopes:
            return [(Scope(self.apply_to, self.window), list(self.edits))]
        grouped: dict[Scope, list[FeatureEdit]] = {}
        for edit in self.edits:
            grouped.setdefault(self.scope_of(edit), []).append(edit)
        return list(grouped.items())

    def fingerprint(self) -> str:
        """A stable hash of the spec's meaning (key order and formatting do not matter)."""
        return fingerprint_of(self.model_dump_json())


def fingerprint_of(canonical_text: str) -> str:
    """SteeringSpec.fingerprint() of the spec whose model_dump_json() is `canonical_text`."""
    return hashlib.sha256(canonical_text.encode()).hexdigest()[:32]


MAX_ISSUES_TOLD = 10  # problems a message names; a body of a million bad keys gets a short one


def joined_path(field: str, path: str) -> str:
    """A problem's `path` within the spec, as a path from the `field` the spec sat in (either
    may be empty)."""
    return f"{field}.{path}" if field and path else field or path


class SteeringSpecError(ValueError):
    """A spec that cannot be applied; `errors` lists what is wrong, first problem first (its
    message names the first MAX_ISSUES_TOLD)."""

    def __init__(self, errors: list[SpecIssue]):
        self.errors = errors
        super().__init__(self.message(prefix=""))

    def message(self, prefix: str) -> str:
        """The first MAX_ISSUES_TOLD problems, each path under `prefix` (a field the spec sat
        in: "steering"), then how many more there are."""
        told = [
            f"{joined_path(prefix, e.path)}: {e.message}" if e.path or prefix else e.message
            for e in self.errors[:MAX_ISSUES_TOLD]
        ]
        more = len(self.errors) - MAX_ISSUES_TOLD
        if more > 0:
            told.append(f"and {more} more problem{'s' if more > 1 else ''}")
        return "; ".join(told)

    @property
    def field(self) -> str:
        """The path of the first offending field ("" when the whole spec is wrong)."""
        return self.errors[0].path

    @property
    def reason(self) -> SpecErrorReason:
        """The reason code of the first problem."""
        return self.errors[0].reason


class SpecLimits(BaseModel):
    """Server-side bounds a spec must respect."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_edits: int = Field(default=DEFAULT_MAX_EDITS, ge=1, le=MAX_EDITS_BOUND)
    max_abs_value: float = Field(default=DEFAULT_MAX_ABS_VALUE, gt=0)


MAX_NAME_TOLD = 64  # characters of a client's key or name a message shows: it can be any length


def name_told(name: str) -> str:
    """`name` as an error message shows it: cut to MAX_NAME_TOLD characters."""
    if len(name) <= MAX_NAME_TOLD:
        return name
    return f"{name[: MAX_NAME_TOLD - 1]}…"


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(f".{name_told(item)}" if parts else name_told(str(item)))
    return "".join(parts)


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "field required"
    return str(error["msg"])


_TYPE_ERRORS = {"int_parsing", "float_parsing", "int_from_float"}
_BOUND_ERRORS = {"greater_than_equal", "less_than_equal"}
_OWN_CODES = {reason.value for reason in SpecErrorReason}


def _reason(error: Mapping[str, Any]) -> SpecErrorReason:
    kind, loc = str(error["type"]), error["loc"]
    if kind in _OWN_CODES:  # raised by the validators in this module
        return SpecErrorReason(kind)
    if kind == "extra_forbidden":
        return SpecErrorReason.UNKNOWN_FIELD
    if kind == "missing":
        return SpecErrorReason.MISSING_FIELD
    if kind.endswith("_type") or kind in _TYPE_ERRORS or error.get("input", ...) is None:
        return SpecErrorReason.INVALID_TYPE  # a null where a field takes none is one too
    leaf = loc[-1] if loc else ""
    if leaf == "op":
        return SpecErrorReason.UNKNOWN_OP
    if leaf == "feature":
        return SpecErrorReason.FEATURE_OUT_OF_RANGE
    if kind in _BOUND_ERRORS:
        return SpecErrorReason.VALUE_OUT_OF_RANGE
    return SpecErrorReason.INVALID_VALUE


def parse_spec_shape(data: Any) -> SteeringSpec:
    """The SteeringSpec raw data (a dict or JSON text) holds, its shape and types checked; a
    server's limits and the value rules are parse_spec's. Raises SteeringSpecError."""
    if isinstance(data, str | bytes):
        try:  # well-formed text parses in one pass; anything else is diagnosed below
            return SteeringSpec.model_validate_json(data)
        except ValidationError:
            pass
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise SteeringSpecError(
                [SpecIssue("", f"not valid JSON: {exc}", SpecErrorReason.MALFORMED)]
            ) from None
        except RecursionError:
            message = "not valid JSON: nested too deeply"
            raise SteeringSpecError([SpecIssue("", message, SpecErrorReason.MALFORMED)]) from None
    if not isinstance(data, Mapping):
        message = "must be a JSON object with an 'edits' list"
        raise SteeringSpecError([SpecIssue("", message, SpecErrorReason.MALFORMED)])
    try:
        return SteeringSpec.model_validate(data)
    except ValidationError as exc:
        raise SteeringSpecError(
            [SpecIssue(_path(e["loc"]), _message(e), _reason(e)) for e in exc.errors()]
        ) from None


def parse_spec(data: Any, limits: SpecLimits | None = None) -> SteeringSpec:
    """Validate raw JSON-like data (a dict, a SteeringSpec or a JSON string) into a SteeringSpec."""
    limits = limits or SpecLimits()
    spec = data if isinstance(data, SteeringSpec) else parse_spec_shape(data)
    errors: list[SpecIssue] = []
    if len(spec.edits) > limits.max_edits:
        message = f"at most {limits.max_edits} edits per request (got {len(spec.edits)})"
        errors.append(SpecIssue("edits", message, SpecErrorReason.TOO_MANY_EDITS))
    for index, edit in enumerate(spec.edits):
        where = f"edits[{index}].value"
        if edit.op is EditOp.ABLATE:
            if edit.value is not None:
                message = "not allowed with op 'ablate'"
                errors.append(SpecIssue(where, message, SpecErrorReason.INVALID_VALUE))
        elif edit.value is None:
            message = f"required with op '{edit.op.value}'"
            errors.append(SpecIssue(where, message, SpecErrorReason.MISSING_FIELD))
        elif abs(edit.value) > limits.max_abs_value:
            message = f"magnitude must be at most {limits.max_abs_value:g}"
            errors.append(SpecIssue(where, message, SpecErrorReason.VALUE_OUT_OF_RANGE))
    if spec.window is not None:
        errors.extend(_window_issues(spec.window, spec.apply_to, "window"))
    if spec.has_edit_scopes:
        errors.extend(_edit_scope_issues(spec))
    if errors:
        raise SteeringSpecError(errors)
    return _with_canonical_scopes(spec) if spec.has_edit_scopes else spec


def _edit_scope_issues(spec: SteeringSpec) -> list[SpecIssue]:
    """What is wrong with the edits' own scopes: their windows, and too many scopes."""
    issues: list[SpecIssue] = []
    for index, edit in enumerate(spec.edits):
        if edit.window is not None:
            apply_to = spec.scope_of(edit).apply_to
            issues.extend(_window_issues(edit.window, apply_to, f"edits[{index}].window"))
    scope_count = len(spec.scopes())
    if scope_count > MAX_SCOPES:
        message = (
            f"at most {MAX_SCOPES} distinct scopes (apply_to and window) per spec "
            f"(got {scope_count})"
        )
        issues.append(SpecIssue("edits", message, SpecErrorReason.TOO_MANY_SCOPES))
    return issues


def _with_canonical_scopes(spec: SteeringSpec) -> SteeringSpec:
    """The spec with each edit's own scope written one way: absent where it is the spec's,
    else with apply_to named and a whole-scope window dropped (so equal specs have one text)."""
    edits: list[FeatureEdit] = []
    for edit in spec.edits:
        scope = spec.scope_of(edit)
        own = {} if scope == (spec.apply_to, spec.window) else scope._asdict()
        if (edit.apply_to, edit.window) != (own.get("apply_to"), own.get("window")):
            edit = edit.model_copy(update={"apply_to": None, "window": None, **own})
        edits.append(edit)
    if all(new is old for new, old in zip(edits, spec.edits, strict=True)):
        return spec
    return spec.model_copy(update={"edits": edits})


def _window_issues(window: ScopeWindow, apply_to: ApplyTo, path: str) -> list[SpecIssue]:
    """What is wrong with a window in this scope: a negative offset outside `prompt`, or a
    window empty whatever the prompt's length."""
    issues: list[SpecIssue] = []
    if apply_to is not ApplyTo.PROMPT:
        for name, offset in (("start", window.start), ("end", window.end)):
            if offset is not None and offset < 0:
                message = (
                    "negative offsets count back from the prompt's end, "
                    f"so only apply_to 'prompt' takes them (the scope here is '{apply_to.value}')"
                )
                issues.append(SpecIssue(f"{path}.{name}", message, SpecErrorReason.INVALID_VALUE))
    end = window.end
    if end is not None and (window.start < 0) == (end < 0) and end <= window.start:
        message = f"must be greater than start ({window.start}): the window is empty"
        issues.append(SpecIssue(f"{path}.end", message, SpecErrorReason.INVALID_VALUE))
    return issues


def resolve_spec(
    data: Any, sae_sizes: Mapping[str, int], limits: SpecLimits | None = None
) -> SteeringSpec:
    """Validate a spec and bind it to the registered SAEs (id -> d_sae): fills omitted SAE ids,
    checks ids, feature ranges and duplicates. Returns a spec whose every edit names its SAE."""
    spec = parse_spec(data, limits)
    errors: list[SpecIssue] = []
    registered = ", ".join(sorted(sae_sizes)) or "none"
    seen: dict[tuple[str, int], int] = {}
    edits: list[FeatureEdit] = []
    for index, edit in enumerate(spec.edits):
        sae_id = edit.sae
        if sae_id is None:
            if len(sae_sizes) != 1:
                message = f"required when several SAEs are registered ({registered})"
                errors.append(
                    SpecIssue(f"edits[{index}].sae", message, SpecErrorReason.MISSING_FIELD)
                )
                continue
            sae_id = next(iter(sae_sizes))
        if sae_id not in sae_sizes:
            message = f"unknown SAE '{name_told(sae_id)}' (registered: {registered})"
            errors.append(SpecIssue(f"edits[{index}].sae", message, SpecErrorReason.UNKNOWN_SAE))
            continue
        d_sae = sae_sizes[sae_id]
        if edit.feature >= d_sae:
            message = f"{edit.feature} is out of range for SAE '{sae_id}' (d_sae {d_sae})"
            errors.append(
                SpecIssue(f"edits[{index}].feature", message, SpecErrorReason.FEATURE_OUT_OF_RANGE)
            )
            continue
        key = (sae_id, edit.feature)
        if key in seen:
            message = f"duplicate of edits[{seen[key]}] (sae '{sae_id}', feature {edit.feature})"
            errors.append(SpecIssue(f"edits[{index}]", message, SpecErrorReason.DUPLICATE_FEATURE))
            continue
        seen[key] = index
        edits.append(edit if edit.sae == sae_id else edit.model_copy(update={"sae": sae_id}))
    if errors:
        raise SteeringSpecError(errors)
    if all(new is old for new, old in zip(edits, spec.edits, strict=True)):
        return spec  # every edit named its SAE already (a spec resolved before)
    return spec.model_copy(update={"edits": edits})
