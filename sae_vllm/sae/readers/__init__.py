"""One reader module per on-disk SAE format, plus the registry that detects and dispatches."""

from .registry import (
    FORMATS,
    decoder_norms,
    detect_format,
    inspect_sae,
    load_sae,
    non_finite_weight,
    open_sae,
)

__all__ = [
    "FORMATS",
    "decoder_norms",
    "detect_format",
    "inspect_sae",
    "load_sae",
    "non_finite_weight",
    "open_sae",
]
