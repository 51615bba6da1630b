"""Which decoder layer's output an SAE reads (from its hook name, or as configured): the layer
steering edits, and whether a model has that layer at the SAE's width."""

from __future__ import annotations

import re

from .model import SAE

# TransformerLens' resid_post; a decoder layer's module (sparsify's hookpoints), with any
# prefix: layers.N, model.layers.N, gpt_neox.layers.N, GPT-2's h.N and transformer.h.N, or its
# output (Gemma Scope 2's model.layers.N.output)
_RESID_POST = re.compile(
    r"^(?:\w+\.)*(?:blocks\.\d+\.hook_resid_post|(?:layers|h)\.\d+(?:\.output)?)$"
)
_RESID_PRE = re.compile(r"^blocks\.\d+\.hook_resid_pre$")
# TransformerLens' other sites of a block, without their layer (hook_mlp_out, attn.hook_z)
_OTHER_SITES = re.compile(r"(?:^|\.)hook_(?:mlp_out|attn_out|z|resid_mid|mlp_in)$")
# The embeddings: the residual stream before layer 0, which no layer's output is
_EMBEDDINGS = re.compile(
    r"(?:^|\.)(?:hook_embed|hook_pos_embed|embed_tokens|embed_in|embeddings?|wte|wpe)(?:\.|$)"
)


class NotALayerOutputError(ValueError):
    """The SAE reads a site (MLP or attention output, hook_z, the embeddings) that editing a
    decoder layer's output cannot steer."""


def residual_layer(sae: SAE) -> int | None:
    """The layer whose output (resid_post) the SAE reads; None when the file names no layer
    (the user's layer decides, for a site this module cannot place).

    `blocks.L.hook_resid_pre` is resid_post of layer L-1; the embeddings, TransformerLens'
    other sites (with or without a layer) and other sites of a known layer raise
    NotALayerOutputError."""
    hook = sae.hook_name
    if hook is None or _RESID_POST.match(hook):
        return sae.layer
    if _RESID_PRE.match(hook) and sae.layer is not None and sae.layer > 0:
        return sae.layer - 1
    if sae.layer is None and not (_EMBEDDINGS.search(hook) or _OTHER_SITES.search(hook)):
        return None
    raise NotALayerOutputError(
        f"SAE at {sae.source} reads {hook}, not the output of a decoder layer"
    )


def steered_layer(sae: SAE, configured: int | None) -> int | None:
    """The decoder layer an SAE steers: the configured one when given, else the one its file
    names; None when neither does. Raises NotALayerOutputError for a file that reads another
    site, whatever layer is configured."""
    file_layer = residual_layer(sae)
    return configured if configured is not None else file_layer


def layer_override(sae: SAE, configured: int | None) -> str | None:
    """Why a configured layer is worth a warning: it differs from the layer the SAE's file
    reads, so the SAE steers a residual stream it was not trained on (a `blocks.L.hook_resid_pre`
    SAE given `@L` is the usual slip: it reads layer L-1's output); None when they agree or
    either is unknown."""
    file_layer = residual_layer(sae)
    if configured is None or file_layer is None or configured == file_layer:
        return None
    return (
        f"configured to steer the output of layer {configured}, but its file reads "
        f"{sae.hook_name or f'layer {sae.layer}'}, the output of layer {file_layer}"
    )


def model_misfit(d_in: int, layer: int, hidden_size: int, num_layers: int) -> str | None:
    """Why an SAE of width `d_in` at `layer` cannot steer a model of this hidden size and
    number of layers; None when it can."""
    if not 0 <= layer < num_layers:
        return f"layer {layer} does not exist (the model has layers 0..{num_layers - 1})"
    if d_in != hidden_size:
        return f"d_in {d_in} does not match the model's hidden size {hidden_size}"
    return None
