"""SAE files in, one canonical SAE out: load_sae reads every supported format.

Imports only torch, numpy and safetensors, so it runs where vLLM is not installed."""

from .errors import SAEFormatError
from .model import SAE
from .readers import (
    FORMATS,
    decoder_norms,
    detect_format,
    inspect_sae,
    load_sae,
    non_finite_weight,
    open_sae,
)
from .readers.build import FoldedSAE

__all__ = [
    "FORMATS",
    "SAE",
    "FoldedSAE",
    "SAEFormatError",
    "decoder_norms",
    "detect_format",
    "inspect_sae",
    "load_sae",
    "non_finite_weight",
    "open_sae",
]
