"""The canonical in-memory SAE every reader produces, with its encoder and decoder math."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

ARCHITECTURES = ("relu", "jumprelu", "topk")


@dataclass(eq=False)  # tensors have no single truth value, so no field-wise ==
class SAE:
    """A sparse autoencoder in SAELens' convention, with every input scaling already folded in.

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc; the activation is relu(pre),
    relu(pre) * (pre > threshold) or the k largest relu'd pre per token; decode a @ W_dec + b_dec.
    """

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]; row i is feature i's write direction
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None  # [d_sae] for jumprelu, else None
    k: int | None  # for topk, else None
    architecture: str
    apply_b_dec_to_input: bool
    layer: int | None
    hook_name: str | None
    format: str
    source: str
    # The site the SAE is taken to read where its files name none, and why (a Gemma Scope
    # file whose path names no release is read as a residual-stream SAE); None otherwise.
    site_assumed: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}"
            )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise ValueError("a jumprelu SAE needs a threshold")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ValueError(f"a topk SAE needs 1 <= k <= d_sae ({self.d_sae}), got k={self.k}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as a plain name, e.g. "bfloat16"."""
        return str(self.W_enc.dtype).removeprefix("torch.")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations x [..., d_in]."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] of feature activations a [..., d_sae]."""
        return a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """A new SAE with every tensor moved to device and cast to dtype."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return dataclasses.replace(
            self,
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            threshold=move(self.threshold),
        )
