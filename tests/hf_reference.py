"""Independent oracle: HF transformers in float64 with a forward hook that applies SAE edits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tiny_model import RawSAE


def edited_activation(a: np.ndarray, op: str, value: float | None) -> np.ndarray:
    return {
        "set": lambda: np.full_like(a, value),
        "add": lambda: a + value,
        "scale": lambda: a * value,
        "ablate": lambda: np.zeros_like(a),
        "floor": lambda: np.maximum(a, value),
        "cap": lambda: np.minimum(a, value),
    }[op]()


@dataclass
class Edit:
    sae: RawSAE
    feature: int
    op: str
    value: float | None


@dataclass
class Span:
    """Positions [lo, hi) (hi None: to the end of the sequence) steered by `edits`."""

    lo: int
    hi: int | None
    edits: Sequence[Edit]


_HORIZON = 10**9  # stands for "no end" in the range a scope's positions are sliced from


def scope_span(
    prompt_len: int, edits: Sequence[Edit], apply_to: str, window: dict | None = None
) -> Span:
    """The positions a request's scope steers, sliced by its window as Python slices a range
    (written apart from sae_vllm.engine.scopes, which it checks)."""
    positions = {
        "generated": range(prompt_len - 1, _HORIZON),
        "all": range(_HORIZON),
        "prompt": range(prompt_len),
    }[apply_to]
    window = window or {}
    steered = positions[window.get("start", 0) : window.get("end")]
    hi = None if steered.stop == _HORIZON else max(steered.stop, steered.start)
    return Span(steered.start, hi, edits)


def steered_residual(h: np.ndarray, edits: Sequence[Edit]) -> np.ndarray:
    """The full error-term form D(a') + (h − D(a)) for each SAE, applied in order."""
    out = h.copy()
    for sae in dict.fromkeys(edit.sae for edit in edits):
        a = sae.encode(out)
        a_new = a.copy()
        for edit in (e for e in edits if e.sae is sae):
            a_new[..., edit.feature] = edited_activation(a[..., edit.feature], edit.op, edit.value)
        out = (a_new @ sae.W_dec + sae.b_dec) + (out - (a @ sae.W_dec + sae.b_dec))
    return out


class HFReference:
    """Greedy decoding of a tiny model in float64 with steering hooks on resid_post."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float64,
            attn_implementation="eager",
            experts_implementation="eager",  # grouped_mm has no float64 kernel
        ).eval()
        inner = getattr(self.model, "model", None) or self.model.transformer
        self.layers = inner.layers if hasattr(inner, "layers") else inner.h

    def greedy(
        self,
        prompt: list[int],
        max_tokens: int,
        edits: Sequence[Edit],
        apply_to: str = "generated",
        window: dict | None = None,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Tokens and per-step log-probabilities (full vocab), recomputing the whole sequence
        each step so every position's scope is explicit."""
        span = scope_span(len(prompt), edits, apply_to, window)
        return self._greedy(prompt, max_tokens, [span])

    def greedy_in_spans(
        self, prompt: list[int], max_tokens: int, spans: Sequence[Span]
    ) -> list[int]:
        """Greedy tokens with each span of positions steered by its own edits (a streaming-input
        session: each chunk's spec steers the positions that chunk computes; an edit with a
        scope of its own). Where spans overlap, a position is steered by all their edits."""
        return self._greedy(prompt, max_tokens, spans)[0]

    def _greedy(
        self, prompt: list[int], max_tokens: int, spans: Sequence[Span]
    ) -> tuple[list[int], list[np.ndarray]]:
        tokens = list(prompt)
        logprobs: list[np.ndarray] = []
        for _ in range(max_tokens):
            handles = self._span_hooks(len(tokens), spans)
            try:
                with torch.no_grad():
                    logits = self.model(torch.tensor([tokens])).logits[0, -1]
            finally:
                for handle in handles:
                    handle.remove()
            lp = torch.log_softmax(logits, -1).numpy()
            logprobs.append(lp)
            tokens.append(int(lp.argmax()))
        return tokens[len(prompt) :], logprobs

    def prompt_logprobs(
        self, prompt: list[int], edits: Sequence[Edit], apply_to: str
    ) -> np.ndarray:
        """Log-probability of each prompt token after the first, given the tokens before it."""
        logprobs = self._position_logprobs(prompt, len(prompt), edits, apply_to)[:-1]
        return logprobs[np.arange(len(prompt) - 1), prompt[1:]]

    def forced_logprobs(
        self, prompt: list[int], generated: list[int], edits: Sequence[Edit], apply_to: str
    ) -> np.ndarray:
        """Log-probability of each generated token given the prompt and the tokens before it
        (teacher-forced: comparable to a less precise engine even after a near-tie flips)."""
        logprobs = self._position_logprobs(prompt + generated, len(prompt), edits, apply_to)
        return logprobs[np.arange(len(prompt) - 1, len(prompt) - 1 + len(generated)), generated]

    def _position_logprobs(
        self, tokens: list[int], prompt_len: int, edits: Sequence[Edit], apply_to: str
    ) -> np.ndarray:
        """Log-softmax at every position of one causal pass (scopes are per position)."""
        handles = self._span_hooks(len(tokens), [scope_span(prompt_len, edits, apply_to)])
        try:
            with torch.no_grad():
                logits = self.model(torch.tensor([tokens])).logits[0]
        finally:
            for handle in handles:
                handle.remove()
        return torch.log_softmax(logits, -1).numpy()

    def _span_hooks(self, seq_len: int, spans: Sequence[Span]):
        positions = np.arange(seq_len)
        masks = [
            (positions >= span.lo) & (positions < (seq_len if span.hi is None else span.hi))
            for span in spans
        ]
        handles = []
        for layer in sorted({e.sae.layer for span in spans for e in span.edits}):
            layer_spans = [
                (mask, [e for e in span.edits if e.sae.layer == layer])
                for mask, span in zip(masks, spans, strict=True)
            ]

            def hook(module, args, output, layer_spans=layer_spans):
                hidden = output[0] if isinstance(output, tuple) else output
                h = hidden[0].numpy()
                steered = h.copy()
                # Positions in the same spans take the union of those spans' edits at once.
                in_span = np.stack([mask for mask, _ in layer_spans], axis=1)
                for combination in np.unique(in_span, axis=0):
                    edits = [
                        edit
                        for (_, span_edits), on in zip(layer_spans, combination, strict=True)
                        if on
                        for edit in span_edits
                    ]
                    if edits:
                        rows = (in_span == combination).all(axis=1)
                        steered[rows] = steered_residual(h[rows], edits)
                new = torch.from_numpy(steered).unsqueeze(0)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(self.layers[layer].register_forward_hook(hook))
        return handles
