"""Prometheus metrics of the steering server, served on vLLM's own /metrics (API process)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram

from .rejections import REASONS

ENDPOINTS = ("completions", "chat.completions", "responses", "messages")  # steered routes

STEERED = Counter(
    "sae_steering_steered_requests",
    "Requests with a steering spec that vLLM took on (not refused, for their spec or another "
    "reason).",
    ["endpoint"],
)
UNSTEERED = Counter(
    "sae_steering_unsteered_requests",
    "Requests without steering that vLLM took on (not refused).",
    ["endpoint"],
)
EDITS = Histogram(
    "sae_steering_edits_per_request",
    "Feature edits per steered request.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
VARIANT = Counter(
    "sae_steering_variant_requests",
    "Requests to a steering variant (a served model name with its own spec) that vLLM took on.",
    ["variant"],
)
UNREACHED = Counter(
    "sae_steering_unreached_sequences",
    "Sequences of steered requests that ended before the first position their spec steers "
    "(so came back unsteered), streamed or not.",
)
REJECTED = Counter(
    "sae_steering_rejected_specs",
    "Steering specs refused with HTTP 400, by reason.",
    ["reason"],
)

for _endpoint in ENDPOINTS:  # export zeros from the start
    STEERED.labels(endpoint=_endpoint)
    UNSTEERED.labels(endpoint=_endpoint)
for _reason in REASONS:
    REJECTED.labels(reason=_reason)


def record_steered(endpoint: str, edits: int) -> None:
    STEERED.labels(endpoint=endpoint).inc()
    EDITS.observe(edits)


def record_variant(variant: str) -> None:
    VARIANT.labels(variant=variant).inc()


def export_variants(variants: Iterable[str]) -> None:
    """Export the variants' counters at zero, before their first request."""
    for variant in variants:
        VARIANT.labels(variant=variant)


def record_unsteered(endpoint: str) -> None:
    UNSTEERED.labels(endpoint=endpoint).inc()


def record_unreached() -> None:
    UNREACHED.inc()


def record_rejected(reason: str) -> None:
    REJECTED.labels(reason=reason).inc()
