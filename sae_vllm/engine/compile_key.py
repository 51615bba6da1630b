"""What a steered engine's compiled model depends on beyond vLLM's own config hash, which keys
vLLM's compile cache (its whole-model AOT cache loads without guard checks)."""

from __future__ import annotations

from typing import Any

from ..config import steering_config_from
from ..sae.sites import steered_layer
from . import vllm_adapter as vllm
from .sae_sizes import sae_header


def compile_key_factors(vllm_config: Any) -> str | None:
    """None for an engine that does not steer; else what its traced graph fixes that vLLM does
    not hash: where the tokens' rows are placed (the host's rows, or the device's placement:
    different graphs, chosen by async scheduling, which vLLM does not hash) and, per SAE, the
    layer it steers, its sizes, architecture and TopK k (an int baked into the graph), read from
    the SAE's file, which may change under the same path."""
    config = steering_config_from(vllm_config.additional_config)
    if config is None:
        return None
    placement = "device" if vllm.positions_run_ahead(vllm_config) else "host"
    try:
        saes = [graph_facts(entry.path, entry.format, entry.layer) for entry in config.saes]
    except Exception as exc:  # the worker reports a bad SAE at startup, with its cause
        saes = [f"unreadable: {type(exc).__name__}"]
    return repr((placement, [entry.id for entry in config.saes], saes))


def graph_facts(path: str, format: str | None, layer: int | None) -> tuple:
    """(layer steered, d_in, d_sae, architecture, k) of the SAE at `path`, from its header."""
    sae = sae_header(path, format)
    return (steered_layer(sae, layer), sae.d_in, sae.d_sae, sae.architecture, sae.k)
