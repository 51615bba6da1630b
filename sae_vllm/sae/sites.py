"""Which decoder layer's output an SAE reads, from its hook name: the layer steering edits."""

from __future__ import annotations

import re

from .model import SAE

_RESID_POST = re.compile(r"^(blocks\.\d+\.hook_resid_post|(model\.)?layers\.\d+)$")
_RESID_PRE = re.compile(r"^blocks\.\d+\.hook_resid_pre$")


class NotALayerOutputError(ValueError):
    """The SAE reads a site (MLP or attention output, hook_z, the embeddings) that editing a
    decoder layer's output cannot steer."""


def residual_layer(sae: SAE) -> int | None:
    """The layer whose output (resid_post) the SAE reads; None when the file names no layer.

    `blocks.L.hook_resid_pre` is resid_post of layer L-1; other sites raise
    NotALayerOutputError."""
    hook = sae.hook_name
    if hook is None or sae.layer is None or _RESID_POST.match(hook):
        return sae.layer
    if _RESID_PRE.match(hook) and sae.layer > 0:
        return sae.layer - 1
    raise NotALayerOutputError(
        f"SAE at {sae.source} reads {hook}, not the output of a decoder layer"
    )
