"""Check a configured SAE from its files' headers: that it reads, and which layer it steers."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .config import SAEEntry
from .sae import SAE, SAEFormatError, inspect_sae
from .sae.hub import local_sae_path
from .sae.sites import NotALayerOutputError, steered_layer


class SAEEntryError(ValueError):
    """A configured SAE that cannot steer: one line naming the SAE and the problem."""


class CheckedEntry(NamedTuple):
    """A configured SAE that can steer: its header, the layer it steers and its local path."""

    sae: SAE
    layer: int
    path: str


def checked_entry(entry: SAEEntry, layer_hint: str) -> CheckedEntry:
    """The SAE's header (tensors on the meta device: milliseconds, however large the SAE), the
    layer it steers and its local path (an `hf://` one fetched); raises SAEEntryError.
    `layer_hint` says how to give a layer, for an SAE whose files name none."""
    where = f"SAE '{entry.id}'"
    try:
        path = local_sae_path(entry.path)  # `vllm serve` hands hf:// paths on as given
        if not Path(path).exists():
            raise SAEEntryError(f"{where}: {entry.path} does not exist")
        sae = inspect_sae(path, format=entry.format)
        layer = steered_layer(sae, entry.layer)
    except (SAEFormatError, NotALayerOutputError) as exc:
        raise SAEEntryError(f"{where}: {exc}") from None
    if layer is None:
        raise SAEEntryError(
            f"{where}: no layer given and none found in {entry.path} ({layer_hint})"
        )
    return CheckedEntry(sae, layer, path)
