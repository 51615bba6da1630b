"""Layer numbers from hook names ("blocks.12.hook_resid_post", "layers.12"), layer_12 folders
and config fields."""

from __future__ import annotations

import re
from pathlib import Path

# TransformerLens blocks.N, HF/sparsify layers.N (also model.layers.N...), GPT-2's h.N.
_HOOK_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)")
# Gemma Scope folders: layer_12 (Gemma 2) and layer_12_width_16k_l0_medium (Gemma 3).
_FOLDER_LAYER = re.compile(r"^layer_(\d+)(?:_|$)")


def layer_number(value: object) -> int | None:
    """A config's layer field as a layer number; None when it is not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layer_from_hook(hook_name: str | None) -> int | None:
    match = _HOOK_LAYER.search(hook_name) if hook_name else None
    return int(match.group(1)) if match else None


def layer_from_path(path: Path) -> int | None:
    """The layer of the innermost `layer_N...` component of path, if any."""
    for part in reversed(path.parts):
        match = _FOLDER_LAYER.match(part)
        if match:
            return int(match.group(1))
    return None
