"""Edit-op codes shared by the edit tables, the torch reference and the Triton kernels."""

from __future__ import annotations

import torch

SET = 0
ADD = 1
SCALE = 2
ABLATE = 3
FLOOR = 4
CAP = 5

OP_CODES: dict[str, int] = {
    "set": SET,
    "add": ADD,
    "scale": SCALE,
    "ablate": ABLATE,
    "floor": FLOOR,
    "cap": CAP,
}


def apply_edit(a: torch.Tensor, op: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The edited activation a' for each element (broadcasting); unknown op codes keep a."""
    op = torch.as_tensor(op, device=a.device)
    value = torch.as_tensor(value, dtype=a.dtype, device=a.device)
    out = torch.where(op == SET, value, a)
    out = torch.where(op == ADD, a + value, out)
    out = torch.where(op == SCALE, a * value, out)
    out = torch.where(op == ABLATE, torch.zeros_like(out), out)
    out = torch.where(op == FLOOR, torch.maximum(a, value), out)
    return torch.where(op == CAP, torch.minimum(a, value), out)
