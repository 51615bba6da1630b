"""Collecting the toy model's residual stream, training a ReLU SAE on it and measuring it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_vllm.toy.batches import encode_passages, word_positions
from sae_vllm.toy.corpus import Passage
from sae_vllm.toy.progress import Progress
from sae_vllm.toy.residual import layer_output


@dataclass(frozen=True)
class SAERecipe:
    """Size and optimisation settings of the toy SAE."""

    d_sae: int = 512
    l1: float = 0.05  # on activations measured in units of the data's standard deviation
    steps: int = 2000
    batch: int = 1024
    lr: float = 1e-3
    # Penalty on pairs of decoder rows closer than this cosine; see train_sae.
    decoder_cos_margin: float = 0.2
    decoder_cos_weight: float = 1.0


@dataclass
class Activations:
    """Residual vectors at word positions, with the token id and passage index of each."""

    x: torch.Tensor  # [n, d_in] float32
    token_ids: torch.Tensor  # [n] int64
    passage_index: torch.Tensor  # [n] int64


@torch.no_grad()
def collect_activations(
    model, passages: Sequence[Passage], layer: int, batch: int = 256
) -> Activations:
    """The output of decoder layer `layer` (blocks.L.hook_resid_post) at every word position.

    BOS, EOS and PAD positions are left out: generation never feeds EOS back, and BOS carries no
    word (SAELens likewise drops special tokens when training).
    """
    xs, toks, index = [], [], []
    for start in range(0, len(passages), batch):
        ids = encode_passages(passages[start : start + batch])
        with layer_output(model, layer) as seen:
            model(input_ids=ids)
        keep = word_positions(ids)
        rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
        xs.append(seen[0][keep])
        toks.append(ids[keep])
        index.append(rows[keep] + start)
    return Activations(torch.cat(xs), torch.cat(toks), torch.cat(index))


class ReluSAE(torch.nn.Module):
    """SAELens "standard" SAE: a = relu((x - b_dec) @ W_enc + b_enc), x_hat = a @ W_dec + b_dec."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def decoder_overlap(W_dec: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over features of sum_j relu(cos(W_dec[i], W_dec[j]) - margin)^2, j != i."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    cos = cos - torch.eye(cos.shape[0]) * cos.diagonal()
    return torch.relu(cos - margin).pow(2).sum() / cos.shape[0]


def train_sae(x: torch.Tensor, recipe: SAERecipe, progress: Progress) -> ReluSAE:
    """Adam on MSE + L1 + decoder overlap, decoder rows kept at unit norm so activations are in
    residual units.

    MSE and L1 are scaled by the data's spread (sigma^2 = E||x - mean||^2) so `recipe.l1` does
    not depend on the residual stream's scale. Batches are drawn by a seeded torch generator.
    Without the overlap penalty the SAE splits a topic's direction over two or three nearly
    parallel features (cosine 0.9) that fire together, so ablating the labelled one leaves the
    topic in place.
    """
    d_in = x.shape[1]
    mean = x.mean(0)
    sigma = (x - mean).pow(2).sum(1).mean().sqrt()
    sae = ReluSAE(d_in, recipe.d_sae)
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(mean)
    opt = torch.optim.Adam(sae.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(0)
    bar = progress.bar(recipe.steps, "training SAE")
    for _ in range(recipe.steps):
        batch = x[torch.randint(0, x.shape[0], (recipe.batch,), generator=gen)]
        a = sae.encode(batch)
        mse = (sae.decode(a) - batch).pow(2).sum(1).mean() / sigma**2
        loss = mse + recipe.l1 * a.sum(1).mean() / sigma
        loss = loss + recipe.decoder_cos_weight * decoder_overlap(
            sae.W_dec, recipe.decoder_cos_margin
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        bar.update(1, fvu=mse.item())
    bar.close()
    return sae


@torch.no_grad()
def sae_metrics(sae: ReluSAE, x: torch.Tensor) -> dict[str, float]:
    """SAELens-style metrics on `x`, accumulated in fp64: explained variance, L0, dead fraction.

    EV = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2); L0 = mean count of a != 0 per token;
    dead = share of features never active on `x`.
    """
    a = sae.encode(x)
    x64, err = x.double(), (sae.decode(a) - x).double()
    total = x64.pow(2).sum(1).mean() - x64.mean(0).pow(2).sum()
    ev = 1 - err.pow(2).sum(1).mean() / total
    return {
        "explained_variance": ev.item(),
        "l0": (a != 0).sum(1).double().mean().item(),
        "dead_fraction": ((a != 0).sum(0) == 0).double().mean().item(),
    }
