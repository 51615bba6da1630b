"""Which decoder layer's output an SAE reads, from its hook name, and which it steers; sites
that are no layer output refused, and a model without the layer or of another width named."""

from __future__ import annotations

import pytest
import torch

from sae_vllm.sae import SAE
from sae_vllm.sae.sites import (
    NotALayerOutputError,
    layer_override,
    model_misfit,
    residual_layer,
    steered_layer,
)


def sae(hook: str | None, layer: int | None) -> SAE:
    return SAE(
        W_enc=torch.zeros(4, 8), b_enc=torch.zeros(8), W_dec=torch.zeros(8, 4),
        b_dec=torch.zeros(4), threshold=None, k=None, architecture="relu",
        apply_b_dec_to_input=False, layer=layer, hook_name=hook, format="saelens",
        source="sae-dir",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hook", "layer", "expected"),
    [
        ("blocks.12.hook_resid_post", 12, 12),
        ("blocks.12.hook_resid_pre", 12, 11),
        ("layers.7", 7, 7),
        ("model.layers.7", 7, 7),
        ("gpt_neox.layers.7", 7, 7),  # sparsify hookpoints: a decoder layer's module
        ("h.7", 7, 7),
        ("transformer.h.7", 7, 7),
        ("model.layers.7.output", 7, 7),  # Gemma Scope 2's configs
        (None, 3, 3),
        (None, None, None),
        ("resid_7", None, None),  # a site this module cannot place: the user's layer decides
    ],
)
def test_residual_sites_map_to_the_layer_whose_output_they_read(hook, layer, expected):
    assert residual_layer(sae(hook, layer)) == expected


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.3.hook_mlp_out",
        "blocks.3.attn.hook_z",
        "layers.3.mlp",
        "blocks.0.hook_resid_pre",
        "model.layers.3.self_attn.o_proj.input",  # Gemma Scope 2's attention SAEs
        "model.layers.3.post_feedforward_layernorm.output",
        "model.layers.3.mlp.output",
    ],
)
def test_sites_that_are_not_a_layer_output_are_refused(hook):
    layer = int(next(part for part in hook.split(".") if part.isdigit()))
    with pytest.raises(NotALayerOutputError, match="not the output of a decoder layer"):
        residual_layer(sae(hook, layer))


@pytest.mark.parametrize(
    "hook", ["hook_embed", "blocks.0.hook_embed", "embed_tokens", "model.embed_tokens", "wte"]
)
def test_the_embeddings_are_refused_though_they_name_no_layer(hook):
    """Before any layer: an explicit layer must not make a decoder layer's output read them."""
    with pytest.raises(NotALayerOutputError, match=f"reads {hook}, not the output of a decoder"):
        residual_layer(sae(hook, None))


def test_a_configured_layer_wins_but_never_over_a_site_that_is_no_layer_output():
    assert steered_layer(sae("blocks.12.hook_resid_post", 12), 5) == 5
    assert steered_layer(sae("blocks.12.hook_resid_pre", 12), None) == 11
    assert steered_layer(sae(None, None), None) is None
    with pytest.raises(NotALayerOutputError):
        steered_layer(sae("blocks.12.hook_mlp_out", 12), 12)


def test_a_configured_layer_other_than_the_files_is_named_for_a_warning():
    assert layer_override(sae("blocks.12.hook_resid_pre", 12), 12) == (
        "configured to steer the output of layer 12, but its file reads "
        "blocks.12.hook_resid_pre, the output of layer 11"
    )
    assert layer_override(sae("blocks.12.hook_resid_pre", 12), 11) is None
    assert layer_override(sae("blocks.12.hook_resid_post", 12), None) is None
    assert layer_override(sae(None, None), 3) is None  # the file names no layer
    assert "its file reads layer 4" in layer_override(sae(None, 4), 3)


def test_a_model_without_the_layer_or_of_another_width_is_named():
    assert model_misfit(4, 3, hidden_size=4, num_layers=4) is None
    assert model_misfit(4, 4, 4, 4) == "layer 4 does not exist (the model has layers 0..3)"
    assert model_misfit(4, -1, 4, 4) == "layer -1 does not exist (the model has layers 0..3)"
    assert model_misfit(8, 0, 4, 4) == "d_in 8 does not match the model's hidden size 4"
