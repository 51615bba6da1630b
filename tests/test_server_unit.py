"""Server pieces without an engine: options, labels, rejection reasons, the gate, the SAE routes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from sae_vllm.config import (
    CONFIG_KEY,
    DROPPED_GENERATION_KEY,
    GENERATION_START_KEY,
    PREFIX_CACHE_KEY,
    SAEEntry,
    SteeringConfig,
    internal_keys_in,
)
from sae_vllm.server import rejections
from sae_vllm.server.errors import StartupError
from sae_vllm.server.labels import LabelFileError, default_labels_path, read_labels
from sae_vllm.server.options import (
    labels_argument,
    sae_argument,
    steering_additional_config,
    variant_argument,
)
from sae_vllm.server.registry import SAERegistry, load_record
from sae_vllm.server.routes import REGISTRY_STATE, router
from sae_vllm.server.steering import (
    Rejection,
    ResolvedVariant,
    SteeringGate,
    engine_rejection,
    resolve_variants,
)
from sae_vllm.spec import SpecErrorReason as Reason
from sae_vllm.spec import SpecLimits, SteeringSpec
from tiny_model import HIDDEN, write_random_sae

D_SAE = 64


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("unit-sae") / "sae"
    write_random_sae(directory, "relu", layer=1, d_sae=D_SAE)
    labels = {
        "features": {
            "3": {"label": "three", "top_tokens": ["w3", ["w4", 1.5]]},
            "7": {"label": "Sports teams"},
            "5": {"label": "team spirit"},
            "9": {"top_tokens": ["w9"]},  # no label text: listed, never matched
        }
    }
    (directory / "labels.json").write_text(json.dumps(labels))
    return directory


# --- options --------------------------------------------------------------------------------


def test_sae_argument_parses_id_path_and_layer(tmp_path):
    assert sae_argument(f"res={tmp_path}@12") == {"id": "res", "path": str(tmp_path), "layer": 12}
    assert sae_argument(f"res={tmp_path}") == {"id": "res", "path": str(tmp_path)}
    odd = tmp_path / "name@v2"  # an '@' not followed by digits belongs to the path
    assert sae_argument(f"res={odd}")["path"] == str(odd)
    assert sae_argument("res=rel/dir@3")["path"] == str(Path("rel/dir").absolute())


@pytest.mark.parametrize("text", ["res", "=path", "res=", ""])
def test_sae_argument_rejects_malformed(text):
    with pytest.raises(argparse.ArgumentTypeError):
        sae_argument(text)


@pytest.mark.parametrize("layer", ["-1", "1x", ""])
def test_sae_argument_says_a_bad_layer_is_one(tmp_path, layer):
    """It was read as part of the path: "…/sae@-1 does not exist"."""
    with pytest.raises(argparse.ArgumentTypeError) as info:
        sae_argument(f"res={tmp_path}@{layer}")
    assert f"the layer after '@' must be a non-negative integer, got '{layer}'" in str(info.value)
    existing = tmp_path / f"sae@{layer}"
    existing.mkdir()
    assert sae_argument(f"res={existing}")["path"] == str(existing)  # a path explains it


def test_labels_argument(tmp_path):
    assert labels_argument(f"res={tmp_path}/l.json") == ("res", f"{tmp_path}/l.json")
    with pytest.raises(argparse.ArgumentTypeError):
        labels_argument("res")


def test_additional_config_merges_with_the_users():
    user = {"other": 1, CONFIG_KEY: {"saes": [{"id": "a", "path": "/a", "layer": 1}]}}
    merged, config = steering_additional_config(
        user, [{"id": "b", "path": "/b"}], [("b", "/b.json")], max_edits=4
    )
    assert merged["other"] == 1
    assert config == SteeringConfig(
        saes=[SAEEntry(id="a", path="/a", layer=1), SAEEntry(id="b", path="/b", labels="/b.json")],
        max_edits=4,
    )
    assert SteeringConfig.model_validate(merged[CONFIG_KEY]) == config
    assert user[CONFIG_KEY]["saes"] == [{"id": "a", "path": "/a", "layer": 1}]  # not mutated


def test_additional_config_without_saes_is_steering_off():
    assert steering_additional_config({"x": 1}, [], [], None) == ({"x": 1}, None)


@pytest.mark.parametrize(
    ("saes", "labels", "max_edits", "needle"),
    [
        ([{"id": "a", "path": "/a"}, {"id": "a", "path": "/b"}], [], None, "duplicate SAE ids"),
        ([{"id": "a", "path": "/a"}], [("b", "/l")], None, "SAE 'b'"),
        ([{"id": "a", "path": "/a"}], [], 0, "max_edits"),
        ([], [], 8, "no SAE"),
        ([{"id": "bad id", "path": "/a"}], [], None, "saes.0.id"),
    ],
)
def test_additional_config_errors_are_one_line(saes, labels, max_edits, needle):
    with pytest.raises(StartupError) as info:
        steering_additional_config({}, saes, labels, max_edits)
    assert needle in str(info.value) and "\n" not in str(info.value)


ABLATE_2 = {"edits": [{"feature": 2, "op": "ablate"}]}


def test_variant_argument_takes_json_or_a_file(tmp_path):
    assert variant_argument(f"calm={json.dumps(ABLATE_2)}") == ("calm", ABLATE_2)
    spec_file = tmp_path / "calm.json"
    spec_file.write_text(json.dumps(ABLATE_2))
    assert variant_argument(f"org/calm={spec_file}") == ("org/calm", ABLATE_2)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("calm", "expected NAME=SPEC"),
        ("=x.json", "expected NAME=SPEC"),
        ("calm={not json", "variant 'calm': JSON is not valid JSON"),
        ("calm=/no/such/spec.json", "variant 'calm': No such file or directory: /no/such/spec"),
    ],
)
def test_variant_argument_rejects_malformed(text, needle):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        variant_argument(text)
    assert needle in str(info.value)


def test_additional_config_merges_variants_with_the_users():
    user = {CONFIG_KEY: {"saes": [{"id": "a", "path": "/a"}], "variants": {"x": ABLATE_2}}}
    merged, config = steering_additional_config(user, [], [], None, [("y", ABLATE_2)])
    assert set(config.variants) == {"x", "y"}
    assert config.variants["y"] == SteeringSpec.model_validate(ABLATE_2)
    assert SteeringConfig.model_validate(merged[CONFIG_KEY]) == config
    with pytest.raises(StartupError, match="steering variant 'x' is given twice"):
        steering_additional_config(user, [], [], None, [("x", ABLATE_2)])
    with pytest.raises(StartupError, match=r"variants\.x\.edits\.0\.op"):
        steering_additional_config(
            {},
            [{"id": "a", "path": "/a"}],
            [],
            None,
            [("x", {"edits": [{"feature": 1, "op": "boom"}]})],
        )
    with pytest.raises(StartupError, match="no SAE"):
        steering_additional_config({}, [], [], None, [("x", ABLATE_2)])


# --- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"features": {"2": {"label": "two", "top_tokens": [["a", 1.0], "b"]}}},
        {"2": {"description": "two", "tokens": [{"token": "a", "activation": 1.0}, "b"]}},
        [{"index": 2, "explanation": "two", "top_tokens": [{"text": "a", "score": 1}, "b"]}],
        {"features": [None, None, {"label": "two", "top_tokens": [["a", 1], ["b", None]]}]},
    ],
)
def test_read_labels_accepts_common_shapes(tmp_path, data):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    labels = read_labels(path)
    assert labels[2].label == "two"
    assert [(t.token, t.activation) for t in labels[2].top_tokens] == [("a", 1.0), ("b", None)]


def test_read_labels_toy_format(tmp_path):
    """The embedded default model's labels.json (sae_vllm/toy/labels.py: labels_document)."""
    document = {
        "sae_id": "toy", "layer": 1, "hook_name": "blocks.1.hook_resid_post",
        "topics": {"sea": {"feature": 1, "auroc": 0.99, "steering_value": 6.0}},
        "features": [
            {"index": 0, "top_tokens": [], "density": 0.0, "max_activation": 0.0, "topic": None,
             "label": "dead"},
            {"index": 1, "top_tokens": ["boat", "wave"], "density": 0.02, "max_activation": 4.5,
             "topic": "sea", "label": "topic: sea"},
        ],
    }  # fmt: skip
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(document))
    labels = read_labels(path)
    assert labels[1].label == "topic: sea" and labels[1].max_activation == 4.5
    assert [t.token for t in labels[1].top_tokens] == ["boat", "wave"]
    assert labels[1].density == 0.02 and labels[0].top_tokens == []


def test_read_labels_plain_strings(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "zero", "7": "seven"}))
    labels = read_labels(path)
    assert labels[7].label == "seven" and labels[7].top_tokens is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "not valid JSON"),
        ('{"x": "y"}', "not an integer"),
        ('{"-1": "a"}', "negative"),
        ("3", "expected"),
    ],
)
def test_read_labels_errors_name_the_file(tmp_path, text, needle):
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(LabelFileError) as info:
        read_labels(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_default_labels_path(tmp_path, sae_dir):
    assert default_labels_path(sae_dir) == sae_dir / "labels.json"
    assert default_labels_path(tmp_path) is None
    weights = tmp_path / "sae.pt"
    weights.write_bytes(b"")
    (tmp_path / "sae.labels.json").write_text("{}")
    assert default_labels_path(weights) == tmp_path / "sae.labels.json"


# --- registry -------------------------------------------------------------------------------


def test_registry_reads_sizes_norms_and_labels(sae_dir):
    from safetensors.numpy import load_file

    registry = SAERegistry.load(SteeringConfig(saes=[SAEEntry(id="r", path=str(sae_dir))]))
    record = registry.get("r")
    assert registry.sizes() == {"r": D_SAE}
    assert record.info.layer == 1 and record.info.d_in == HIDDEN and record.info.has_labels
    W_dec = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    assert np.allclose(record.decoder_norms, np.linalg.norm(W_dec, axis=1), rtol=1e-6)
    assert record.feature(3).label == "three"
    assert record.feature(4).label is None and record.feature(4).top_tokens is None
    assert record.feature(D_SAE) is None and record.feature(-1) is None


def test_registry_startup_errors(tmp_path, sae_dir):
    with pytest.raises(StartupError, match="does not exist"):
        load_record(SAEEntry(id="m", path=str(tmp_path / "missing")))
    with pytest.raises(StartupError, match="SAE 'e'"):
        load_record(SAEEntry(id="e", path=str(tmp_path)))  # an empty folder is no SAE
    registry = SAERegistry.load(SteeringConfig(saes=[SAEEntry(id="r", path=str(sae_dir))]))
    with pytest.raises(StartupError, match="d_in 128 does not match the model's hidden size 64"):
        registry.check_model(64, 4)
    with pytest.raises(StartupError, match="layer 1 does not exist"):
        registry.check_model(HIDDEN, 1)
    registry.check_model(HIDDEN, 2)


@pytest.mark.parametrize(
    ("tensor", "index", "named"),
    [
        ("W_enc", (5, 7), "W_enc at [5, 7] (as the file stores it) is NaN or infinite"),
        ("W_dec", (9, 2), "W_dec at [9, 2] (as the file stores it) is NaN or infinite"),
        ("b_enc", (3,), "b_enc at [3] (as the file stores it) is NaN or infinite"),
        ("b_dec", (0,), "b_dec at [0] (as the file stores it) is NaN or infinite"),
        ("threshold", (4,), "threshold at [4] (as the file stores it) is NaN or infinite"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_weight_is_a_one_line_startup_error(tmp_path, tensor, index, named, bad):
    """The worker found it only once the model had loaded, in vLLM's traceback of its start."""
    directory = tmp_path / "sae"
    write_random_sae(directory, "jumprelu", layer=1, d_sae=D_SAE)
    weights = directory / "sae_weights.safetensors"
    tensors = load_file(weights)
    tensors[tensor][index] = bad
    save_file(tensors, weights)
    with pytest.raises(StartupError) as info:
        load_record(SAEEntry(id="s", path=str(directory)))
    assert str(info.value).startswith("SAE 's': ") and named in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("hook", "layer", "refused"),
    [("blocks.3.hook_resid_pre", 2, None), ("blocks.3.hook_mlp_out", None, "hook_mlp_out")],
)
def test_registry_reports_the_layer_the_worker_steers(tmp_path, hook, layer, refused):
    directory = tmp_path / "sae"
    write_random_sae(directory, "relu", layer=3, d_sae=D_SAE)
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = hook
    (directory / "cfg.json").write_text(json.dumps(cfg))
    entry = SAEEntry(id="s", path=str(directory))
    if refused:
        with pytest.raises(StartupError, match=f"SAE 's'.*{refused}, not the output of a decoder"):
            load_record(entry)
    else:  # resid_pre of layer 3 is the output of layer 2
        assert load_record(entry).info.layer == layer


# --- rejection reasons and the gate -----------------------------------------------------------

SIZES = {"a": 16, "b": 32}
GATE = SteeringGate(SIZES, SpecLimits(max_edits=3, max_abs_value=100.0))


def edit(**fields):
    return {"sae": "a", "feature": 1, "op": "set", "value": 1.0} | fields


def xargs_of(spec: dict) -> dict:
    """A body's vllm_xargs carrying `spec` the low-level way, as JSON text."""
    return {"sae_steering": json.dumps(spec)}


REJECTED = [
    ("{", "steering", Reason.MALFORMED),
    (7, "steering", Reason.MALFORMED),
    ({}, "steering.edits", Reason.MISSING_FIELD),
    ({"edits": []}, "steering.edits", Reason.INVALID_VALUE),
    ({"edits": [edit(), edit(feature=2), edit(feature=3), edit(feature=4)]}, "steering.edits",
     Reason.TOO_MANY_EDITS),
    ({"edits": [edit(colour=1)]}, "steering.edits[0].colour", Reason.UNKNOWN_FIELD),
    ({"edits": [edit(op="explode")]}, "steering.edits[0].op", Reason.UNKNOWN_OP),
    ({"edits": [edit(feature="1")]}, "steering.edits[0].feature", Reason.INVALID_TYPE),
    ({"edits": [edit(feature=16)]}, "steering.edits[0].feature", Reason.FEATURE_OUT_OF_RANGE),
    ({"edits": [edit(feature=-1)]}, "steering.edits[0].feature", Reason.FEATURE_OUT_OF_RANGE),
    ({"edits": [edit(value=float("nan"))]}, "steering.edits[0].value", Reason.NON_FINITE),
    ({"edits": [edit(value="1")]}, "steering.edits[0].value", Reason.INVALID_TYPE),
    ({"edits": [edit(value=101)]}, "steering.edits[0].value", Reason.VALUE_OUT_OF_RANGE),
    ({"edits": [edit(op="ablate")]}, "steering.edits[0].value", Reason.INVALID_VALUE),
    ({"edits": [edit(value=None)]}, "steering.edits[0].value", Reason.MISSING_FIELD),
    ({"edits": [edit(sae="zz")]}, "steering.edits[0].sae", Reason.UNKNOWN_SAE),
    ({"edits": [edit(sae=None)]}, "steering.edits[0].sae", Reason.MISSING_FIELD),
    ({"edits": [edit(), edit()]}, "steering.edits[1]", Reason.DUPLICATE_FEATURE),
    ({"edits": [edit()], "apply_to": "x"}, "steering.apply_to", Reason.INVALID_VALUE),
]  # fmt: skip


@pytest.mark.parametrize(("steering", "param", "reason"), REJECTED)
def test_gate_rejects_with_field_and_reason(steering, param, reason):
    with pytest.raises(Rejection) as info:
        GATE.admit(steering)
    response = info.value.response_for("/v1/completions")
    body = json.loads(response.body)
    assert response.status_code == 400
    assert info.value.reason == reason
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == 400
    assert body["error"]["message"].startswith(param)


def test_a_rejection_names_ten_problems_however_many_the_body_holds():
    """100,000 unknown keys in a 1.2 MB body got a 3 MB message back."""
    steering = {"edits": [edit()]} | {str(i): 1 for i in range(100_000)}
    with pytest.raises(Rejection) as info:
        GATE.admit(steering)
    message = str(info.value)
    assert message.startswith("steering.0: unknown field; steering.1: unknown field; ")
    assert message.endswith("; and 99990 more problems") and len(message) < 400
    with pytest.raises(Rejection) as info:
        GATE.admit(None, xargs_of({"edits": [edit(**{str(i): 1 for i in range(11)})]}))
    assert str(info.value).startswith("vllm_xargs.sae_steering.edits[0].0: unknown field")
    assert str(info.value).endswith("; and 1 more problem")


def test_a_rejection_answers_in_the_shape_of_the_route():
    with pytest.raises(Rejection) as info:
        GATE.admit({"edits": [edit(feature=16)]})
    openai_style = json.loads(info.value.response_for("/v1/chat/completions").body)
    assert set(openai_style) == {"error"} and openai_style["error"]["code"] == 400
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = info.value.response_for(path)
        body = json.loads(response.body)
        assert response.status_code == 400
        assert body["type"] == "error"
        assert body["error"] == {
            "type": "invalid_request_error",
            "message": openai_style["error"]["message"],
            "param": "steering.edits[0].feature",
            "reason": "feature_out_of_range",
        }
    assert "code" in json.loads(info.value.response_for("/v1/messagesx").body)["error"]


def test_gate_admits_and_resolves():
    assert GATE.admit(None) is None
    text = GATE.admit({"edits": [{"sae": "b", "feature": 31, "op": "ablate"}]})
    spec = json.loads(text)
    assert spec["edits"] == [{"sae": "b", "feature": 31, "op": "ablate", "value": None}]
    assert spec["apply_to"] == "generated"
    as_string = GATE.admit(None, xargs_of({"edits": [edit()]}))
    assert json.loads(as_string)["edits"][0]["sae"] == "a"


def test_gate_refuses_two_specs_and_steering_without_saes():
    with pytest.raises(Rejection) as info:
        GATE.admit({"edits": [edit()]}, xargs_of({"edits": [edit()]}))
    assert info.value.reason == rejections.CONFLICT
    assert info.value.param == "vllm_xargs.sae_steering"
    with pytest.raises(Rejection) as info:
        SteeringGate({}, SpecLimits()).admit({"edits": [edit()]})
    assert info.value.reason == rejections.STEERING_DISABLED
    # both ways to start a server with SAEs: `vllm serve` has no --sae
    assert "sae-vllm serve with --sae ID=PATH" in str(info.value)
    assert 'vllm serve with --additional-config \'{"sae_steering"' in str(info.value)


@pytest.mark.parametrize(
    "key", ["sae_steering_generation_start", "sae_steering_drops_generation", "sae_steering_x"]
)
def test_gate_refuses_the_keys_sae_vllm_passes_between_its_processes(key):
    """A client's sae_steering_generation_start made the engine skip the reach check and move
    the generated scope; sae_steering_drops_generation made it refuse a reachable spec."""
    for steering, xargs in [
        ({"edits": [edit()]}, {key: 1}),
        (None, xargs_of({"edits": [edit()]}) | {key: 1}),
        (None, {key: 1}),
    ]:
        with pytest.raises(Rejection) as info:
            GATE.admit(steering, xargs)
        assert (info.value.reason, info.value.param) == ("reserved", f"vllm_xargs.{key}")
        assert str(info.value) == (
            f"vllm_xargs.{key}: reserved for sae-vllm's own use between its processes; send the "
            "spec as `steering`"
        )
    assert GATE.admit({"edits": [edit()]}, {"other_plugin_key": 1}) is not None
    assert internal_keys_in(
        {
            GENERATION_START_KEY: 1,
            DROPPED_GENERATION_KEY: 1,
            PREFIX_CACHE_KEY: 1,
            "sae_steering": "{}",
        }
    ) == [GENERATION_START_KEY, DROPPED_GENERATION_KEY, PREFIX_CACHE_KEY]


@pytest.mark.parametrize("key", ["steering", "sae-steering", "SAE_STEERING"])
def test_gate_refuses_a_vllm_xargs_key_meant_as_the_specs(key):
    """The engine refused it too, but with vLLM's 400, no reason and no count."""
    with pytest.raises(Rejection) as info:
        GATE.admit(None, {key: json.dumps({"edits": [edit()]})})
    assert (info.value.reason, info.value.param) == ("misplaced", f"vllm_xargs.{key}")
    assert str(info.value) == (
        f"vllm_xargs.{key}: no key of sae-vllm's; send the spec as `steering` (or as JSON text "
        "in vllm_xargs.sae_steering)"
    )


def test_variants_resolve_against_the_saes_at_startup():
    limits = SpecLimits(max_edits=3, max_abs_value=100.0)
    spec = SteeringSpec.model_validate({"edits": [edit(sae=None, feature=4)]})
    with pytest.raises(StartupError, match=r"steering variant 'v': edits\[0\]\.sae: required"):
        resolve_variants({"v": spec}, "m", ["m"], SIZES, limits)
    (variant,) = resolve_variants({"v": spec}, "m", ["m"], {"a": 16}, limits).values()
    assert variant.model == "m"
    assert json.loads(variant.spec)["edits"] == [
        {"sae": "a", "feature": 4, "op": "set", "value": 1.0}
    ]
    for bad, needle in [
        ({"edits": [edit(feature=16)]}, "edits[0].feature: 16 is out of range"),
        ({"edits": [edit(value=101)]}, "edits[0].value: magnitude must be at most 100"),
    ]:
        with pytest.raises(StartupError) as info:
            resolve_variants({"v": SteeringSpec.model_validate(bad)}, "m", ["m"], SIZES, limits)
        assert needle in str(info.value)
    with pytest.raises(StartupError, match="steering variant 'lora1': the name of a served model"):
        resolve_variants({"lora1": spec}, "m", ["m", "lora1"], {"a": 16}, limits)


def test_gate_hands_a_variant_its_spec_and_refuses_one_of_its_own():
    text = json.dumps({"edits": [edit(feature=5)], "apply_to": "all"})
    gate = SteeringGate(SIZES, SpecLimits(), {"v": ResolvedVariant("m", text)})
    assert gate.variant_named("v") == ResolvedVariant("m", text)
    assert gate.variant_named("m") is None and gate.variant_named(None) is None
    assert json.loads(gate.admit(None, variant="v")) == json.loads(text)
    own = {"edits": [edit()]}
    for steering, xargs, param in [
        (own, None, "steering"),
        (None, xargs_of(own), "vllm_xargs.sae_steering"),
    ]:
        with pytest.raises(Rejection) as info:
            gate.admit(steering, xargs, variant="v")
        assert info.value.reason == rejections.CONFLICT and info.value.param == param
    with pytest.raises(Rejection) as info:  # nested where no route reads it: still misplaced
        gate.admit(None, extra_body={"steering": {}}, variant="v")
    assert info.value.reason == rejections.MISPLACED


def test_gate_counts(monkeypatch):
    from prometheus_client import REGISTRY

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        value("sae_steering_steered_requests_total", endpoint="completions"),
        value("sae_steering_unsteered_requests_total", endpoint="completions"),
        value("sae_steering_edits_per_request_sum"),
        value("sae_steering_rejected_specs_total", reason=Reason.UNKNOWN_SAE),
    )
    steered = GATE.admit({"edits": [edit(), edit(feature=2)]})
    unsteered = GATE.admit(None)
    with pytest.raises(Rejection):
        GATE.admit({"edits": [edit(sae="zz")]})
    assert value("sae_steering_steered_requests_total", endpoint="completions") == before[0]
    GATE.record_admitted("completions", steered, None)  # once vLLM took them on
    GATE.record_admitted("completions", unsteered, None)
    after = (
        value("sae_steering_steered_requests_total", endpoint="completions"),
        value("sae_steering_unsteered_requests_total", endpoint="completions"),
        value("sae_steering_edits_per_request_sum"),
        value("sae_steering_rejected_specs_total", reason=Reason.UNKNOWN_SAE),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 2, 1]


def test_every_reason_is_exported_from_the_start():
    from prometheus_client import REGISTRY

    for reason in rejections.REASONS:
        labels = {"reason": reason}
        assert REGISTRY.get_sample_value("sae_steering_rejected_specs_total", labels) is not None


# --- routes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(sae_dir) -> TestClient:
    app = FastAPI()
    config = SteeringConfig(saes=[SAEEntry(id="r", path=str(sae_dir), layer=2)])
    setattr(app.state, REGISTRY_STATE, SAERegistry.load(config))
    app.include_router(router)
    return TestClient(app)


def test_route_lists_saes(client):
    response = client.get("/v1/saes")
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {"object": "sae", "id": "r", "layer": 2, "architecture": "relu", "k": None,
             "format": "saelens", "hook_name": "blocks.1.hook_resid_post", "dtype": "float32",
             "d_in": HIDDEN, "d_sae": D_SAE, "has_labels": True},
        ],
    }  # fmt: skip


def test_route_feature(client):
    body = client.get("/v1/saes/r/features/3").json()
    assert body["label"] == "three" and body["index"] == 3 and body["sae"] == "r"
    assert body["top_tokens"] == [
        {"token": "w3", "activation": None},
        {"token": "w4", "activation": 1.5},
    ]
    assert body["decoder_norm"] > 0


@pytest.mark.parametrize(
    ("query", "indexes"),
    [
        ("?q=team", [5, 7]),  # by index, any case
        ("?q=TEAM&limit=1", [5]),
        ("?q=three", [3]),
        ("?q=golf", []),
        ("", [3, 5, 7, 9]),  # every labelled feature
        ("?limit=2", [3, 5]),
    ],
)
def test_route_searches_feature_labels(client, query, indexes):
    response = client.get("/v1/saes/r/features" + query)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and [f["index"] for f in body["data"]] == indexes
    assert all(f["sae"] == "r" and f["decoder_norm"] > 0 for f in body["data"])


@pytest.mark.parametrize("query", ["?limit=0", "?limit=1001", "?limit=x"])
def test_route_search_refuses_bad_limits(client, query):
    assert client.get("/v1/saes/r/features" + query).status_code == 422


@pytest.mark.parametrize(
    ("path", "param"),
    [("/v1/saes/x/features", "sae_id"), ("/v1/saes/x/features/1", "sae_id"),
     (f"/v1/saes/r/features/{D_SAE}", "index"), ("/v1/saes/r/features/-1", "index")],
)  # fmt: skip
def test_route_not_found(client, path, param):
    response = client.get(path)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == 404 and error["message"]


def test_the_gate_survives_pickling_into_another_api_server_process():
    # With --api-server-count > 1 (data parallelism), vLLM pickles the app's state to each.
    import pickle

    GATE.admit({"edits": [edit()]})
    copy = pickle.loads(pickle.dumps(GATE))
    assert json.loads(copy.admit({"edits": [edit()]}))["edits"][0]["sae"] == "a"
    with pytest.raises(Rejection):
        copy.admit({"edits": [edit(sae="zz")]})
    variant = ResolvedVariant("m", json.dumps({"edits": [edit()], "apply_to": "all"}))
    with_variant = pickle.loads(pickle.dumps(SteeringGate(SIZES, SpecLimits(), {"v": variant})))
    assert with_variant.variant_named("v") == variant
    assert json.loads(with_variant.admit(None, variant="v"))["apply_to"] == "all"


def test_every_steered_route_exports_its_counters_at_zero():
    """A dashboard's rate over a steered route reads 0 before its first request, not nothing."""
    from prometheus_client import REGISTRY

    from sae_vllm.server import metrics
    from sae_vllm.server.vllm_app import STEERED_ROUTES

    for _, endpoint in STEERED_ROUTES.values():
        assert endpoint in metrics.ENDPOINTS
        for kind in ("steered", "unsteered"):
            name = f"sae_steering_{kind}_requests_total"
            assert REGISTRY.get_sample_value(name, {"endpoint": endpoint}) is not None, name


@pytest.mark.parametrize(
    ("start", "reason"),
    [
        ("steering: steers no position of this request: its prompt has 3 tokens", "steers_nothing"),
    ],
)
def test_the_engines_refusals_of_a_spec_get_the_gates_shape_and_reason(start, reason):
    """vLLM's frontend refuses these once the prompt is tokenized, past the gate; the server
    answers with the gate's shape, naming where the spec came from."""
    rejection = engine_rejection(f"{start} and so on (parameter=steering)", "vllm_xargs")
    assert rejection is not None and rejection.reason == reason
    assert str(rejection) == f"vllm_xargs: {start.removeprefix('steering: ')} and so on"
    assert rejection.param == "vllm_xargs"
    assert engine_rejection("steering: edits[0].feature: out of range", "steering") is None
