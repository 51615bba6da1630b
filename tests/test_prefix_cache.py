"""Prefix-cache keys of steered requests: which KV blocks are keyed, through vLLM's own hasher.

No engine here: vLLM's real Request and block hasher, and the real intake on a real
EngineCoreRequest (the engine-level behaviour is in test_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sae_vllm.config import EXTRA_ARGS_KEY, GENERATION_START_KEY, PREFIX_CACHE_KEY
from sae_vllm.engine import intake, prefix_cache
from sae_vllm.engine import vllm_adapter as vllm
from sae_vllm.engine.tables import SteeringTables
from sae_vllm.resolved_specs import SpecResolver
from sae_vllm.spec import SpecLimits
from tiny_model import stand_in_vllm_config

BLOCK = 16
SIZES = {"a": 64}


def spec(apply_to="generated", value=2.0, window=None):
    data = {
        "edits": [{"sae": "a", "feature": 3, "op": "set", "value": value}],
        "apply_to": apply_to,
    }
    if window is not None:
        data["window"] = window
    return SpecResolver(SIZES, SpecLimits()).resolve(data)


def fields(apply_to="generated", num_prompt=48, start=None, value=2.0, window=None):
    return prefix_cache.key_fields(spec(apply_to, value, window), num_prompt, start)


def keys(fields_, num_tokens):
    """block_key of each full block of a request with `num_tokens` tokens."""
    extra_args = {} if fields_ is None else {PREFIX_CACHE_KEY: fields_}
    return [
        prefix_cache.block_key(extra_args, start, start + BLOCK)
        for start in range(0, num_tokens - BLOCK + 1, BLOCK)
    ]


SCOPES_AND_WINDOWS = [
    ("generated", None),
    ("all", None),
    ("prompt", None),
    ("generated", {"end": 3}),
    ("generated", {"start": 2, "end": 6}),
    ("all", {"start": 3}),
    ("prompt", {"start": -3}),
    ("prompt", {"start": 1, "end": -1}),
    ("prompt", {"start": 7}),  # past the shorter prompts' end: nothing steered
]


@pytest.mark.parametrize(("apply_to", "window"), SCOPES_AND_WINDOWS)
@pytest.mark.parametrize(("num_prompt", "start"), [(5, None), (9, None), (12, 4), (1, None)])
def test_key_fields_span_is_the_worker_scope_mask(apply_to, window, num_prompt, start):
    # One request prefilled over 20 positions (past its prompt, as a recompute after
    # preemption is): the worker's scope mask must be exactly lo <= position < hi.
    tables = SteeringTables(["a"], 2, max_edits=2, max_tokens=32, device="cpu")
    tables.admit("r", spec(apply_to, window=window).spec, num_prompt, start)
    tables.write_step(["r"], np.array([20]), np.array([0]))
    mask = tables.tok_scope[:20].numpy()
    _, lo, hi = prefix_cache.key_fields(spec(apply_to, window=window), num_prompt, start)
    positions = np.arange(20)
    expected = (positions >= lo) & (positions < (np.inf if hi is None else hi))
    assert mask.tolist() == expected.tolist()


@pytest.mark.parametrize("tail_start", [-8, -3, -1])
@pytest.mark.parametrize("num_prompt", [2, 9, 14])
def test_each_scopes_key_span_is_where_the_worker_steers_its_edits(num_prompt, tail_start):
    data = {
        "edits": [
            {"sae": "a", "feature": 3, "op": "set", "value": 2.0, "window": {"start": 1}},
            {"sae": "a", "feature": 4, "op": "ablate", "apply_to": "prompt",
             "window": {"start": tail_start}},
        ]
    }  # fmt: skip
    steering = SpecResolver(SIZES, SpecLimits()).resolve(data)
    tables = SteeringTables(["a"], 6, max_edits=2, max_tokens=32, device="cpu")
    tables.admit("r", steering.spec, num_prompt)
    tables.write_step(["r"], np.array([20]), np.array([0]))
    rows = tables.tok_row[:20].numpy()
    features = tables.tables["a"].feature.numpy()
    _, lo3, hi3, lo4, hi4 = prefix_cache.key_fields(steering, num_prompt, None)
    for position, row in enumerate(rows):
        steered = set() if row < 0 else set(features[row][features[row] >= 0].tolist())
        expected = {
            feature
            for feature, lo, hi in ((3, lo3, hi3), (4, lo4, hi4))
            if lo <= position < (np.inf if hi is None else hi)
        }
        assert steered == expected, position


def test_generated_scope_keys_the_block_of_the_last_prompt_position_and_after():
    ks = keys(fields("generated", num_prompt=40), 80)
    # positions 0..38 are not steered: blocks 0 and 1 (0..31) stay unkeyed; 39 is in block 2
    assert ks[:2] == [None, None]
    assert all(k is not None for k in ks[2:])
    assert len(set(ks[2:])) == len(ks[2:])


def test_all_and_prompt_scopes_key_every_block():
    assert None not in keys(fields("all"), 64)
    assert None not in keys(fields("prompt"), 64)


def test_keys_follow_the_spec_and_the_steered_positions():
    base = keys(fields("generated", 40), 64)
    assert keys(fields("generated", 40, value=3.0), 64)[2:] != base[2:]  # another spec
    assert keys(fields("generated", 41), 64)[2] != base[2]  # steered from 40, not 39
    assert keys(fields("generated", 60, start=40), 64) == base  # a beam step: same span
    assert keys(fields("all"), 64) == keys(fields("all", num_prompt=7), 64)  # span [0, inf)


def test_a_generated_window_keys_the_blocks_from_its_first_steered_position_on():
    # Prompt 40: the window steers positions 41..42 (generated tokens 2 and 3), in block 2.
    ks = keys(fields("generated", 40, window={"start": 2, "end": 4}), 80)
    assert ks[:2] == [None, None] and None not in ks[2:]
    # Later blocks attend to the steered positions: keyed, and by that window alone.
    assert keys(fields("generated", 40, window={"start": 2, "end": 5}), 80)[2:] != ks[2:]
    # A window starting in block 3 leaves block 2 shared with unsteered requests.
    assert keys(fields("generated", 40, window={"start": 10}), 80)[:3] == [None] * 3


def test_a_window_that_steers_nothing_keys_nothing():
    assert keys(fields("prompt", 20, window={"start": 30}), 64) == [None] * 4


def test_prompt_scope_blocks_are_shared_while_the_steered_positions_agree():
    # Prompts of 40 and 60 tokens steer [0, 40) and [0, 60): same KV in blocks 0 and 1 (0..31);
    # block 2 (32..47) is steered up to 40 in one and entirely in the other.
    short, long = keys(fields("prompt", 40), 64), keys(fields("prompt", 60), 64)
    assert short[:2] == long[:2]
    assert short[2] != long[2] and short[3] != long[3]


def two_scope_fields(num_prompt, tail_start):
    """A spec whose first edit has the spec's scope (generated) and whose second steers the
    prompt's last positions from `tail_start` on."""
    data = {
        "edits": [
            {"sae": "a", "feature": 3, "op": "set", "value": 2.0},
            {"sae": "a", "feature": 4, "op": "ablate", "apply_to": "prompt",
             "window": {"start": tail_start}},
        ]
    }  # fmt: skip
    steering = SpecResolver(SIZES, SpecLimits()).resolve(data)
    return prefix_cache.key_fields(steering, num_prompt, None)


def test_a_spec_with_scoped_edits_keys_each_scopes_span():
    fields_ = two_scope_fields(40, -8)  # generated from 39 on; the prompt's 32..39
    assert fields_[1:] == [39, None, 32, 40]
    ks = keys(fields_, 80)
    assert ks[:2] == [None, None] and None not in ks[2:]  # both start in block 2 (32..47)
    # The tail's span moves block 2's key and every later one's; the blocks before stay shared.
    moved = keys(two_scope_fields(40, -4), 80)
    assert moved[:2] == [None, None] and all(a != b for a, b in zip(moved[2:], ks[2:], strict=True))
    # A span that starts past a block's end is named empty there, not left out.
    assert keys(two_scope_fields(40, -30), 32)[0][1].endswith(":-:10:16")


def test_a_single_scope_keeps_the_key_it_had_before_edits_had_scopes():
    fp = spec().fingerprint
    assert prefix_cache.block_key({PREFIX_CACHE_KEY: fields("generated", 40)}, 32, 48) == (
        "sae_steering",
        f"{fp}:39:48",
    )


@pytest.fixture(scope="module")
def hasher():
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    vllm.patch_prefix_cache_keys(prefix_cache.block_key)
    kv_cache_utils.init_none_hash(sha256)  # as the engine core does at startup
    return kv_cache_utils.get_request_block_hasher(BLOCK, sha256)


def vllm_request(hasher, prompt, extra_args=None, cache_salt=None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=8, extra_args=extra_args)
    return Request("r", list(prompt), params, None, cache_salt=cache_salt, block_hasher=hasher)


def test_vllm_hashes_an_unsteered_prefix_of_a_steered_request_like_an_unsteered_request(hasher):
    prompt = list(range(100, 148))  # 48 tokens: the last prompt position is 47, in block 2
    plain = vllm_request(hasher, prompt)
    steered = vllm_request(hasher, prompt, {PREFIX_CACHE_KEY: fields("generated", 48)})
    assert len(plain.block_hashes) == len(steered.block_hashes) == 3
    assert plain.block_hashes[:2] == steered.block_hashes[:2]
    assert plain.block_hashes[2] != steered.block_hashes[2]
    for request in (plain, steered):  # blocks filled by generated tokens are hashed too
        request.append_output_token_ids(list(range(16)))
    assert len(steered.block_hashes) == 4 and steered.block_hashes[3] != plain.block_hashes[3]


def test_vllm_keeps_its_own_keys_beside_the_steering_key(hasher):
    from vllm.v1.core import kv_cache_utils

    request = vllm_request(hasher, range(48), {PREFIX_CACHE_KEY: fields("all")}, cache_salt="u")
    first, _ = kv_cache_utils.generate_block_hash_extra_keys(request, 0, BLOCK, 0)
    later, _ = kv_cache_utils.generate_block_hash_extra_keys(request, BLOCK, 2 * BLOCK, 0)
    assert first[0] == ("cache_salt", "u") and first[1][0] == "sae_steering"
    assert len(later) == 1 and later[0][0] == "sae_steering"
    # the block pool imported the function by name (KV events): it sees the wrapped one
    from vllm.v1.core import block_pool

    assert (
        block_pool.generate_block_hash_extra_keys is kv_cache_utils.generate_block_hash_extra_keys
    )


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    return stand_in_vllm_config(tmp_path_factory.mktemp("sae"))


def engine_core_request(extra_args, prompt_len=40, request_id="r", resumable=False):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=list(range(prompt_len)),
        mm_features=None,
        sampling_params=SamplingParams(max_tokens=4, extra_args=extra_args),
        pooling_params=None,
        arrival_time=0.0,
        lora_request=None,
        cache_salt=None,
        data_parallel_rank=None,
        resumable=resumable,
    )


def test_intake_records_the_steered_span_in_a_dict_of_the_requests_own(vllm_config):
    raw = {"edits": [{"feature": 3, "op": "set", "value": 2.0}]}
    shared = {EXTRA_ARGS_KEY: raw, GENERATION_START_KEY: 30}
    request = engine_core_request(shared)
    intake.key_request(vllm_config, request)
    own = request.sampling_params.extra_args
    assert own is not shared and PREFIX_CACHE_KEY not in shared and shared[EXTRA_ARGS_KEY] is raw
    assert own[PREFIX_CACHE_KEY] == [spec().fingerprint, 29, None]
    assert own[EXTRA_ARGS_KEY] == spec().text  # the worker gets the resolved text


def test_intake_drops_a_client_supplied_prefix_cache_key(vllm_config):
    forged = [spec().fingerprint, 0, None]
    unsteered = engine_core_request({PREFIX_CACHE_KEY: forged, "other": 1})
    intake.key_request(vllm_config, unsteered)
    assert unsteered.sampling_params.extra_args == {"other": 1}
    steered = engine_core_request(
        {EXTRA_ARGS_KEY: {"edits": [{"feature": 3, "op": "ablate"}]}, PREFIX_CACHE_KEY: "junk"}
    )
    intake.key_request(vllm_config, steered)
    assert steered.sampling_params.extra_args[PREFIX_CACHE_KEY][1:] == [39, None]


def test_a_streaming_input_session_is_keyed_as_its_own_from_its_first_block(vllm_config):
    # Its prompt grows after intake, so the positions it steers are not known yet.
    raw = {"edits": [{"feature": 3, "op": "set", "value": 2.0}]}
    sessions = [
        engine_core_request({EXTRA_ARGS_KEY: dict(raw)}, request_id=rid, resumable=True)
        for rid in ("s1", "s2")
    ]
    for session in sessions:
        intake.key_request(vllm_config, session)
    fields_ = [s.sampling_params.extra_args[PREFIX_CACHE_KEY] for s in sessions]
    assert all(f[1:] == [0, None] for f in fields_)
    assert keys(fields_[0], 64)[0] != keys(fields_[1], 64)[0]


def test_a_session_once_steered_keeps_its_key_through_unsteered_chunks():
    # (the engine-level behaviour: tests/test_engine_streaming_input.py)
    key = ["fingerprint:s1", 0, None]
    carry = prefix_cache.continued_session_extra_args
    assert carry({PREFIX_CACHE_KEY: key}, None) == {PREFIX_CACHE_KEY: key}
    assert carry({PREFIX_CACHE_KEY: key}, {"other": 1}) == {"other": 1, PREFIX_CACHE_KEY: key}
    own = {EXTRA_ARGS_KEY: "{}", PREFIX_CACHE_KEY: ["other:s1", 0, None]}
    assert carry({PREFIX_CACHE_KEY: key}, own) is None  # a steered chunk has its own key
    assert carry(None, None) is None and carry({"other": 1}, {}) is None  # never steered
