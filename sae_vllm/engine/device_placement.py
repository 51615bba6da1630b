"""Each token's steering row and scope derived on the device from the positions the model reads."""

from __future__ import annotations

import torch
from torch import nn


class DevicePlacement(nn.Module):
    """For engines whose host positions run ahead of the model's (vllm_adapter.
    positions_run_ahead): under async scheduling with speculative decoding vLLM prepares a step
    counting all of the last step's draft tokens as accepted, and corrects the positions on the
    device. A token's segment is found there, against the corrected positions: its request's
    first row (written by the host, which knows the batch's layout) leads to the request's
    segment edges; the number of edges at or below the token's position picks the segment, and
    the segment its row. Tokens past the step (padding) read no row (-1).

    The tensors are those of SteeringTables built with `places_on_device` (`tok_first`,
    `segments.edges`, `segments.rows`) and the runner's positions. They are held as buffers so
    torch.compile lifts them as graph inputs and a CUDA graph replays against their current
    contents. (Only torch here: the GPU test machine imports this module without vLLM.)"""

    def __init__(
        self,
        positions: torch.Tensor,
        tok_first: torch.Tensor,
        segment_edges: torch.Tensor,
        segment_rows: torch.Tensor,
    ):
        super().__init__()
        self.register_buffer("positions", positions, persistent=False)
        self.register_buffer("tok_first", tok_first, persistent=False)
        self.register_buffer("segment_edges", segment_edges, persistent=False)
        self.register_buffer("segment_rows", segment_rows, persistent=False)

    def forward(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_tokens` tokens' rows (int32, -1 where nothing is steered) and scope
        (bool)."""
        first = self.tok_first[:num_tokens].long()  # -1 reads the last entry: no edge, no row
        positions = self.positions[:num_tokens]
        segment = (positions[:, None] >= self.segment_edges[first]).sum(dim=1)
        rows = self.segment_rows[first, segment]
        return rows, rows >= 0
