"""A steered engine's config hash, which keys vLLM's compile cache, follows what its compiled
model fixes: the SAEs' layers, sizes, architecture and TopK k as their files say, even when a
file changes under the same path (vLLM's whole-model AOT cache loads without guard checks, so
a graph traced for the old SAE would be reused: a TopK k is baked into it)."""

from __future__ import annotations

import shutil

import pytest

from engine_harness import engine_kwargs
from tiny_model import build_tiny_llama, write_random_sae

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("compile-key") / "model")


def config_hash(model_dir, sae_dir=None, checked: bool = True) -> str:
    """The engine config's hash; `checked` False gives the steering config as `vllm serve
    --additional-config` would, unchecked (steering_config refuses an unreadable SAE)."""
    from vllm.engine.arg_utils import EngineArgs

    from sae_vllm import steering_config
    from sae_vllm.engine import sae_sizes

    sae_sizes.sae_header.cache_clear()  # as a new process reads the file afresh
    extra = {}
    if sae_dir is not None:
        entries = [{"id": "res", "path": str(sae_dir), "layer": 1}]
        config = steering_config(entries) if checked else {"sae_steering": {"saes": entries}}
        extra["additional_config"] = config
    return EngineArgs(**engine_kwargs(model_dir, **extra)).create_engine_config().compute_hash()


def test_the_hash_follows_the_sae_file_under_one_path(model_dir, tmp_path):
    sae_dir = tmp_path / "sae"
    write_random_sae(sae_dir, "relu", layer=1)
    relu = config_hash(model_dir, sae_dir)
    assert config_hash(model_dir, sae_dir) == relu  # the same file: the same key
    assert relu != config_hash(model_dir)  # steering itself is hashed (its additional_config)
    shutil.rmtree(sae_dir)
    write_random_sae(sae_dir, "topk", layer=1)  # same path, now TopK with k 16
    topk = config_hash(model_dir, sae_dir)
    assert topk != relu
    shutil.rmtree(sae_dir)
    write_random_sae(sae_dir, "topk", layer=1, d_sae=128)
    assert config_hash(model_dir, sae_dir) not in (relu, topk)


def test_an_unreadable_sae_still_hashes(model_dir, tmp_path):
    """The worker reports a bad SAE at startup; hashing the config must not fail first."""
    missing = config_hash(model_dir, tmp_path / "absent", checked=False)
    assert missing != config_hash(model_dir)
