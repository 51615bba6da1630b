"""Feature counts of the configured SAEs, read from their files' headers, and the spec resolver
built on them (every process that validates specs: frontend, engine core, worker)."""

from __future__ import annotations

import functools

from ..config import SteeringConfig
from ..resolved_specs import SpecResolver, resolver_for
from ..sae import SAE, inspect_sae


@functools.cache
def sae_header(path: str, format: str | None) -> SAE:
    """The SAE at `path` from its file's header (inspect_sae), read once per process."""
    return inspect_sae(path, format=format)


def sae_sizes(config: SteeringConfig) -> dict[str, int]:
    """SAE id -> d_sae for every SAE in the config, from the files' headers (once per process)."""
    return {entry.id: sae_header(entry.path, entry.format).d_sae for entry in config.saes}


def config_resolver(config: SteeringConfig) -> SpecResolver:
    """This process's spec resolver for every SAE in the config, within its limits."""
    return resolver_for(sae_sizes(config), config.limits)
