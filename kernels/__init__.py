"""Steering kernels: SAE feature edits on the residual stream (Triton on CUDA, torch on CPU).

Importing this package registers torch.ops.sae_vllm.steer_; it needs only torch (Triton is
imported on the first CUDA call)."""

from .cpu_compiled import warm_up as warm_up_cpu_path
from .cpu_decode import steer_cpu_
from .edit_ops import ABLATE, ADD, CAP, FLOOR, OP_CODES, SCALE, SET, apply_edit
from .op import steer_
from .reference import steer_reference_
from .weights import SteeringWeights, prepare_weights, prepare_weights_by_block

__all__ = [
    "ABLATE",
    "ADD",
    "CAP",
    "FLOOR",
    "OP_CODES",
    "SCALE",
    "SET",
    "SteeringWeights",
    "apply_edit",
    "prepare_weights",
    "prepare_weights_by_block",
    "steer_",
    "steer_cpu_",
    "steer_reference_",
    "warm_up_cpu_path",
]
