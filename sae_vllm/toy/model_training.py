"""Training the toy Llama on the toy language; its accuracy where the grammar decides."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_vllm.toy.batches import IGNORE, encode_passages, length_batches
from sae_vllm.toy.corpus import Passage, SwitchPassage
from sae_vllm.toy.grammar import TOPIC_NAMES, determined_positions
from sae_vllm.toy.progress import Progress
from sae_vllm.toy.residual import layer_output
from sae_vllm.toy.tokenizer import BOS_ID, EOS_ID, MODEL_MAX_LENGTH, PAD_ID, vocab
from sae_vllm.toy.topic_injection import TopicDirections, intervene, training_batch


@dataclass(frozen=True)
class ModelRecipe:
    """Shape and optimisation settings of the toy language model."""

    hidden: int = 128
    layers: int = 4
    heads: int = 2  # head_dim = hidden / heads must be 64: vLLM's CPU attention rejects 16
    steps: int = 500
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    probe_weight: float = 1.0
    inject_fraction: float = 0.5  # of passages, once the topic directions have settled
    inject_from_step: int = 100
    switch_rows: int = 8  # switch passages with their first topic ablated, added to each batch


def make_model(recipe: ModelRecipe):  # -> transformers.LlamaForCausalLM
    """A freshly initialised Llama with the recipe's shape (uses the global torch RNG)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(vocab()),
        hidden_size=recipe.hidden,
        intermediate_size=4 * recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        head_dim=recipe.hidden // recipe.heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def next_token_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    reduction: str = "mean",
    unlearned: torch.Tensor | None = None,
):
    """Cross-entropy of predicting ids[:, 1:] from logits[:, :-1]; PAD targets are ignored, and
    so are the positions set in `unlearned` [b, s] (aligned with the logits' positions)."""
    logits = logits[:, :-1]
    ignored = ids[:, 1:] == PAD_ID
    if unlearned is not None:
        ignored |= unlearned[:, :-1]
    targets = ids[:, 1:].masked_fill(ignored, IGNORE)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )


def train_model(
    model,
    passages: Sequence[Passage],
    switches: Sequence[SwitchPassage],
    recipe: ModelRecipe,
    layer: int,
    progress: Progress,
) -> None:
    """AdamW with linear warm-up and cosine decay over length-bucketed batches of `passages`.

    Two additions to next-token loss make the topic a direction that layer `layer`'s output
    carries and that later layers act on, as context features are in large LMs. (A plain LM
    this small fetches the topic with attention only where a topic word comes next, so its
    residual holds the topic as many small token-specific pieces that no single SAE feature
    captures, and steering one needs values that break the grammar.)

    - A linear probe (weight probe_weight, thrown away afterwards) is trained to name the
      passage's topic from layer L's output at every position from the first topic word on.
    - Once the topic directions have settled, a share of passages (inject_fraction) get their
      topic's direction (running mean of layer L's output on that topic minus the mean over
      topics) added at the positions before their first topic word, an interchange-style
      intervention that teaches later layers to choose topic words from that direction alone.
    - From then on each batch also gets switch_rows `switches` (a sentence on one topic, then
      one on a random topic) with the first topic's direction ablated at layer L wherever the
      context is about it alone, and no loss on words that would need it. Later layers learn
      that without the direction the topic is open, rather than re-deriving it from the topic
      words, so ablating a topic feature takes the topic away.
    """
    probe = torch.nn.Linear(recipe.hidden, len(TOPIC_NAMES))
    params = [*model.parameters(), *probe.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches = length_batches(passages, recipe.batch, seed=0)[: recipe.steps]
    directions = TopicDirections(len(TOPIC_NAMES), recipe.hidden)
    coin = torch.Generator().manual_seed(0)
    model.train()
    bar = progress.bar(len(batches), "training language model")
    next_switch = 0
    for step, chunk in enumerate(batches):
        settled = step >= recipe.inject_from_step
        switching = (
            list(switches[next_switch : next_switch + recipe.switch_rows]) if settled else []
        )
        next_switch += len(switching)
        chosen = torch.rand(len(chunk), generator=coin) < recipe.inject_fraction
        batch = training_batch(chunk, switching, directions, chosen & settled)
        with intervene(model, layer, batch.change), layer_output(model, layer) as seen:
            logits = model(input_ids=batch.ids).logits
        directions.update(seen[0].detach(), batch.topics)
        lm = next_token_loss(logits, batch.ids, unlearned=batch.unlearned)
        probe_loss = F.cross_entropy(probe(seen[0]).flatten(0, 1), batch.topics.flatten())
        loss = lm + recipe.probe_weight * probe_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(1, loss=lm.item())
    bar.close()
    model.eval()


@torch.no_grad()
def determined_accuracy(model, passages: Sequence[Passage], batch: int = 256) -> dict[str, float]:
    """Greedy next-token accuracy on the positions whose next token the grammar determines.

    A position is determined when grammar.next_options gives exactly one token there (e.g. "the"
    after "and", "lot" after "a", "." after "a lot"); accuracy is argmax == that token. Also
    reports the mean held-out next-token cross-entropy over all positions.
    """
    hits = total = targets = 0
    loss_sum = 0.0
    for start in range(0, len(passages), batch):
        chunk = passages[start : start + batch]
        ids = encode_passages(chunk)
        logits = model(input_ids=ids).logits
        loss_sum += next_token_loss(logits, ids, reduction="sum").item()
        targets += int((ids[:, 1:] != PAD_ID).sum())
        pred = logits[:, :-1].argmax(-1)
        for row, p in enumerate(chunk):
            for t, determined in enumerate(determined_positions(p.words)):
                if determined:
                    total += 1
                    hits += int(pred[row, t] == ids[row, t + 1])
    return {
        "determined_accuracy": hits / total,
        "determined_positions": total,
        "heldout_loss": loss_sum / targets,
    }
