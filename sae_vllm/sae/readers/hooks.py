"""Layer numbers from hook names ("blocks.12.hook_resid_post", "layers.12") and config fields
(each Gemma Scope reader takes its layer_12 folder where its release layout puts it)."""

from __future__ import annotations

import re

# TransformerLens blocks.N, HF/sparsify layers.N (also model.layers.N...), GPT-2's h.N.
_HOOK_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)")


def layer_number(value: object) -> int | None:
    """A config's layer field as a layer number; None when it is not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layer_from_hook(hook_name: str | None) -> int | None:
    match = _HOOK_LAYER.search(hook_name) if hook_name else None
    return int(match.group(1)) if match else None
