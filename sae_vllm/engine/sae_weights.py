"""An opened SAE into the steering op's weights, streamed from its file a block at a time."""

from __future__ import annotations

import torch

from ..kernels import SteeringWeights, prepare_weights_by_block
from ..sae import FoldedSAE


def steering_weights(
    sae: FoldedSAE, dtype: torch.dtype, device: torch.device | str
) -> SteeringWeights:
    """sae's weights in the kernels' layout, in dtype on device. Only the result and one
    block of features are held in memory, never the SAE whole (what a worker pays at startup
    is the steering weights themselves)."""
    header = sae.header
    return prepare_weights_by_block(
        lambda rows: (sae.encoder_columns(rows), sae.decoder_rows(rows)),
        header.b_enc,
        header.b_dec,
        header.threshold,
        header.k,
        header.apply_b_dec_to_input,
        dtype=dtype,
        device=device,
    )
