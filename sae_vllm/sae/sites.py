"""Which decoder layer's output an SAE reads, from its hook name: the layer steering edits."""

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

    `blocks.L.hook_resid_pre` is resid_post of layer L-1; the embeddings, and other sites of
    a known layer, raise NotALayerOutputError."""
    hook = sae.hook_name
    if hook is None or _RESID_POST.match(hook):
        return sae.layer
    if _RESID_PRE.match(hook) and sae.layer is not None and sae.layer > 0:
        return sae.layer - 1
    if sae.layer is None and not _EMBEDDINGS.search(hook):
        return None
    raise NotALayerOutputError(
        f"SAE at {sae.source} reads {hook}, not the output of a decoder layer"
    )
