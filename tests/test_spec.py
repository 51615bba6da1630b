"""The steering spec: every validation rule, with valid and invalid examples."""

from __future__ import annotations

import json
import math

import pytest

from sae_vllm.spec import (
    ApplyTo,
    EditOp,
    ScopeWindow,
    SpecErrorReason,
    SpecLimits,
    SteeringSpecError,
    name_told,
    parse_spec,
    resolve_spec,
)

SIZES = {"res12": 4096}
TWO_SAES = {"res12": 4096, "res20": 1024}


def edit(**overrides):
    base = {"sae": "res12", "feature": 7, "op": "set", "value": 8.0}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def test_worked_example_from_the_readme():
    spec = resolve_spec(
        {
            "edits": [
                {"sae": "res12", "feature": 1234, "op": "set", "value": 8.0},
                {"sae": "res12", "feature": 77, "op": "ablate"},
            ],
            "apply_to": "generated",
        },
        SIZES,
    )
    assert [e.op for e in spec.edits] == [EditOp.SET, EditOp.ABLATE]
    assert spec.edits[1].value is None
    assert spec.apply_to is ApplyTo.GENERATED


@pytest.mark.parametrize("op", ["set", "add", "scale", "floor", "cap"])
def test_every_valued_op_accepts_a_finite_value(op):
    spec = parse_spec({"edits": [edit(op=op, value=-2)]})
    assert spec.edits[0].op.value == op and spec.edits[0].value == -2.0


def test_apply_to_defaults_to_generated_and_accepts_all_scopes():
    assert parse_spec({"edits": [edit()]}).apply_to is ApplyTo.GENERATED
    for scope in ("generated", "all", "prompt"):
        assert parse_spec({"edits": [edit()], "apply_to": scope}).apply_to.value == scope


def test_json_string_input_is_accepted():
    spec = parse_spec(json.dumps({"edits": [edit()]}))
    assert spec.edits[0].feature == 7


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        ({"edits": [edit(value=math.nan)]}, "edits[0].value", "must be finite"),
        ({"edits": [edit(value=math.inf)]}, "edits[0].value", "must be finite"),
        ({"edits": [edit(), edit(feature=8, value=-math.inf)]}, "edits[1].value", "finite"),
        ({"edits": [edit(value="8")]}, "edits[0].value", "must be a number"),
        ({"edits": [edit(value=True)]}, "edits[0].value", "must be a number"),
        ({"edits": [edit(value=...)]}, "edits[0].value", "required with op 'set'"),
        ({"edits": [edit(op="ablate", value=1.0)]}, "edits[0].value", "not allowed"),
        ({"edits": [edit(value=1e9)]}, "edits[0].value", "at most"),
        ({"edits": [edit(value=10**400)]}, "edits[0].value", "must fit a float"),
        ({"edits": [edit(value=-(10**400))]}, "edits[0].value", "must fit a float"),
        ({"edits": [edit(op="boost")]}, "edits[0].op", ""),
        ({"edits": [edit(feature=-1)]}, "edits[0].feature", ""),
        ({"edits": [edit(feature=1.5)]}, "edits[0].feature", ""),
        ({"edits": [edit(feature="7")]}, "edits[0].feature", ""),
        ({"edits": [edit(feature=...)]}, "edits[0].feature", "field required"),
        ({"edits": [edit(valeu=1.0)]}, "edits[0].valeu", "unknown field"),
        ({"edits": [edit()], "apply_too": "all"}, "apply_too", "unknown field"),
        ({"edits": [edit()], "apply_to": "decode"}, "apply_to", ""),
        ({"edits": []}, "edits", ""),
        ({"edits": "set 7"}, "edits", ""),
        ({}, "edits", "field required"),
        ([1, 2], "", "JSON object"),
        ("{not json", "", "not valid JSON"),
        ("[" * 5000 + "]" * 5000, "", "not valid JSON: nested too deeply"),
        ({"edits": [edit(sae="")]}, "edits[0].sae", ""),
        ({"edits": [edit()], "window": {"start": -2}}, "window.start", "only apply_to 'prompt'"),
        (
            {"edits": [edit()], "apply_to": "all", "window": {"start": 1, "end": -1}},
            "window.end",
            "only apply_to 'prompt'",
        ),
        (
            {"edits": [edit()], "window": {"start": 4, "end": 4}},
            "window.end",
            "must be greater than start (4): the window is empty",
        ),
        (
            {"edits": [edit()], "apply_to": "prompt", "window": {"start": -2, "end": -3}},
            "window.end",
            "window is empty",
        ),
        ({"edits": [edit()], "window": {"start": 1.0}}, "window.start", "valid integer"),
        ({"edits": [edit()], "window": {"end": "8"}}, "window.end", "valid integer"),
        ({"edits": [edit()], "window": {"end": 2**40}}, "window.end", "less than or equal"),
        ({"edits": [edit()], "window": {"first": 8}}, "window.first", "unknown field"),
        ({"edits": [edit()], "window": [0, 8]}, "window", ""),
        (
            {"edits": [edit(), edit(feature=8, window={"start": -2})]},
            "edits[1].window.start",
            "only apply_to 'prompt'",
        ),
        (
            {"edits": [edit(apply_to="prompt", window={"start": 3, "end": 1})]},
            "edits[0].window.end",
            "window is empty",
        ),
        ({"edits": [edit(apply_to="decode")]}, "edits[0].apply_to", ""),
        ({"edits": [edit(window={"end": 2.5})]}, "edits[0].window.end", "valid integer"),
        ({"edits": [edit(window={"stop": 2})]}, "edits[0].window.stop", "unknown field"),
        (
            {"edits": [edit(feature=i, window={"end": i + 1}) for i in range(5)]},
            "edits",
            "at most 4 distinct scopes",
        ),
    ],
)
def test_invalid_specs_name_the_offending_field(data, path, fragment):
    with pytest.raises(SteeringSpecError) as info:
        parse_spec(data)
    assert info.value.field == path
    assert fragment in str(info.value)
    if path:
        assert str(info.value).startswith(f"{path}: ")
    if not isinstance(data, str):  # the same spec sent as JSON text: the same errors
        with pytest.raises(SteeringSpecError) as as_text:
            parse_spec(json.dumps(data))
        assert as_text.value.errors == info.value.errors


@pytest.mark.parametrize(
    "data",
    [
        {"edits": [edit(value=8)]},
        {"edits": [edit(feature=7.0)]},
        {"edits": [edit(feature=2**70)]},
        {"edits": [edit(op="ablate", value=None)], "apply_to": "all"},
        {"apply_to": "prompt", "edits": [edit(sae="res"), edit(feature=9, op="cap", value=-0.5)]},
        {"edits": [{"value": 1e-300, "op": "floor", "feature": 0}]},
        {"edits": [edit(value="1.5")]},
        {"edits": [edit()], "apply_to": "ALL"},
        {"edits": [edit()], "window": {"start": 2, "end": 9}},
        {"edits": [edit()], "window": {"start": True}},
    ],
)
def test_json_text_and_the_dict_it_encodes_parse_alike(data):
    def outcome(value):
        try:
            return parse_spec(value)
        except SteeringSpecError as exc:
            return exc.errors

    assert outcome(json.dumps(data, indent=1)) == outcome(data)


def test_magnitude_bound_is_configurable():
    limits = SpecLimits(max_abs_value=10)
    assert parse_spec({"edits": [edit(value=10)]}, limits).edits[0].value == 10
    with pytest.raises(SteeringSpecError, match=r"edits\[0\].value: magnitude must be at most 10"):
        parse_spec({"edits": [edit(value=10.5)]}, limits)


def test_edit_count_is_bounded_by_max_edits():
    edits = [edit(feature=i) for i in range(33)]
    with pytest.raises(SteeringSpecError, match=r"edits: at most 32 edits per request \(got 33\)"):
        parse_spec({"edits": edits})
    assert len(parse_spec({"edits": edits[:32]}).edits) == 32
    assert len(parse_spec({"edits": edits}, SpecLimits(max_edits=40)).edits) == 33


def test_sae_may_be_omitted_when_one_sae_is_registered():
    spec = resolve_spec({"edits": [edit(sae=None)]}, SIZES)
    assert spec.edits[0].sae == "res12"


def test_sae_is_required_when_several_are_registered():
    with pytest.raises(SteeringSpecError, match=r"edits\[0\].sae: required when several"):
        resolve_spec({"edits": [edit(sae=None)]}, TWO_SAES)
    spec = resolve_spec({"edits": [edit(sae="res20", feature=1023)]}, TWO_SAES)
    assert spec.edits[0].sae == "res20"


def test_unknown_sae_id_is_rejected():
    with pytest.raises(SteeringSpecError, match=r"edits\[0\].sae: unknown SAE 'res13'"):
        resolve_spec({"edits": [edit(sae="res13")]}, SIZES)


def test_feature_must_be_below_d_sae():
    assert resolve_spec({"edits": [edit(feature=4095)]}, SIZES).edits[0].feature == 4095
    with pytest.raises(SteeringSpecError, match=r"edits\[0\].feature: 4096 is out of range"):
        resolve_spec({"edits": [edit(feature=4096)]}, SIZES)


def test_duplicate_sae_feature_pairs_are_rejected():
    data = {"edits": [edit(), edit(op="add", value=1.0), edit(feature=8)]}
    with pytest.raises(SteeringSpecError, match=r"edits\[1\]: duplicate of edits\[0\]"):
        resolve_spec(data, SIZES)
    # The same feature index on two different SAEs is not a duplicate.
    two = {"edits": [edit(sae="res12"), edit(sae="res20")]}
    assert len(resolve_spec(two, TWO_SAES).edits) == 2


def test_duplicate_detected_when_sae_is_implicit():
    with pytest.raises(SteeringSpecError, match="duplicate"):
        resolve_spec({"edits": [edit(sae=None), edit(sae="res12")]}, SIZES)


def test_all_errors_are_reported_together():
    with pytest.raises(SteeringSpecError) as info:
        resolve_spec({"edits": [edit(sae="nope"), edit(feature=99999)]}, SIZES)
    assert [issue.path for issue in info.value.errors] == ["edits[0].sae", "edits[1].feature"]
    assert [issue.reason for issue in info.value.errors] == [
        SpecErrorReason.UNKNOWN_SAE,
        SpecErrorReason.FEATURE_OUT_OF_RANGE,
    ]
    assert info.value.reason is SpecErrorReason.UNKNOWN_SAE


def test_a_message_names_ten_problems_and_shortens_what_the_client_named():
    """A body of hundreds of bad keys, each 100,000 characters long, gets a short message; the
    problems all stay in `errors`."""
    long_key = "k" * 100_000
    data = {"edits": [edit()]} | {f"{long_key}{i}": 1 for i in range(300)}
    with pytest.raises(SteeringSpecError) as caught:
        parse_spec(data)
    assert len(caught.value.errors) == 300 and len(str(caught.value)) < 1000
    assert str(caught.value).endswith("; and 290 more problems")
    assert str(caught.value).count(": unknown field") == 10
    assert caught.value.field == "k" * 63 + "…" and name_told("k" * 64) == "k" * 64
    with pytest.raises(SteeringSpecError, match=r"unknown SAE 'x{63}…' \(registered: res12\)"):
        resolve_spec({"edits": [edit(sae="x" * 100)]}, SIZES)


def test_every_error_carries_a_reason_code_without_reading_its_message():
    cases = {
        '{"edits": [': SpecErrorReason.MALFORMED,
        '{"edits": [{"feature": 1, "op": "ablate", "x": 1}]}': SpecErrorReason.UNKNOWN_FIELD,
        '{"edits": [{"feature": 1, "op": "set", "value": "big"}]}': SpecErrorReason.INVALID_TYPE,
        '{"edits": [{"feature": 1, "op": "set", "value": NaN}]}': SpecErrorReason.NON_FINITE,
        '{"edits": [{"feature": -1, "op": "set", "value": 1}]}': (
            SpecErrorReason.FEATURE_OUT_OF_RANGE
        ),
        '{"edits": [{"feature": 1, "op": "boost", "value": 1}]}': SpecErrorReason.UNKNOWN_OP,
        '{"edits": [{"feature": 1, "op": "set"}]}': SpecErrorReason.MISSING_FIELD,
        '{"edits": [{"feature": 1, "op": "set", "value": 1e9}]}': (
            SpecErrorReason.VALUE_OUT_OF_RANGE
        ),
        '{"edits": [{"feature": 1, "op": "set", "value": 1' + "0" * 400 + "}]}": (
            SpecErrorReason.VALUE_OUT_OF_RANGE
        ),
        '{"edits": [{"feature": 1, "op": "set", "value": 1}], "apply_to": null}': (
            SpecErrorReason.INVALID_TYPE
        ),
        '{"edits": [{"feature": 1, "op": null, "value": 1}]}': SpecErrorReason.INVALID_TYPE,
        '{"edits": [{"feature": 1, "op": "set", "value": 1}], "apply_to": "x"}': (
            SpecErrorReason.INVALID_VALUE
        ),
        '{"edits": [{"feature": 1, "op": "ablate"}], "window": {"start": -1}}': (
            SpecErrorReason.INVALID_VALUE
        ),
        '{"edits": [{"feature": 1, "op": "ablate"}], "window": {"end": 0}}': (
            SpecErrorReason.INVALID_VALUE
        ),
        '{"edits": [{"feature": 1, "op": "ablate"}], "window": {"end": 1e3}}': (
            SpecErrorReason.INVALID_TYPE
        ),
        '{"edits": [{"feature": 1, "op": "ablate"}], "window": {"end": 9999999999}}': (
            SpecErrorReason.VALUE_OUT_OF_RANGE
        ),
        '{"edits": [{"feature": 1, "op": "ablate", "window": {"start": -1}}]}': (
            SpecErrorReason.INVALID_VALUE
        ),
        json.dumps(
            {"edits": [{"feature": i, "op": "ablate", "window": {"end": i + 1}} for i in range(5)]}
        ): SpecErrorReason.TOO_MANY_SCOPES,
    }
    for raw, reason in cases.items():
        with pytest.raises(SteeringSpecError) as info:
            parse_spec(raw)
        assert info.value.reason is reason, (raw, info.value.errors)


def test_fingerprint_ignores_formatting_and_tracks_meaning():
    a = parse_spec({"edits": [edit()], "apply_to": "generated"})
    b = parse_spec(json.dumps({"apply_to": "generated", "edits": [edit(value=8)]}))
    c = parse_spec({"edits": [edit(value=8.5)]})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_a_window_slices_the_scope_and_travels_in_the_spec_text():
    spec = parse_spec({"edits": [edit()], "apply_to": "prompt", "window": {"start": -8}})
    assert (spec.window.start, spec.window.end) == (-8, None)
    assert parse_spec(spec.model_dump_json()) == spec
    first = parse_spec({"edits": [edit()], "window": {"end": 16}})
    assert (first.window.start, first.window.end) == (0, 16)
    assert first.fingerprint() != parse_spec({"edits": [edit()]}).fingerprint()


def test_a_window_over_the_whole_scope_is_the_spec_without_one():
    plain = parse_spec({"edits": [edit()], "apply_to": "all"})
    for window in ({}, {"start": 0}, {"start": 0, "end": None}):
        same = parse_spec({"edits": [edit()], "apply_to": "all", "window": window})
        assert same.window is None
        assert same.model_dump_json() == plain.model_dump_json()
        assert same.fingerprint() == plain.fingerprint()
    # A spec without a window keeps the text (and so the KV keys) it had before windows existed.
    assert "window" not in plain.model_dump_json()


def test_a_prompt_window_may_mix_signs_whatever_the_prompt_length():
    # [2, -1): empty for prompts of 3 tokens or fewer, which only the prompt's length can say.
    spec = parse_spec({"edits": [edit()], "apply_to": "prompt", "window": {"start": 2, "end": -1}})
    assert (spec.window.start, spec.window.end) == (2, -1)


def test_an_edit_may_have_a_scope_of_its_own():
    spec = parse_spec(
        {
            "edits": [
                edit(),
                edit(feature=8, op="ablate", value=None, apply_to="all"),
                edit(feature=9, window={"end": 4}),
            ],
            "window": {"start": 2},
        }
    )
    own, everywhere, first_four = spec.edits
    assert spec.scope_of(own) == (ApplyTo.GENERATED, ScopeWindow(start=2))
    assert spec.scope_of(everywhere) == (ApplyTo.ALL, None)  # its own scope: no window
    assert spec.scope_of(first_four) == (ApplyTo.GENERATED, ScopeWindow(end=4))
    assert [(scope.apply_to, [e.feature for e in edits]) for scope, edits in spec.scopes()] == [
        (ApplyTo.GENERATED, [7]),
        (ApplyTo.ALL, [8]),
        (ApplyTo.GENERATED, [9]),
    ]
    assert parse_spec(spec.model_dump_json()) == spec


def test_an_edits_own_scope_is_written_one_way():
    """An edit scope equal to the spec's is dropped; any other names its apply_to, and a window
    over its whole scope is none. Equal meanings, one text and fingerprint."""
    plain = parse_spec({"edits": [edit(), edit(feature=8)], "apply_to": "all"})
    for same_scope in ({"apply_to": "all"}, {"window": {}}, {"apply_to": "all", "window": {}}):
        same = parse_spec({"edits": [edit(), edit(feature=8, **same_scope)], "apply_to": "all"})
        assert same.model_dump_json() == plain.model_dump_json()
    windowed = {"edits": [edit(), edit(feature=8)], "window": {"end": 4}}
    whole = parse_spec({**windowed, "edits": [edit(), edit(feature=8, window={})]})
    named = parse_spec({**windowed, "edits": [edit(), edit(feature=8, apply_to="generated")]})
    assert whole.model_dump_json() == named.model_dump_json()
    assert whole.fingerprint() != parse_spec(windowed).fingerprint()
    assert whole.edits[1].apply_to is ApplyTo.GENERATED and whole.edits[1].window is None
    # Without scopes of their own, edits keep the text they had before edits could have one.
    assert "apply_to" not in json.dumps(json.loads(plain.model_dump_json())["edits"])


def test_scopes_are_counted_after_equal_ones_merge():
    four = [edit(feature=i, window={"end": i % 4 + 1}) for i in range(8)]
    assert len(parse_spec({"edits": four}).scopes()) == 4
    with pytest.raises(SteeringSpecError) as info:
        parse_spec({"edits": [*four, edit(feature=9, apply_to="all")]})
    assert info.value.reason is SpecErrorReason.TOO_MANY_SCOPES


def test_the_spec_limits_and_the_engine_config_bound_max_edits_alike():
    """A server's edit tables are max_edits wide; the library's limits take no more."""
    from pydantic import ValidationError

    from sae_vllm.config import SteeringConfig
    from sae_vllm.spec import MAX_EDITS_BOUND, SpecLimits

    saes = [{"id": "a", "path": "a"}]
    assert SpecLimits(max_edits=MAX_EDITS_BOUND).max_edits == MAX_EDITS_BOUND
    assert SteeringConfig(saes=saes, max_edits=MAX_EDITS_BOUND).limits.max_edits == MAX_EDITS_BOUND
    for build in (SpecLimits, lambda **kw: SteeringConfig(saes=saes, **kw)):
        with pytest.raises(ValidationError, match="less than or equal to 256"):
            build(max_edits=MAX_EDITS_BOUND + 1)
