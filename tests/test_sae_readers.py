"""SAE readers: every format loads (detected and named) and matches hand math; bad files fail;
inspect_sae gives the same SAE shapes from headers alone."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from package_log import package_warnings
from safetensors.torch import load_file, save_file

import sae_vllm.kernels.weights as kernel_weights
from bench.sae_reads import peak_anonymous_growth
from sae_vllm.config import SAEEntry, SteeringConfig
from sae_vllm.engine.sae_sizes import sae_sizes
from sae_vllm.engine.sae_weights import steering_weights
from sae_vllm.kernels import prepare_weights
from sae_vllm.sae import (
    FORMATS,
    SAE,
    SAEFormatError,
    decoder_norms,
    detect_format,
    inspect_sae,
    load_sae,
    non_finite_weight,
    open_sae,
)
from sae_vllm.sae.sites import NotALayerOutputError, residual_layer, steered_layer
from sae_writers import (
    MakesDirWhenUnpickled,
    dictionary_learning_config,
    llama_scope_hyperparams,
    saelens_pre_v6_cfg,
    saelens_v6_cfg,
    sparsify_cfg,
    write_dictionary_learning,
    write_gemma_scope,
    write_gemma_scope_2,
    write_goodfire,
    write_llama_scope,
    write_saelens,
    write_saelens_torch,
    write_sparsify,
)
from tiny_model import write_random_sae

D_IN, D_SAE = 16, 64


# ---- random SAEs and numpy float64 references ------------------------------------------------


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def inputs(rng: np.random.Generator) -> np.ndarray:
    return normal(rng, 2, 5, D_IN)


def saelens_arrays(rng: np.random.Generator, threshold: bool = False) -> dict[str, np.ndarray]:
    arrays = {
        "W_enc": normal(rng, D_IN, D_SAE, scale=0.25),
        "b_enc": normal(rng, D_SAE, scale=0.3),
        # Rows of unequal norm, so decoder-norm rescaling is visible.
        "W_dec": normal(rng, D_SAE, D_IN) * rng.uniform(0.2, 3.0, (D_SAE, 1)).astype(np.float32),
        "b_dec": normal(rng, D_IN, scale=0.5),
    }
    if threshold:
        arrays["threshold"] = rng.uniform(0.1, 1.2, D_SAE).astype(np.float32)
    return arrays


def f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def relu(pre: np.ndarray) -> np.ndarray:
    return np.maximum(pre, 0.0)


def jumprelu(pre: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    return np.where(pre > threshold, relu(pre), 0.0)


def topk(pre: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-pre, axis=-1)[..., :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, relu(np.take_along_axis(pre, keep, axis=-1)), axis=-1)
    return out


def assert_math(sae: SAE, x: np.ndarray, acts: np.ndarray, recon: np.ndarray) -> None:
    """encode(x) equals acts and decode(acts) equals recon, both computed in float64."""
    assert (acts > 0).any() and (acts == 0).any(), "reference activations are degenerate"
    got = sae.encode(torch.from_numpy(x))
    assert got.shape == acts.shape and got.dtype == sae.W_enc.dtype
    np.testing.assert_allclose(got.double().numpy(), acts, rtol=1e-4, atol=1e-5)
    back = sae.decode(torch.from_numpy(acts.astype(np.float32)))
    assert back.shape == x.shape
    np.testing.assert_allclose(back.double().numpy(), recon, rtol=1e-4, atol=1e-4)


def assert_canonical(sae: SAE, dtype: torch.dtype = torch.float32) -> None:
    assert (sae.d_in, sae.d_sae) == (D_IN, D_SAE)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert sae.b_enc.shape == (D_SAE,) and sae.b_dec.shape == (D_IN,)
    tensors = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    if sae.architecture == "jumprelu":
        assert sae.threshold is not None and sae.threshold.shape == (D_SAE,)
        tensors.append(sae.threshold)
    else:
        assert sae.threshold is None
    assert all(t.dtype == dtype for t in tensors)
    assert (sae.k is not None) == (sae.architecture == "topk")


def load_both(
    path: Path, fmt: str, dtype: torch.dtype | None = None, expect: torch.dtype = torch.float32
) -> SAE:
    """Load with detection and with the format named; both must give the same SAE."""
    detected = load_sae(path, dtype=dtype)
    named = load_sae(path, format=fmt, dtype=dtype)
    assert detected.format == named.format == fmt
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(detected, name), getattr(named, name))
    assert_canonical(detected, expect)
    assert_inspection_matches(path, fmt)
    assert_streaming_matches(path, fmt, dtype)
    return detected


def assert_inspection_matches(path: Path, fmt: str) -> None:
    """inspect_sae (headers only) describes the SAE exactly as load_sae does, with no data."""
    loaded, inspected = load_sae(path, format=fmt), inspect_sae(path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        full, meta = getattr(loaded, name), getattr(inspected, name)
        assert (full is None) == (meta is None), name
        if full is not None:
            assert meta.is_meta and (meta.shape, meta.dtype) == (full.shape, full.dtype), name
    for name in ("architecture", "k", "apply_b_dec_to_input", "layer", "hook_name", "format",
                 "site_assumed"):  # fmt: skip
        assert getattr(inspected, name) == getattr(loaded, name), name
    assert inspected.source == loaded.source
    # Streamed decoder norms (whole file in one chunk, and a few rows at a time) are the
    # loaded decoder's, folds included.
    expected = loaded.W_dec.float().norm(dim=1)
    for chunk_rows in (None, 3):
        norms = decoder_norms(path, format=fmt, chunk_rows=chunk_rows)
        assert norms.dtype == torch.float32
        assert torch.equal(norms, expected), (fmt, chunk_rows)


def assert_streaming_matches(path: Path, fmt: str, dtype: torch.dtype | None = None) -> None:
    """open_sae folds the SAE a block of features at a time into exactly load_sae's SAE, and
    the worker's steering weights built from those blocks are exactly prepare_weights' on it."""
    loaded = load_sae(path, format=fmt, dtype=dtype)
    opened = open_sae(path, format=fmt, dtype=dtype)
    header = opened.header
    for name in ("W_enc", "W_dec"):
        full, meta = getattr(loaded, name), getattr(header, name)
        assert meta.is_meta and (meta.shape, meta.dtype) == (full.shape, full.dtype), name
    for name in ("b_enc", "b_dec", "threshold"):
        full, small = getattr(loaded, name), getattr(header, name)
        assert (full is None) == (small is None), name
        if full is not None:
            assert torch.equal(small, full), name
    for name in ("architecture", "k", "apply_b_dec_to_input", "layer", "hook_name", "format",
                 "site_assumed"):  # fmt: skip
        assert getattr(header, name) == getattr(loaded, name), name
    d_sae = loaded.d_sae
    for rows in (slice(0, d_sae), slice(0, 3), slice(3, d_sae - 1), slice(d_sae - 1, d_sae)):
        assert torch.equal(opened.encoder_columns(rows), loaded.W_enc[:, rows]), rows
        assert torch.equal(opened.decoder_rows(rows), loaded.W_dec[rows]), rows
    blocks = mock.patch.object(opened, "encoder_columns", wraps=opened.encoder_columns)
    with mock.patch.object(kernel_weights, "_CHUNK_ELEMS", 5 * loaded.d_in), blocks as columns:
        streamed = steering_weights(opened, dtype=torch.bfloat16, device="cpu")
    assert columns.call_count == math.ceil(d_sae / 5)
    whole = prepare_weights(
        loaded.W_enc,
        loaded.b_enc,
        loaded.W_dec,
        loaded.b_dec,
        loaded.threshold,
        loaded.k,
        loaded.apply_b_dec_to_input,
        dtype=torch.bfloat16,
        device="cpu",
    )
    for name in ("enc_t", "b_enc", "threshold", "W_dec"):
        assert torch.equal(getattr(streamed, name), getattr(whole, name)), name
    assert streamed.k == whole.k


# ---- SAELens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saelens_arch", "apply_b_dec", "arch", "k"),
    [
        ("standard", True, "relu", None),
        ("jumprelu", False, "jumprelu", None),
        ("topk", True, "topk", 5),
    ],
)
def test_saelens_v6(tmp_path, saelens_arch, apply_b_dec, arch, k):
    rng = np.random.default_rng(1)
    arrays = saelens_arrays(rng, threshold=arch == "jumprelu")
    extra = {"k": k, "rescale_acts_by_decoder_norm": False} if k else {}
    cfg = saelens_v6_cfg(
        saelens_arch,
        D_IN,
        D_SAE,
        "blocks.7.hook_resid_post",
        apply_b_dec_to_input=apply_b_dec,
        **extra,
    )
    sae = load_both(write_saelens(tmp_path / "sae", arrays, cfg), "saelens")
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == (arch, k, apply_b_dec)
    assert (sae.layer, sae.hook_name) == (7, "blocks.7.hook_resid_post")
    assert sae.source == str(tmp_path / "sae")

    x = inputs(rng)
    a = {k_: f64(v) for k_, v in arrays.items()}
    pre = (f64(x) - a["b_dec"] * apply_b_dec) @ a["W_enc"] + a["b_enc"]
    acts = {
        "relu": lambda: relu(pre),
        "jumprelu": lambda: jumprelu(pre, a["threshold"]),
        "topk": lambda: topk(pre, k),
    }[arch]()
    if arch == "jumprelu":  # the threshold must matter somewhere
        assert ((pre > 0) & (acts == 0)).any()
    assert_math(sae, x, acts, acts @ a["W_dec"] + a["b_dec"])


@pytest.mark.parametrize("version", ["v6", "pre-v6"])
def test_saelens_threshold_in_a_cfg_naming_no_architecture_is_jumprelu(tmp_path, version):
    """A threshold tensor, with a cfg that names no architecture, makes a jumprelu SAE (it was
    read as ReLU and the threshold dropped); beside one that names another it is refused."""
    rng = np.random.default_rng(17)
    arrays = saelens_arrays(rng, threshold=True)
    if version == "v6":
        cfg = saelens_v6_cfg("jumprelu", D_IN, D_SAE, "blocks.2.hook_resid_post")
    else:
        cfg = saelens_pre_v6_cfg(D_IN, D_SAE)
    del cfg["architecture"]
    cfg["apply_b_dec_to_input"] = False
    sae = load_both(write_saelens(tmp_path / "sae", arrays, cfg), "saelens")
    assert (sae.architecture, sae.apply_b_dec_to_input) == ("jumprelu", False)
    x = inputs(rng)
    a = {k: f64(v) for k, v in arrays.items()}
    pre = f64(x) @ a["W_enc"] + a["b_enc"]
    acts = jumprelu(pre, a["threshold"])
    assert ((pre > 0) & (acts == 0)).any()  # the threshold matters
    assert_math(sae, x, acts, acts @ a["W_dec"] + a["b_dec"])


def gated_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A gated SAE's parameters in SAELens' names: no b_enc; b_gate, b_mag, r_mag."""
    arrays = saelens_arrays(rng)
    del arrays["b_enc"]
    return {
        **arrays,
        "b_gate": normal(rng, D_SAE, scale=0.3),
        "b_mag": normal(rng, D_SAE, scale=0.3),
        "r_mag": normal(rng, D_SAE, scale=0.5),
    }


def gated_reference(
    x: np.ndarray, W_enc, b_gate, b_mag, r_mag, W_dec, b_dec, apply_b_dec: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Activations and reconstruction as gated SAEs compute them (SAELens GatedSAE.encode,
    dictionary_learning GatedAutoEncoder.encode), in float64."""
    W_enc, b_gate, b_mag, r_mag, W_dec, b_dec = map(
        f64, (W_enc, b_gate, b_mag, r_mag, W_dec, b_dec)
    )
    x_enc = (f64(x) - b_dec * apply_b_dec) @ W_enc
    magnitude = np.exp(r_mag) * x_enc + b_mag
    acts = (x_enc + b_gate > 0) * relu(magnitude)
    # Both parts must matter: a closed gate over a positive magnitude, an open one over zero.
    assert ((magnitude > 0) & (x_enc + b_gate <= 0)).any()
    assert ((magnitude <= 0) & (x_enc + b_gate > 0)).any()
    return acts, acts @ W_dec + b_dec


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_gated_reads_as_the_jumprelu_it_equals(tmp_path, apply_b_dec):
    rng = np.random.default_rng(8)
    arrays = gated_arrays(rng)
    cfg = saelens_v6_cfg(
        "gated", D_IN, D_SAE, "blocks.2.hook_resid_post", apply_b_dec_to_input=apply_b_dec
    )
    sae = load_both(write_saelens(tmp_path / "sae", arrays, cfg), "saelens")
    assert (sae.architecture, sae.apply_b_dec_to_input, sae.layer) == ("jumprelu", apply_b_dec, 2)
    x = inputs(rng)
    a = arrays
    assert_math(
        sae,
        x,
        *gated_reference(
            x, a["W_enc"], a["b_gate"], a["b_mag"], a["r_mag"], a["W_dec"], a["b_dec"], apply_b_dec
        ),
    )


def test_saelens_gated_bfloat16_file_folds_in_float32_and_rounds_once(tmp_path):
    arrays = gated_arrays(np.random.default_rng(9))
    tensors = {k: torch.from_numpy(v).bfloat16() for k, v in arrays.items()}
    cfg = saelens_v6_cfg("gated", D_IN, D_SAE, "blocks.2.hook_resid_post")
    folder = write_saelens_torch(tmp_path / "sae", tensors, cfg)
    sae = load_both(folder, "saelens", expect=torch.bfloat16)
    wide = {k: v.float() for k, v in tensors.items()}
    scale = wide["r_mag"].exp()
    assert torch.equal(sae.W_enc, (wide["W_enc"] * scale).bfloat16())
    assert torch.equal(sae.threshold, (wide["b_mag"] - scale * wide["b_gate"]).bfloat16())
    assert torch.equal(sae.b_enc, tensors["b_mag"])


def test_saelens_pre_v6_topk_config(tmp_path):
    rng = np.random.default_rng(2)
    arrays = saelens_arrays(rng)
    arrays["b_enc"] -= 1.5  # so some tokens have fewer than k positive pre-activations
    cfg = saelens_pre_v6_cfg(D_IN, D_SAE, activation_fn_str="topk", activation_fn_kwargs={"k": 6})
    del cfg["hook_name"], cfg["hook_layer"]  # the oldest configs say hook_point instead
    cfg.update(hook_point="blocks.3.hook_resid_pre", hook_point_layer=3)
    sae = load_both(write_saelens(tmp_path / "old", arrays, cfg), "saelens")
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("topk", 6, True)
    assert (sae.layer, sae.hook_name) == (3, "blocks.3.hook_resid_pre")

    x = inputs(rng)
    a = {k_: f64(v) for k_, v in arrays.items()}
    acts = topk((f64(x) - a["b_dec"]) @ a["W_enc"] + a["b_enc"], 6)
    assert ((acts > 0).sum(-1) < 6).any()  # negative winners must come out as 0
    assert_math(sae, x, acts, acts @ a["W_dec"] + a["b_dec"])


def test_saelens_pre_v6_layer_from_hook_layer_and_finetuning_scaling_factor(tmp_path):
    rng = np.random.default_rng(3)
    arrays = saelens_arrays(rng)
    arrays["scaling_factor"] = rng.uniform(0.5, 2.0, D_SAE).astype(np.float32)
    cfg = saelens_pre_v6_cfg(D_IN, D_SAE, hook_layer=4, finetuning_scaling_factor=True)
    del cfg["hook_name"]
    sae = load_both(write_saelens(tmp_path / "ft", arrays, cfg), "saelens")
    assert (sae.architecture, sae.layer, sae.hook_name) == ("relu", 4, None)

    x = inputs(rng)
    a = {k_: f64(v) for k_, v in arrays.items()}
    acts = relu((f64(x) - a["b_dec"]) @ a["W_enc"] + a["b_enc"])
    # v5 decode: apply_finetuning_scaling_factor(acts) @ W_dec + b_dec
    assert_math(sae, x, acts, (acts * a["scaling_factor"]) @ a["W_dec"] + a["b_dec"])


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path):
    rng = np.random.default_rng(4)
    arrays = saelens_arrays(rng)
    cfg = saelens_v6_cfg(
        "topk", D_IN, D_SAE, "blocks.2.hook_resid_post", k=4, rescale_acts_by_decoder_norm=True
    )
    sae = load_both(write_saelens(tmp_path / "sae", arrays, cfg), "saelens")
    assert (sae.architecture, sae.k) == ("topk", 4)

    x = inputs(rng)
    a = {k_: f64(v) for k_, v in arrays.items()}
    norms = np.linalg.norm(a["W_dec"], axis=1)
    pre = (f64(x) - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    acts = topk(pre * norms, 4)
    # Rescaling changes which features win, so this differs from plain topk.
    assert not np.array_equal(acts != 0, topk(pre, 4) != 0)
    assert_math(sae, x, acts, (acts / norms) @ a["W_dec"] + a["b_dec"])


def test_saelens_expected_average_only_in_folds_the_activation_scaler(tmp_path):
    rng = np.random.default_rng(5)
    arrays = saelens_arrays(rng, threshold=True)
    s = 2.5
    cfg = saelens_v6_cfg(
        "jumprelu",
        D_IN,
        D_SAE,
        "blocks.1.hook_resid_post",
        normalize_activations="expected_average_only_in",
    )
    sae = load_both(write_saelens(tmp_path / "ckpt", arrays, cfg, scaling_factor=s), "saelens")

    x = inputs(rng) / s  # raw activations; training saw s * x
    a = {k_: f64(v) for k_, v in arrays.items()}
    pre = (s * f64(x) - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    acts = jumprelu(pre, a["threshold"])
    assert_math(sae, x, acts, (acts @ a["W_dec"] + a["b_dec"]) / s)


def test_saelens_bfloat16_file_keeps_its_dtype_unless_cast(tmp_path):
    rng = np.random.default_rng(6)
    tensors = {k: torch.from_numpy(v).bfloat16() for k, v in saelens_arrays(rng).items()}
    cfg = saelens_v6_cfg("standard", D_IN, D_SAE, "blocks.0.hook_resid_post", dtype="bfloat16")
    folder = write_saelens_torch(tmp_path / "bf16", tensors, cfg)
    sae = load_both(folder, "saelens", expect=torch.bfloat16)
    assert sae.encode(torch.randn(3, D_IN)).dtype == torch.bfloat16
    wide = load_both(folder, "saelens", dtype=torch.float64, expect=torch.float64)
    assert torch.equal(wide.W_enc, tensors["W_enc"].double())


# ---- Gemma Scope 1 and 2 ------------------------------------------------------------------------


def gemma_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return saelens_arrays(rng, threshold=True)


def gemma_reference(x: np.ndarray, arrays: dict[str, np.ndarray]):
    a = {"W" + k[1:] if k.startswith("w_") else k: f64(v) for k, v in arrays.items()}
    pre = f64(x) @ a["W_enc"] + a["b_enc"]  # no b_dec subtraction
    acts = jumprelu(pre, a["threshold"])
    return acts, acts @ a["W_dec"] + a["b_dec"]


def test_gemma_scope_npz(tmp_path):
    rng = np.random.default_rng(7)
    arrays = gemma_arrays(rng)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_40"
    file = write_gemma_scope(folder / "params.npz", arrays)
    for path in (file, folder):
        sae = load_both(path, "gemma_scope")
        assert (sae.architecture, sae.apply_b_dec_to_input) == ("jumprelu", False)
        assert (sae.layer, sae.hook_name) == (5, "blocks.5.hook_resid_post")
        x = inputs(rng)
        assert_math(sae, x, *gemma_reference(x, arrays))


@pytest.mark.parametrize(
    "layout", ["compressed", "fortran", "float16", "big-endian", "big-endian compressed"]
)
def test_gemma_scope_npz_members_that_cannot_be_mapped_as_stored(tmp_path, layout):
    # decoder_norms maps stored C-ordered members and reads the others: every case must agree.
    arrays = gemma_arrays(np.random.default_rng(11))
    if layout == "fortran":
        arrays = {name: np.asfortranarray(array) for name, array in arrays.items()}
    if layout == "float16":
        arrays = {name: array.astype(np.float16) for name, array in arrays.items()}
    if layout.startswith("big-endian"):  # numpy reads these as any other
        arrays = {name: array.astype(">f4") for name, array in arrays.items()}
    file = tmp_path / "params.npz"
    (np.savez_compressed if layout.endswith("compressed") else np.savez)(file, **arrays)
    loaded = load_sae(file)
    np.testing.assert_array_equal(loaded.W_dec.numpy(), arrays["W_dec"])
    assert loaded.W_dec.dtype == torch.float32 or layout == "float16"
    assert_inspection_matches(file, "gemma_scope")
    assert_streaming_matches(file, "gemma_scope")


def test_a_gemma_scope_embedding_sae_reads_the_embeddings_and_is_refused(tmp_path):
    """gemma-scope-*-res/embedding/...: the residual stream before layer 0 (before Gemma's
    scaling of the embeddings), which no decoder layer's output is, even with a layer given."""
    arrays = gemma_arrays(np.random.default_rng(12))
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    sae = load_both(write_gemma_scope(folder / "params.npz", arrays), "gemma_scope")
    assert (sae.layer, sae.hook_name) == (None, "hook_embed")
    for configured in (None, 0):
        with pytest.raises(NotALayerOutputError, match="reads hook_embed, not the output"):
            steered_layer(sae, configured)


def test_gemma_scope_npz_outside_a_release_tree_has_no_layer(tmp_path):
    arrays = gemma_arrays(np.random.default_rng(8))
    sae = load_both(write_gemma_scope(tmp_path / "mine.npz", arrays), "gemma_scope")
    assert (sae.layer, sae.hook_name) == (None, None)


@pytest.mark.parametrize(
    ("release", "hook"),
    [
        ("gemma-scope-2b-pt-mlp", "blocks.2.hook_mlp_out"),
        ("models--google--gemma-scope-2b-pt-mlp/snapshots/abc", "blocks.2.hook_mlp_out"),
        ("gemma-scope-2b-pt-res", "blocks.2.hook_resid_post"),
        # huggingface-cli download google/gemma-scope-2b-pt-mlp ... --local-dir mlp-localdir
        ("mlp-localdir", None),
    ],
)
def test_gemma_scope_site_from_the_release_named_in_the_path_or_assumed_aloud(
    tmp_path, release, hook
):
    """A path naming no release is read as residual, as before (the usual download of the
    residual release), but no longer silently: the SAE says its site was assumed and a warning,
    once per file, names the layout that would tell (an MLP SAE steered the residual stream)."""
    arrays = gemma_arrays(np.random.default_rng(18))
    inner = "layer_2/width_16k/average_l0_50/params.npz"
    file = write_gemma_scope(tmp_path / release / inner, arrays)
    with package_warnings() as warnings:
        sae = load_both(file, "gemma_scope")
    assert (sae.layer, sae.hook_name) == (2, hook)
    if hook is None:
        assert sae.site_assumed == "residual stream (the path names no Gemma Scope release)"
        assert residual_layer(sae) == 2
        assert len(warnings) == 1
        assert warnings[0].startswith(f"{file}: read as a residual-stream SAE, since its path")
        assert "names no Gemma Scope release" in warnings[0]
        assert "(gemma-scope-2b-pt-res, -mlp or -att, as in the Hugging Face cache)" in warnings[0]
    else:
        assert sae.site_assumed is None and warnings == []


@pytest.mark.parametrize("site", ["mlp", "att"])
def test_a_gemma_scope_mlp_or_attention_sae_outside_the_layout_is_refused_whatever_the_layer(
    tmp_path, site
):
    """Its release names its site but no layer_N folder its layer: given @L, it steered the
    residual stream after L."""
    arrays = gemma_arrays(np.random.default_rng(19))
    file = write_gemma_scope(tmp_path / f"gemma-scope-2b-pt-{site}" / "mine" / "params.npz", arrays)
    sae = load_both(file, "gemma_scope")
    assert (sae.layer, sae.hook_name) == (None, {"mlp": "hook_mlp_out", "att": "attn.hook_z"}[site])
    for configured in (None, 2):
        with pytest.raises(NotALayerOutputError, match="not the output of a decoder layer"):
            steered_layer(sae, configured)
    residual = write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / "mine" / "params.npz", arrays)
    assert steered_layer(load_both(residual, "gemma_scope"), 2) == 2  # the residual release's


@pytest.mark.parametrize(
    ("inner", "layer"),
    [
        ("layer_3/width_16k/average_l0_50", 3),
        ("layer_3_sweep/my_gemma_l1", None),  # a user's folder, not the release's layer_N
        ("layer_3/my_gemma_l1", None),  # layer_N, but not where the release layout puts it
        ("layer_3/width_16k/average_l0_50/mine", None),
        ("layer_7/sweep/layer_3/width_16k/average_l0_50", 3),
    ],
)
def test_gemma_scope_layer_comes_only_from_the_release_layout(tmp_path, inner, layer):
    """layer_N/width_*/average_l0_*/params.npz: a layer_N folder anywhere else in the path
    (layer_3_sweep/my_gemma_l1 was read as layer 3) gives no layer, so @L must be given."""
    arrays = gemma_arrays(np.random.default_rng(19))
    file = write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res" / inner / "params.npz", arrays)
    sae = inspect_sae(file)
    hook = None if layer is None else f"blocks.{layer}.hook_resid_post"
    assert (sae.layer, sae.hook_name, residual_layer(sae)) == (layer, hook, layer)


@pytest.mark.parametrize(
    ("folder", "layer"),
    [
        ("layer_3_sweep/mine", None),  # a user's folder above the SAE's
        ("layer_3_sweep", None),  # the SAE's own, but not the release's name
        ("layer_3", None),
        ("layer_3_width_16k_l0_medium", 3),
    ],
)
def test_gemma_scope_2_layer_comes_only_from_the_saes_own_release_named_folder(
    tmp_path, folder, layer
):
    arrays = {k.lower(): v for k, v in gemma_arrays(np.random.default_rng(20)).items()}
    sae = inspect_sae(write_gemma_scope_2(tmp_path / folder, arrays))
    assert sae.layer == layer


@pytest.mark.parametrize("with_config", [True, False])
def test_gemma_scope_2_safetensors(tmp_path, with_config):
    rng = np.random.default_rng(9)
    arrays = {k.lower() if k.startswith("W_") else k: v for k, v in gemma_arrays(rng).items()}
    config = {
        "architecture": "jump_relu",
        "model_name": "google/gemma-3-270m-pt",
        "hf_hook_point_in": "model.layers.9.output",
        "width": D_SAE,
        "l0": 20,
    }
    folder = tmp_path / "resid_post_all" / "layer_9_width_16k_l0_small"
    write_gemma_scope_2(folder, arrays, config if with_config else None)
    hook = "model.layers.9.output" if with_config else "blocks.9.hook_resid_post"
    for path in (folder, folder / "params.safetensors"):
        sae = load_both(path, "gemma_scope_2")
        assert (sae.architecture, sae.apply_b_dec_to_input) == ("jumprelu", False)
        assert (sae.layer, sae.hook_name) == (9, hook)
        assert residual_layer(sae) == 9
    x = inputs(rng)
    assert_math(sae, x, *gemma_reference(x, arrays))


@pytest.mark.parametrize("folder", ["attn_out_all/layer_4_width_16k_l0_small", "my_saes/l4"])
def test_gemma_scope_2_site_comes_from_its_config_wherever_the_folder_is(tmp_path, folder):
    """An attention SAE is refused in its release folder and out of it: its config says what
    it reads. (The folder used to decide, and a renamed one was steered as layer 4's output.)"""
    arrays = {k.lower(): v for k, v in gemma_arrays(np.random.default_rng(3)).items()}
    hook = "model.layers.4.self_attn.o_proj.input"
    config = {"architecture": "jump_relu", "hf_hook_point_in": hook, "hf_hook_point_out": hook}
    sae = inspect_sae(write_gemma_scope_2(tmp_path / folder, arrays, config))
    assert (sae.layer, sae.hook_name) == (4, hook)
    with pytest.raises(NotALayerOutputError, match=f"reads {re.escape(hook)}, not the output"):
        residual_layer(sae)


# ---- sparsify, Goodfire, Llama Scope ----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_is_found_where_the_file_stores_it(tmp_path, bad):
    """sparsify stores its encoder as nn.Linear's [d_sae, d_in], which the reader transposes:
    the index is the file's, and each matrix streams in the file's row order."""
    rng = np.random.default_rng(12)
    clean = write_sparsify(
        tmp_path / "clean" / "layers.4", sparsify_arrays(rng), sparsify_cfg(D_IN, 3, D_SAE)
    )
    assert non_finite_weight(clean) is None
    for name, index in [
        ("encoder.weight", (D_SAE - 1, 2)),
        ("W_dec", (4, D_IN - 1)),
        ("b_dec", (5,)),
    ]:
        arrays = sparsify_arrays(rng)
        arrays[name][index] = bad
        folder = write_sparsify(tmp_path / name / "layers.4", arrays, sparsify_cfg(D_IN, 3, D_SAE))
        assert non_finite_weight(folder) == f"{name} at {list(index)} (as the file stores it)"
    arrays = sparsify_arrays(rng)
    arrays["W_dec"] = arrays["W_dec"].astype(np.float16)
    folder = write_sparsify(tmp_path / "fp16" / "layers.4", arrays, sparsify_cfg(D_IN, 3, D_SAE))
    assert non_finite_weight(folder) is None


def test_non_finite_weight_refuses_a_file_that_holds_no_sae(tmp_path):
    """A float8 tensor raised torch's NotImplementedError from the finiteness pass."""
    folder = tmp_path / "f8"
    write_random_sae(folder, "relu", layer=1, d_sae=16)
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"].to(torch.float8_e4m3fn)
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="float8_e4m3fn"):
        non_finite_weight(folder)


def test_sparsify(tmp_path):
    rng = np.random.default_rng(10)
    arrays = {
        "encoder.weight": normal(rng, D_SAE, D_IN, scale=0.25),  # nn.Linear: [d_sae, d_in]
        "encoder.bias": normal(rng, D_SAE, scale=0.3),
        "W_dec": normal(rng, D_SAE, D_IN),  # already one row per latent
        "b_dec": normal(rng, D_IN, scale=0.5),
    }
    folder = write_sparsify(tmp_path / "run" / "layers.4", arrays, sparsify_cfg(D_IN, 7, D_SAE))
    sae = load_both(folder, "sparsify")
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("topk", 7, True)
    assert (sae.layer, sae.hook_name) == (4, "layers.4")

    x = inputs(rng)
    a = {k: f64(v) for k, v in arrays.items()}
    acts = topk(relu((f64(x) - a["b_dec"]) @ a["encoder.weight"].T + a["encoder.bias"]), 7)
    assert_math(sae, x, acts, acts @ a["W_dec"] + a["b_dec"])


def sparsify_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random sparsify SAE's tensors (its encoder an nn.Linear: [d_sae, d_in])."""
    return {
        "encoder.weight": normal(rng, D_SAE, D_IN),
        "encoder.bias": normal(rng, D_SAE),
        "W_dec": normal(rng, D_SAE, D_IN),
        "b_dec": normal(rng, D_IN),
    }


def test_sparsify_d_sae_from_expansion_factor(tmp_path):
    rng = np.random.default_rng(11)
    arrays = sparsify_arrays(rng)
    cfg = sparsify_cfg(D_IN, 3, 0, expansion_factor=D_SAE // D_IN)
    sae = load_both(write_sparsify(tmp_path / "embed_tokens", arrays, cfg), "sparsify")
    assert (sae.d_sae, sae.layer, sae.hook_name) == (D_SAE, None, "embed_tokens")


def goodfire_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "encoder_linear.weight": normal(rng, D_SAE, D_IN, scale=0.25),
        "encoder_linear.bias": normal(rng, D_SAE, scale=0.3),
        "decoder_linear.weight": normal(rng, D_IN, D_SAE),
        "decoder_linear.bias": normal(rng, D_IN, scale=0.5),
    }


def test_goodfire(tmp_path):
    rng = np.random.default_rng(12)
    arrays = goodfire_arrays(rng)
    file = write_goodfire(tmp_path / "tiny" / "Tiny-Instruct-SAE-l2.pth", arrays)
    for path in (file, file.parent):
        sae = load_both(path, "goodfire")
        assert (sae.architecture, sae.apply_b_dec_to_input) == ("relu", False)
        assert (sae.layer, sae.hook_name) == (2, None)
    x = inputs(rng)
    a = {k: f64(v) for k, v in arrays.items()}
    acts = relu(f64(x) @ a["encoder_linear.weight"].T + a["encoder_linear.bias"])
    assert_math(sae, x, acts, acts @ a["decoder_linear.weight"].T + a["decoder_linear.bias"])


def test_goodfire_file_in_torchs_legacy_format(tmp_path):
    # Not memory-mappable: inspect_sae falls back to a full load for the headers.
    arrays = goodfire_arrays(np.random.default_rng(16))
    file = tmp_path / "Legacy-SAE-l3.pt"
    state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    torch.save(state, file, _use_new_zipfile_serialization=False)
    sae = load_both(file, "goodfire")
    assert sae.layer == 3
    torch.testing.assert_close(sae.W_dec, state["decoder_linear.weight"].T)


def test_llama_scope(tmp_path):
    rng = np.random.default_rng(13)
    arrays = {
        "encoder.weight": normal(rng, D_SAE, D_IN, scale=0.25),
        "encoder.bias": normal(rng, D_SAE, scale=0.3),
        "decoder.weight": normal(rng, D_IN, D_SAE),
        "decoder.bias": normal(rng, D_IN, scale=0.5),
    }
    norm_in, threshold = 2.5, 0.3
    hp = llama_scope_hyperparams(D_IN, D_SAE, 6, threshold, norm_in)
    folder = write_llama_scope(tmp_path / "Llama3_1-8B-Base-L6R-8x", arrays, hp)
    sae = load_both(folder, "llama_scope")
    assert (sae.architecture, sae.apply_b_dec_to_input) == ("jumprelu", False)
    assert (sae.layer, sae.hook_name) == (6, "blocks.6.hook_resid_post")

    # SAELens' reading: inputs scaled by s = sqrt(d_model) / norm_in before encoding, the
    # scalar threshold multiplied by s, outputs divided by s.
    s = math.sqrt(D_IN) / norm_in
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), threshold * s))
    x = inputs(rng)
    a = {k: f64(v) for k, v in arrays.items()}
    pre = (s * f64(x)) @ a["encoder.weight"].T + a["encoder.bias"]
    acts = jumprelu(pre, threshold * s)
    assert ((pre > 0) & (acts == 0)).any()
    assert_math(sae, x, acts, (acts @ a["decoder.weight"].T + a["decoder.bias"]) / s)


# ---- dictionary_learning ----------------------------------------------------------------------


def linear_arrays(rng: np.random.Generator, b_dec_key: str) -> dict[str, np.ndarray]:
    """nn.Linear encoder (with bias) and decoder (without) as the library's classes hold them;
    decoder columns of unequal norm, so a decoder-norm fold would show."""
    return {
        "encoder.weight": normal(rng, D_SAE, D_IN, scale=0.25),
        "encoder.bias": normal(rng, D_SAE, scale=0.3),
        "decoder.weight": normal(rng, D_IN, D_SAE)
        * rng.uniform(0.2, 3.0, D_SAE).astype(np.float32),
        b_dec_key: normal(rng, D_IN, scale=0.5),
    }


def test_dictionary_learning_autoencoder_is_read_with_a_unit_norm_decoder(tmp_path):
    rng = np.random.default_rng(20)
    arrays = linear_arrays(rng, "bias")
    config = dictionary_learning_config("AutoEncoder", D_IN, D_SAE, 3)
    folder = write_dictionary_learning(tmp_path / "trainer_0", arrays, config)
    sae = load_both(folder, "dictionary_learning")
    assert (sae.architecture, sae.apply_b_dec_to_input) == ("relu", True)
    assert (sae.layer, sae.hook_name) == (3, "blocks.3.hook_resid_post")
    # AutoEncoder.from_pretrained divides each decoder column by its norm and multiplies the
    # feature's encoder row and bias by it: same reconstruction, activations in those units.
    a = {k: f64(v) for k, v in arrays.items()}
    norms = np.linalg.norm(a["decoder.weight"], axis=0)
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec.double().numpy(), axis=1), 1, rtol=1e-6)
    x = inputs(rng)
    acts = relu((f64(x) - a["bias"]) @ a["encoder.weight"].T + a["encoder.bias"]) * norms
    assert_math(sae, x, acts, acts @ (a["decoder.weight"] / norms).T + a["bias"])


def test_dictionary_learning_jumprelu(tmp_path):
    rng = np.random.default_rng(21)
    arrays = saelens_arrays(rng, threshold=True)  # the same parameters, named alike
    config = dictionary_learning_config("JumpReluAutoEncoder", D_IN, D_SAE, 2)
    sae = load_both(
        write_dictionary_learning(tmp_path / "sae", arrays, config), "dictionary_learning"
    )
    assert (sae.architecture, sae.apply_b_dec_to_input, sae.layer) == ("jumprelu", False, 2)
    a = {k: f64(v) for k, v in arrays.items()}
    x = inputs(rng)
    pre = f64(x) @ a["W_enc"] + a["b_enc"]
    acts = relu(pre * (pre > a["threshold"]))
    assert ((pre > 0) & (acts == 0)).any()
    assert_math(sae, x, acts, acts @ a["W_dec"] + a["b_dec"])


@pytest.mark.parametrize("k_in_config", [True, False])
def test_dictionary_learning_topk(tmp_path, k_in_config):
    rng = np.random.default_rng(22)
    # The threshold buffer is only read when encode is asked to (use_threshold=True).
    arrays = {**linear_arrays(rng, "b_dec"), "k": 6, "threshold": 0.5}
    extra = {"k": 6} if k_in_config else {}
    config = dictionary_learning_config("AutoEncoderTopK", D_IN, D_SAE, 1, **extra)
    sae = load_both(
        write_dictionary_learning(tmp_path / "sae", arrays, config), "dictionary_learning"
    )
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("topk", 6, True)
    a = {k: f64(v) for k, v in arrays.items() if isinstance(v, np.ndarray)}
    x = inputs(rng)
    acts = topk(relu((f64(x) - a["b_dec"]) @ a["encoder.weight"].T + a["encoder.bias"]), 6)
    assert_math(sae, x, acts, acts @ a["decoder.weight"].T + a["b_dec"])


def test_dictionary_learning_topk_whose_config_and_buffer_disagree_on_k_is_refused(tmp_path):
    """The library encodes with its k buffer and refuses an explicit k other than it."""
    arrays = {**linear_arrays(np.random.default_rng(24), "b_dec"), "k": 6}
    config = dictionary_learning_config("AutoEncoderTopK", D_IN, D_SAE, 1, k=9)
    path = write_dictionary_learning(tmp_path / "sae", arrays, config)
    with pytest.raises(SAEFormatError, match="the trainer's k is 9 but the state dict's k buffer"):
        load_sae(path)


@pytest.mark.parametrize("threshold", [0.4, -1.0])  # -1: never learned, a plain ReLU
@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_batch_topk_reads_as_its_scalar_threshold(
    tmp_path, dict_class, threshold
):
    rng = np.random.default_rng(23)
    if dict_class == "BatchTopKSAE":
        arrays: dict = linear_arrays(rng, "b_dec")
        W_enc, b_enc, W_dec = (
            arrays["encoder.weight"].T,
            arrays["encoder.bias"],
            arrays["decoder.weight"].T,
        )
    else:
        arrays = {**saelens_arrays(rng), "group_sizes": np.array([16, 48])}
        W_enc, b_enc, W_dec = arrays["W_enc"], arrays["b_enc"], arrays["W_dec"]
    arrays.update(k=4, threshold=threshold)
    config = dictionary_learning_config(dict_class, D_IN, D_SAE, 4, k=4)
    sae = load_both(
        write_dictionary_learning(tmp_path / "sae", arrays, config), "dictionary_learning"
    )
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input) == ("jumprelu", None, True)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), threshold))
    # encode's default at inference (use_threshold=True): relu, then the scalar threshold.
    x = inputs(rng)
    post = relu((f64(x) - f64(arrays["b_dec"])) @ f64(W_enc) + f64(b_enc))
    acts = post * (post > threshold)
    assert_math(sae, x, acts, acts @ f64(W_dec) + f64(arrays["b_dec"]))


def test_dictionary_learning_gated(tmp_path):
    rng = np.random.default_rng(27)
    g = gated_arrays(rng)
    arrays = {  # GatedAutoEncoder: nn.Linear encoder without bias, decoder_bias subtracted
        "decoder_bias": g["b_dec"],
        "encoder.weight": g["W_enc"].T.copy(),
        "r_mag": g["r_mag"],
        "gate_bias": g["b_gate"],
        "mag_bias": g["b_mag"],
        "decoder.weight": g["W_dec"].T.copy(),
    }
    config = dictionary_learning_config("GatedAutoEncoder", D_IN, D_SAE, 6)
    sae = load_both(
        write_dictionary_learning(tmp_path / "sae", arrays, config), "dictionary_learning"
    )
    assert (sae.architecture, sae.apply_b_dec_to_input, sae.layer) == ("jumprelu", True, 6)
    x = inputs(rng)
    assert_math(
        sae,
        x,
        *gated_reference(
            x, g["W_enc"], g["b_gate"], g["b_mag"], g["r_mag"], g["W_dec"], g["b_dec"], True
        ),
    )


@pytest.mark.parametrize(
    ("folder", "layer", "submodule", "hook", "steers"),
    [
        ("trainer_0", 5, "resid_post_layer_5", "blocks.5.hook_resid_post", 5),
        ("resid_post_layer_7/trainer_1", 7, None, "blocks.7.hook_resid_post", 7),
        ("trainer_0", 2, None, "blocks.2.hook_resid_post", 2),  # SAELens' assumption
        ("resid_out_layer3", None, None, "blocks.3.hook_resid_post", 3),  # early releases
        ("trainer_0", 0, "resid_post_layer_0", "blocks.0.hook_resid_post", 0),
        ("trainer_0", 0, "model.layers.0", "model.layers.0", 0),
        ("trainer_0", 2, "mlp_out_layer_2", "blocks.2.hook_mlp_out", "hook_mlp_out"),
        ("trainer_0", 2, "attn_out_layer_2", "blocks.2.hook_attn_out", "hook_attn_out"),
        ("trainer_0", 2, "model.layers.2.mlp", "model.layers.2.mlp", "layers.2.mlp"),
        ("embed", None, None, "hook_embed", "hook_embed"),
    ],
)
def test_dictionary_learning_site_from_submodule_or_folder(
    tmp_path, folder, layer, submodule, hook, steers
):
    config = dictionary_learning_config("AutoEncoder", D_IN, D_SAE, layer, submodule_name=submodule)
    arrays = linear_arrays(np.random.default_rng(24), "bias")
    sae = load_sae(write_dictionary_learning(tmp_path / folder, arrays, config))
    assert sae.hook_name == hook
    if isinstance(steers, int):
        assert residual_layer(sae) == steers
    else:  # a site other than a layer's output is refused, naming it
        with pytest.raises(NotALayerOutputError, match=steers):
            residual_layer(sae)


def test_dictionary_learning_early_release_without_a_dict_class(tmp_path):
    rng = np.random.default_rng(25)
    arrays = linear_arrays(rng, "bias")
    config = {"trainer": {"activation_dim": D_IN, "dict_size": D_SAE}, "buffer": {}}
    sae = load_both(write_dictionary_learning(tmp_path / "resid_out_layer1", arrays, config),
                    "dictionary_learning")  # fmt: skip
    assert (sae.architecture, sae.layer) == ("relu", 1)


def test_dictionary_learning_wins_detection_over_goodfire_for_its_folder_and_file(tmp_path):
    arrays = linear_arrays(np.random.default_rng(26), "bias")
    config = dictionary_learning_config("AutoEncoder", D_IN, D_SAE, 1)
    folder = write_dictionary_learning(tmp_path / "sae", arrays, config)
    assert detect_format(folder) == detect_format(folder / "ae.pt") == "dictionary_learning"
    assert detect_format(folder / "config.json") == "dictionary_learning"
    other = write_goodfire(folder / "Other-SAE-l1.pt", goodfire_arrays(np.random.default_rng(0)))
    assert detect_format(other) == "goodfire"


# ---- dtype, SAE.to, detection, import hygiene ------------------------------------------------


def test_dtype_argument_casts_and_to_returns_a_new_sae(tmp_path):
    rng = np.random.default_rng(14)
    file = write_gemma_scope(tmp_path / "params.npz", gemma_arrays(rng))
    sae = load_sae(file, dtype=torch.float64)
    assert_canonical(sae, torch.float64)
    half = sae.to(dtype=torch.float16)
    assert_canonical(half, torch.float16)
    assert sae.W_enc.dtype == torch.float64  # the original is untouched
    assert (half.layer, half.format, half.source) == (sae.layer, sae.format, sae.source)
    x = torch.from_numpy(inputs(rng))
    torch.testing.assert_close(half.encode(x).double(), sae.encode(x), atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="floating"):
        load_sae(file, dtype=torch.int32)


def test_detect_format_accepts_a_file_inside_a_folder_format(tmp_path):
    rng = np.random.default_rng(15)
    cfg = saelens_v6_cfg("standard", D_IN, D_SAE, "blocks.0.hook_resid_post")
    folder = write_saelens(tmp_path / "sae", saelens_arrays(rng), cfg)
    assert detect_format(folder / "sae_weights.safetensors") == "saelens"
    assert load_sae(folder / "cfg.json").source == str(folder)
    assert set(FORMATS) == {
        "saelens",
        "gemma_scope",
        "gemma_scope_2",
        "sparsify",
        "goodfire",
        "llama_scope",
        "dictionary_learning",
    }


def test_a_relative_path_keeps_the_layer_and_site_its_folder_names(tmp_path, monkeypatch):
    """Paths are made absolute, not resolved: `.` inside layers.4 is layer 4 (it had none),
    and a symlink named for a release is read as that release."""
    rng = np.random.default_rng(21)
    arrays = sparsify_arrays(rng)
    folder = write_sparsify(tmp_path / "run" / "layers.4", arrays, sparsify_cfg(D_IN, 7, D_SAE))
    monkeypatch.chdir(folder)
    for path in (".", "sae.safetensors"):
        sae = inspect_sae(path)
        assert (sae.layer, sae.hook_name, sae.source) == (4, "layers.4", str(folder))
        assert load_sae(path).layer == 4
    inner = "layer_2/width_16k/average_l0_50/params.npz"
    write_gemma_scope(tmp_path / "mlp-localdir" / inner, gemma_arrays(rng))
    (tmp_path / "gemma-scope-2b-pt-mlp").symlink_to(tmp_path / "mlp-localdir")
    monkeypatch.chdir(tmp_path)
    sae = inspect_sae(Path("gemma-scope-2b-pt-mlp", inner).parent)
    assert (sae.layer, sae.hook_name, sae.site_assumed) == (2, "blocks.2.hook_mlp_out", None)


def test_sae_package_imports_without_vllm_fastapi_or_pydantic():
    code = (
        "import sys, sae_vllm.sae; "
        "print(sorted(m for m in ('vllm', 'fastapi', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- bad files --------------------------------------------------------------------------------


def _saelens(
    tmp: Path,
    *,
    arch: str = "standard",
    drop: str | None = None,
    arrays: dict | None = None,
    scaler: float | str | None = "absent",
    **cfg_extra,
):
    arrays = arrays or saelens_arrays(np.random.default_rng(0), threshold=arch == "jumprelu")
    if drop:
        del arrays[drop]
    cfg = saelens_v6_cfg(arch, D_IN, D_SAE, "blocks.0.hook_resid_post")
    cfg.update(cfg_extra)
    return write_saelens(tmp / "sae", arrays, cfg, scaling_factor=scaler), None


def _wrong_shape(tmp: Path):
    arrays = saelens_arrays(np.random.default_rng(0))
    arrays["W_dec"] = arrays["W_dec"][:, :-1]
    return _saelens(tmp, arrays=arrays)


def _non_float(tmp: Path):
    arrays = saelens_arrays(np.random.default_rng(0))
    arrays["b_enc"] = np.arange(D_SAE, dtype=np.int32)
    return _saelens(tmp, arrays=arrays)


def _corrupt(name: str, fmt: str | None = None):
    def setup(tmp: Path):
        folder, _ = _saelens(tmp)
        (folder / name).write_bytes(b"\x00garbage, not what the name says")
        return folder, fmt

    return setup


def _corrupt_npz(tmp: Path):
    (tmp / "params.npz").write_bytes(b"PK\x03\x04 truncated zip")
    return tmp / "params.npz", None


def _float128_npz(tmp: Path):
    arrays = gemma_arrays(np.random.default_rng(0))
    arrays["W_enc"] = arrays["W_enc"].astype(np.longdouble)
    return write_gemma_scope(tmp / "params.npz", arrays), None


def _llama_scope(tmp: Path, **hp_changes):
    rng = np.random.default_rng(0)
    arrays = {
        "encoder.weight": normal(rng, D_SAE, D_IN),
        "encoder.bias": normal(rng, D_SAE),
        "decoder.weight": normal(rng, D_IN, D_SAE),
        "decoder.bias": normal(rng, D_IN),
    }
    hp = llama_scope_hyperparams(D_IN, D_SAE, 1, 0.2, 3.0)
    for key, value in hp_changes.items():
        if value is None:
            del hp[key]
        else:
            hp[key] = value
    return write_llama_scope(tmp / "ls", arrays, hp), None


def _sparsify(tmp: Path, **cfg_changes):
    rng = np.random.default_rng(0)
    arrays = sparsify_arrays(rng)
    cfg = sparsify_cfg(D_IN, 4, D_SAE)
    cfg.update(cfg_changes)
    return write_sparsify(tmp / "layers.1", arrays, cfg), None


def _gemma_scope_2(tmp: Path, site: str = "resid_post", skip: bool = False, **config):
    arrays = {k.lower(): v for k, v in gemma_arrays(np.random.default_rng(0)).items()}
    if skip:
        arrays["affine_skip_connection"] = np.eye(D_IN, dtype=np.float32)
    folder = tmp / site / "layer_1_width_16k_l0_small"
    return write_gemma_scope_2(folder, arrays, config or None), None


def _gemma_scope_transcoder(tmp: Path):
    arrays = gemma_arrays(np.random.default_rng(0))
    folder = tmp / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_54"
    return write_gemma_scope(folder / "params.npz", arrays), None


def _without_weights(tmp: Path):
    folder, _ = _saelens(tmp)
    (folder / "sae_weights.safetensors").unlink()
    return folder, "saelens"


def _goodfire_two_files(tmp: Path):
    arrays = goodfire_arrays(np.random.default_rng(0))
    write_goodfire(tmp / "a.pt", arrays)
    write_goodfire(tmp / "b.pt", arrays)
    return tmp, "goodfire"


def _goodfire_missing_key(tmp: Path):
    arrays = goodfire_arrays(np.random.default_rng(0))
    del arrays["decoder_linear.bias"]
    return write_goodfire(tmp / "sae.pth", arrays), None


def _dictionary_learning(
    tmp: Path, dict_class: str | None = "AutoEncoder", drop: str | None = None, **trainer
):
    rng = np.random.default_rng(0)
    if dict_class in ("JumpReluAutoEncoder", None):
        arrays: dict = {**saelens_arrays(rng), "threshold": np.ones(D_SAE, np.float32)}
    else:
        arrays = linear_arrays(rng, "bias" if dict_class == "AutoEncoder" else "b_dec")
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        arrays["threshold"] = 0.5
    arrays.pop(drop, None)
    config = dictionary_learning_config(str(dict_class), D_IN, D_SAE, 1, **trainer)
    if dict_class is None:
        del config["trainer"]["dict_class"]
    return write_dictionary_learning(tmp / "sae", arrays, config), None


def _dictionary_learning_without_config(tmp: Path):
    folder = _dictionary_learning(tmp)[0]
    (folder / "config.json").unlink()
    return folder / "ae.pt", None


def _dictionary_learning_without_trainer(tmp: Path):
    folder = _dictionary_learning(tmp)[0]
    (folder / "config.json").write_text('{"buffer": {}}')
    return folder, None


def _dictionary_learning_per_feature_threshold(tmp: Path):
    folder = _dictionary_learning(tmp, "BatchTopKSAE", k=4)[0]
    state = torch.load(folder / "ae.pt")
    state["threshold"] = torch.ones(D_SAE)
    torch.save(state, folder / "ae.pt")
    return folder, None


def _empty_folder(tmp: Path):
    (tmp / "empty").mkdir()
    return tmp / "empty", None


def _release_folder(tmp: Path):
    """A folder of SAEs, as a release is: one SAE at its top level, one two levels down."""
    for inner in ("l0", "l3/width_16k"):
        (tmp / "release" / inner).mkdir(parents=True)
        _saelens(tmp / "release" / inner)
    return tmp / "release", None


def _float8(tmp: Path):
    arrays = saelens_arrays(np.random.default_rng(0))
    tensors = {k: torch.from_numpy(v).to(torch.float8_e4m3fn) for k, v in arrays.items()}
    cfg = saelens_v6_cfg("standard", D_IN, D_SAE, "blocks.0.hook_resid_post")
    return write_saelens_torch(tmp / "sae", tensors, cfg), None


def _no_features(tmp: Path):
    arrays = saelens_arrays(np.random.default_rng(0))
    arrays.update(
        W_enc=arrays["W_enc"][:, :0], b_enc=arrays["b_enc"][:0], W_dec=arrays["W_dec"][:0]
    )
    return _saelens(tmp, arrays=arrays, d_sae=0)


def _with_threshold(tmp: Path, arch: str, **cfg_extra):
    arrays = saelens_arrays(np.random.default_rng(0), threshold=True)
    return _saelens(tmp, arch=arch, arrays=arrays, **cfg_extra)


def _fifo(tmp: Path, fmt: str | None = None):
    os.mkfifo(tmp / "sae.fifo")
    return tmp / "sae.fifo", fmt


BAD_FILES: dict[str, tuple[Callable[[Path], tuple[Path, str | None]], str]] = {
    "no such path": (lambda t: (t / "nowhere", None), "no such file or folder"),
    "no such path, format named": (lambda t: (t / "nowhere", "saelens"), "no such file or folder"),
    "format not detectable": (_empty_folder, "not a recognised SAE"),
    "a folder of SAEs": (
        _release_folder,
        "a folder of 2 SAEs, not one; pass one of them: l0/sae, l3/width_16k/sae",
    ),
    "unknown format name": (lambda t: (_saelens(t)[0], "safetensors"), "unknown SAE format"),
    "missing weights file": (_without_weights, "missing sae_weights.safetensors"),
    "missing key": (lambda t: _saelens(t, arch="jumprelu", drop="threshold"), "'threshold'"),
    "missing key, goodfire": (_goodfire_missing_key, "'decoder_linear.bias'"),
    "missing config value": (
        lambda t: _llama_scope(t, jump_relu_threshold=None),
        "'jump_relu_threshold'",
    ),
    "shape mismatch": (_wrong_shape, r"W_dec has shape \[64, 15\], expected \[64, 16\]"),
    "d_in differs from cfg": (lambda t: _saelens(t, d_in=32), "d_in is 32"),
    "d_sae differs from cfg": (lambda t: _sparsify(t, num_latents=128), "d_sae is 128"),
    "non-float tensor": (_non_float, "non-float dtype"),
    "float8 tensor": (_float8, r"W_enc has unsupported dtype torch\.float8_e4m3fn"),
    "no features": (_no_features, "d_sae=0: an SAE needs at least one input and one feature"),
    "a FIFO": (_fifo, "not a file or folder an SAE reader reads"),
    "a FIFO, format named": (lambda t: _fifo(t, "goodfire"), "not a file or folder an SAE"),
    "threshold beside a standard cfg": (
        lambda t: _with_threshold(t, "standard"),
        "holds a threshold, but the config says architecture 'standard', which has none",
    ),
    "threshold beside a topk cfg": (
        lambda t: _with_threshold(t, "topk", k=4),
        "holds a threshold, but the config says architecture 'topk'",
    ),
    "apply_b_dec_to_input a string": (
        lambda t: _saelens(t, apply_b_dec_to_input="false"),
        "apply_b_dec_to_input must be true or false, got 'false'",
    ),
    "rescale_acts_by_decoder_norm a string": (
        lambda t: _saelens(t, arch="topk", k=4, rescale_acts_by_decoder_norm="false"),
        "rescale_acts_by_decoder_norm must be true or false",
    ),
    "unknown architecture": (
        lambda t: _saelens(t, arch="banana"),
        "unsupported architecture 'banana'",
    ),
    "saelens transcoder": (
        lambda t: _saelens(t, arch="skip_transcoder"),
        "unsupported architecture",
    ),
    "sparsify transcoder": (lambda t: _sparsify(t, transcode=True), "unsupported architecture"),
    "sparsify groupmax": (
        lambda t: _sparsify(t, activation="groupmax"),
        "unsupported architecture",
    ),
    **{
        f"llama scope {key} not Llama Scope's": (
            lambda t, key=key, value=value: _llama_scope(t, **{key: value}),
            f"{key} is {value!r}; only Llama Scope's",
        )
        for key, value in [
            ("apply_decoder_bias_to_pre_encoder", True),
            ("act_fn", "topk"),
            ("norm_activation", "token-wise"),
            ("use_glu_encoder", True),
            ("use_decoder_bias", False),
            ("sae_type", "crosscoder"),
        ]
    },
    "llama scope output norm differs": (
        lambda t: _llama_scope(t, dataset_average_activation_norm={"in": 3.0, "out": 6.0}),
        r"dataset_average_activation_norm.out \(6.0\) differs from .in \(3.0\)",
    ),
    "npz float128": (_float128_npz, "W_enc has unsupported dtype float128"),
    "llama scope transcoder": (
        lambda t: _llama_scope(t, hook_point_out="blocks.1.hook_mlp_out"),
        "unsupported architecture",
    ),
    "gemma scope transcoder": (_gemma_scope_transcoder, r"unsupported architecture \(Gemma"),
    "gemma scope 2 skip transcoder": (
        lambda t: _gemma_scope_2(t, skip=True),
        r"unsupported architecture \(skip transcoder",
    ),
    "gemma scope 2 transcoder folder": (
        lambda t: _gemma_scope_2(t, site="transcoder_all"),
        "unsupported architecture",
    ),
    "gemma scope 2 transcoder config": (
        lambda t: _gemma_scope_2(
            t,
            hf_hook_point_in="model.layers.1.pre_feedforward_layernorm",
            hf_hook_point_out="model.layers.1.post_feedforward_layernorm",
        ),
        r"unsupported architecture \(transcoder",
    ),
    "topk without k": (lambda t: _saelens(t, arch="topk"), "without k"),
    "k larger than d_sae": (lambda t: _saelens(t, arch="topk", k=D_SAE + 1), "k <= d_sae"),
    "per-token normalisation": (
        lambda t: _saelens(t, normalize_activations="layer_norm"),
        "not supported",
    ),
    "scaling factor missing": (
        lambda t: _saelens(t, normalize_activations="expected_average_only_in"),
        "scaling factor is missing",
    ),
    "scaling factor null": (
        lambda t: _saelens(t, normalize_activations="expected_average_only_in", scaler=None),
        "scaling factor is missing",
    ),
    "corrupt safetensors": (_corrupt("sae_weights.safetensors"), "cannot read safetensors"),
    "corrupt json": (_corrupt("cfg.json"), "cannot read JSON"),
    "corrupt npz": (_corrupt_npz, "cannot read npz"),
    "ambiguous goodfire folder": (_goodfire_two_files, "expected one .pt/.pth file, found 2"),
    "gated without r_mag": (
        lambda t: _saelens(
            t, arch="gated", arrays=gated_arrays(np.random.default_rng(0)), drop="r_mag"
        ),
        "'r_mag'",
    ),
    "dictionary_learning unknown class": (
        lambda t: _dictionary_learning(t, "Banana"),
        "dict_class 'Banana'",
    ),
    "dictionary_learning no class, not an AutoEncoder": (
        lambda t: _dictionary_learning(t, None),
        "missing 'trainer.dict_class'",
    ),
    "dictionary_learning ae.pt without config.json": (
        _dictionary_learning_without_config,
        r"not a recognised SAE \(.*config\.json \+ ae\.pt",
    ),
    "dictionary_learning without trainer": (_dictionary_learning_without_trainer, "'trainer'"),
    "dictionary_learning missing key": (
        lambda t: _dictionary_learning(t, drop="encoder.bias"),
        "'encoder.bias'",
    ),
    "dictionary_learning d_sae differs from config": (
        lambda t: _dictionary_learning(t, dict_size=128),
        "d_sae is 128",
    ),
    "dictionary_learning topk without k": (
        lambda t: _dictionary_learning(t, "AutoEncoderTopK"),
        "without k",
    ),
    "dictionary_learning per-feature batch threshold": (
        _dictionary_learning_per_feature_threshold,
        "expected one number",
    ),
}


READS = {"load": load_sae, "inspect": inspect_sae, "norms": decoder_norms, "open": open_sae}


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_sae_format_error_naming_the_file(tmp_path, case, read):
    setup, message = BAD_FILES[case]
    path, fmt = setup(tmp_path)
    with pytest.raises(SAEFormatError, match=message) as error:
        READS[read](path, format=fmt)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("read", list(READS))
def test_goodfire_pickles_are_never_unpickled_beyond_tensors(tmp_path, read):
    marker = tmp_path / "side-effect"
    arrays = {**goodfire_arrays(np.random.default_rng(0)), "extra": MakesDirWhenUnpickled(marker)}
    file = write_goodfire(tmp_path / "evil.pt", arrays)
    with pytest.raises(SAEFormatError, match=r"evil\.pt.*weights_only"):
        READS[read](file)
    assert not marker.exists()


def test_a_pickled_module_is_refused_with_torchs_reason_in_plain_text(tmp_path):
    """torch's weights_only message opens with advice in bold (terminal escapes); the error
    gives its reason, as plain text."""
    file = tmp_path / "module-l2.pt"
    torch.save(torch.nn.Linear(3, 3), file)
    with pytest.raises(SAEFormatError) as error:
        load_sae(file)
    message = str(error.value)
    assert "\x1b" not in message
    assert message == (
        f"{file}: cannot load with torch.load(weights_only=True) (UnpicklingError: Unsupported "
        "global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by default.)"
    )


def write_sparse_safetensors(
    file: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F32"
) -> int:
    """A safetensors file whose data is a hole (zeros, no disk blocks); its size."""
    itemsize = {"F32": 4, "BF16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = itemsize * math.prod(shape)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        out.truncate(8 + len(encoded) + offset)
    return 8 + len(encoded) + offset


def test_inspecting_a_64_gib_sae_reads_only_its_headers(tmp_path):
    d_in, d_sae = 4096, 2**21
    folder = tmp_path / "huge"
    cfg = saelens_v6_cfg("standard", d_in, d_sae, "blocks.20.hook_resid_post")
    (folder / "cfg.json").parent.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    size = write_sparse_safetensors(folder / "sae_weights.safetensors", shapes)
    assert size > 64 * 2**30  # more than this machine's memory: a real load could not finish
    sae = inspect_sae(folder)
    assert (sae.d_in, sae.d_sae, sae.layer, sae.architecture) == (d_in, d_sae, 20, "relu")
    assert sae.W_dec.is_meta and sae.W_dec.shape == (d_sae, d_in)
    # What the frontend and engine core check feature indexes with.
    config = SteeringConfig(saes=[SAEEntry(id="huge", path=str(folder))])
    assert sae_sizes(config) == {"huge": d_sae}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_decoder_norms_stream_the_decoder_instead_of_loading_it(tmp_path):
    d_in, d_sae = 4096, 32768  # a bfloat16 decoder: 256 MiB on disk, 512 MiB as float32
    folder = tmp_path / "big"
    cfg = saelens_v6_cfg("standard", d_in, d_sae, "blocks.3.hook_resid_post")
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    write_sparse_safetensors(folder / "sae_weights.safetensors", shapes, dtype="BF16")
    # The sampler sees a whole-decoder computation (what the server did before streaming).
    _, whole = peak_anonymous_growth(lambda: load_sae(folder).W_dec.float().norm(dim=1))
    assert whole > 400 * 2**20, f"the sampler saw only {whole / 2**20:.0f} MiB"
    norms, streamed = peak_anonymous_growth(lambda: decoder_norms(folder))
    assert norms.shape == (d_sae,) and not norms.any()  # the file's data is all zeros
    assert streamed < 128 * 2**20, f"{streamed / 2**20:.0f} MiB of anonymous memory"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_loading_holds_the_result_and_one_block_never_the_file_whole(tmp_path):
    # A float32 Llama Scope folder, 512 MiB, whose dataset-norm fold rescales both matrices
    # (before streaming: the file whole, each fold's out-of-place copy, a contiguous copy).
    d_in, d_sae = 4096, 16384
    folder = tmp_path / "llama_scope"
    hyperparams = llama_scope_hyperparams(d_in, d_sae, 3, threshold=0.1, norm_in=20.0)
    (folder / "hyperparams.json").parent.mkdir()
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams))
    shapes = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d_in, d_sae),
        "decoder.bias": (d_in,),
    }
    size = write_sparse_safetensors(folder / "checkpoints" / "final.safetensors", shapes)
    sae, loaded = peak_anonymous_growth(lambda: load_sae(folder))
    result = sum(t.numel() * t.element_size() for t in (sae.W_enc, sae.W_dec))
    assert result > 0.99 * size and not sae.W_enc.any()  # the file's data is all zeros
    # The sampler sees the result itself; beyond it, a block or two (8 MiB of float32 each)
    # and what the allocator keeps of them: 7-48 MiB seen (the whole file before streaming).
    assert result <= loaded < result + 128 * 2**20, f"{loaded / 2**20:.0f} MiB"
    del sae
    weights, streamed = peak_anonymous_growth(
        lambda: steering_weights(open_sae(folder), dtype=torch.bfloat16, device="cpu")
    )
    kept = sum(t.numel() * t.element_size() for t in (weights.enc_t, weights.W_dec))
    assert kept == 2 * d_in * d_sae * 2  # both matrices, in bfloat16
    assert kept <= streamed < kept + 128 * 2**20, f"{streamed / 2**20:.0f} MiB"


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """The address ranges at which this process maps file (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(file):
            begin, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_no_tensor_handed_out_is_a_view_of_the_mapped_file(tmp_path):
    # Same dtype, no fold: the cases where a cast would return the mapped tensor itself. A view
    # would keep the file mapped, and a file changed underneath would change or crash steering.
    cfg = saelens_v6_cfg("jumprelu", D_IN, D_SAE, "blocks.1.hook_resid_post")
    folder = write_saelens(tmp_path / "sae", saelens_arrays(np.random.default_rng(0), True), cfg)
    file = folder / "sae_weights.safetensors"
    opened = open_sae(folder)
    assert mapped_ranges(file), "open_sae is expected to map the file"
    weights = steering_weights(opened, dtype=torch.float32, device="cpu")
    loaded = load_sae(folder)
    handed_out = {
        "header": (opened.header, ("b_enc", "b_dec", "threshold")),
        "loaded": (loaded, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")),
        "weights": (weights, ("enc_t", "b_enc", "threshold", "W_dec")),
    }
    for owner, (holder, names) in handed_out.items():
        for name in names:
            address = getattr(holder, name).untyped_storage().data_ptr()
            inside = any(begin <= address < end for begin, end in mapped_ranges(file))
            assert not inside, f"{owner}.{name}"
