"""SAEs named by `hf://OWNER/REPO[@REVISION]/PATH`, resolved through the Hugging Face cache.

This machine cannot reach the Hub, so the tests run huggingface_hub in offline mode against a
cache laid out as huggingface_hub lays it out (refs/REVISION holds the commit, the files live
under snapshots/COMMIT/): the real resolution code runs; only the download is left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vllm import steering_config
from sae_vllm.config import SAEEntry, SteeringConfig
from sae_vllm.sae import SAEFormatError, decoder_norms, inspect_sae, load_sae
from sae_vllm.sae.hub import parse_hub_path
from sae_vllm.server.errors import StartupError
from sae_vllm.server.options import sae_argument, steering_additional_config
from sae_vllm.server.registry import load_record
from sae_writers import saelens_v6_cfg, write_goodfire, write_saelens

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "acme/sae-release"
SUBFOLDER = "layer_3/width_64"
D_IN, D_SAE = 16, 64


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(0, 0.2, (D_IN, D_SAE)).astype(np.float32),
        "b_enc": rng.normal(0, 0.1, D_SAE).astype(np.float32),
        "W_dec": rng.normal(0, 0.2, (D_SAE, D_IN)).astype(np.float32),
        "b_dec": rng.normal(0, 0.1, D_IN).astype(np.float32),
    }


def _snapshot(cache: Path, commit: str, refs: tuple[str, ...], seed: int) -> Path:
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    cfg = saelens_v6_cfg("standard", D_IN, D_SAE, "blocks.3.hook_resid_post")
    write_saelens(snapshot / SUBFOLDER, _arrays(seed), cfg)
    arrays = _arrays(seed + 100)
    write_goodfire(
        snapshot / "Model-SAE-l2.pth",
        {
            "encoder_linear.weight": arrays["W_enc"].T.copy(),
            "encoder_linear.bias": arrays["b_enc"],
            "decoder_linear.weight": arrays["W_dec"].T.copy(),
            "decoder_linear.bias": arrays["b_dec"],
        },
    )
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict[str, Path]:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {
        "main": _snapshot(cache, COMMIT, ("main", "v2"), seed=1),
        "old": _snapshot(cache, OLD_COMMIT, ("v1",), seed=2),
    }


def _same_sae(a, b) -> bool:
    return all(
        torch.equal(getattr(a, n), getattr(b, n)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )


def test_a_hub_folder_reads_as_its_local_copy(hub):
    path = f"hf://{REPO}/{SUBFOLDER}"
    local = hub["main"] / SUBFOLDER
    assert _same_sae(load_sae(path), load_sae(local))
    assert (inspect_sae(path).d_sae, inspect_sae(path).layer) == (D_SAE, 3)
    assert torch.equal(decoder_norms(path), decoder_norms(local))


def test_a_hub_file_of_a_single_file_format(hub):
    sae = load_sae(f"hf://{REPO}/Model-SAE-l2.pth")
    assert sae.format == "goodfire" and sae.layer == 2
    assert _same_sae(sae, load_sae(hub["main"] / "Model-SAE-l2.pth"))


@pytest.mark.parametrize(
    ("revision", "snapshot"), [("v1", "old"), (OLD_COMMIT, "old"), ("v2", "main")]
)
def test_revisions_pick_their_snapshot(hub, revision, snapshot):
    sae = load_sae(f"hf://{REPO}@{revision}/{SUBFOLDER}")
    assert _same_sae(sae, load_sae(hub[snapshot] / SUBFOLDER))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"hf://{REPO}/layer_9/width_64", "has no file or folder 'layer_9/width_64'"),
        ("hf://acme/not-cached/sae", "cannot fetch from the Hugging Face Hub"),
        (f"hf://{REPO}@v7/{SUBFOLDER}", "cannot fetch from the Hugging Face Hub"),
        ("hf://just-a-name", "expected hf://OWNER/REPO"),
        (f"hf://{REPO}/layer_3/../layer_3", "must not contain"),
    ],
)
def test_bad_hub_paths_raise_sae_format_errors_naming_them(hub, path, message):
    with pytest.raises(SAEFormatError, match=message) as error:
        load_sae(path)
    assert str(error.value).startswith(path)


def test_parse_hub_path():
    source = parse_hub_path("hf://google/gemma-scope-2b-pt-res@abc/layer_12/width_16k/")
    assert (source.repo_id, source.revision, source.path_in_repo) == (
        "google/gemma-scope-2b-pt-res", "abc", "layer_12/width_16k",
    )  # fmt: skip
    assert source.allow_patterns == ["layer_12/width_16k", "layer_12/width_16k/*"]
    assert parse_hub_path("hf://a/b").allow_patterns is None


def test_the_engine_config_holds_the_local_copy(hub):
    config = steering_config([{"id": "res", "path": f"hf://{REPO}/{SUBFOLDER}"}])
    entry = SteeringConfig.model_validate(config["sae_steering"]).saes[0]
    assert Path(entry.path) == hub["main"] / SUBFOLDER


def test_serve_resolves_hub_saes_once_before_the_engine_starts(hub):
    entry = sae_argument(f"res=hf://{REPO}@v1/{SUBFOLDER}@3")
    assert entry == {"id": "res", "path": f"hf://{REPO}@v1/{SUBFOLDER}", "layer": 3}
    _, steering = steering_additional_config({}, [entry], [], None)
    assert Path(steering.saes[0].path) == hub["old"] / SUBFOLDER
    missing = sae_argument(f"res=hf://{REPO}/nowhere")
    with pytest.raises(StartupError, match="has no file or folder 'nowhere'"):
        steering_additional_config({}, [missing], [], None)


def test_the_api_server_of_vllm_serve_reads_hub_saes_as_given(hub):
    # `vllm serve --additional-config` hands the API server the config's paths as written:
    # its SAE registry (the /v1/saes routes, feature checks) reads an hf:// path itself.
    record = load_record(SAEEntry(id="res", path=f"hf://{REPO}@v1/{SUBFOLDER}"))
    assert (record.info.layer, record.info.d_in, record.info.d_sae) == (3, D_IN, D_SAE)
    expected = decoder_norms(hub["old"] / SUBFOLDER).numpy()
    np.testing.assert_array_equal(record.decoder_norms, expected)
    with pytest.raises(StartupError, match="has no file or folder 'nowhere'"):
        load_record(SAEEntry(id="res", path=f"hf://{REPO}/nowhere", layer=3))


def test_only_the_saes_files_are_fetched(hub, monkeypatch):
    # A spy around huggingface_hub's snapshot_download (it still runs): a release repo holds
    # hundreds of SAEs, and a fetch must ask for the one named, not the whole repo.
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    load_sae(f"hf://{REPO}@v1/{SUBFOLDER}")
    assert calls == [((REPO,), {"revision": "v1", "allow_patterns": [SUBFOLDER, f"{SUBFOLDER}/*"]})]
