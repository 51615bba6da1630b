"""Specs resolved once per process: each recent wire text's resolved spec, per SAE set and limits.

A steered request's spec is checked where it enters (the server's gate or `steering_params`),
in vLLM's frontend, in the engine core and in the worker. From the first check on it travels
as the resolved spec's JSON text (`ResolvedSpec.text`): a string is what vLLM copies, checks
and ships between its processes at no cost, where a nested dict is deep-copied and walked at
every stage. Each stage resolves that text again, so no stage trusts another process, but a
text already resolved in this process is answered from memory."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

from .spec import SpecLimits, SteeringSpec, fingerprint_of, resolve_spec

DEFAULT_CAPACITY = 1024  # distinct specs remembered per resolver (a 32-edit spec is ~20 kB)


class ResolvedSpec(NamedTuple):
    """A spec bound to the registered SAEs, with the text it travels as and its fingerprint."""

    spec: SteeringSpec
    text: str  # spec.model_dump_json(): the form extra_args carry between stages
    fingerprint: str  # spec.fingerprint(), what keys the KV blocks it steers


class SpecResolver:
    """`resolve_spec` against one set of SAEs and limits, remembering the last `capacity`
    distinct wire texts it resolved (the specs are frozen, so sharing them is safe)."""

    def __init__(
        self, sae_sizes: Mapping[str, int], limits: SpecLimits, capacity: int = DEFAULT_CAPACITY
    ):
        self.sae_sizes = dict(sae_sizes)
        self.limits = limits
        self._capacity = capacity
        self._by_text: OrderedDict[str, ResolvedSpec] = OrderedDict()
        self._lock = threading.Lock()  # vLLM's frontend and engine core may call from threads

    def resolve(self, data: Any) -> ResolvedSpec:
        """The resolved spec of `data` (a dict, a SteeringSpec or a JSON text); raises
        SteeringSpecError as resolve_spec does."""
        if isinstance(data, str):
            with self._lock:
                known = self._by_text.get(data)
                if known is not None:
                    self._by_text.move_to_end(data)
                    return known
        spec = resolve_spec(data, self.sae_sizes, self.limits)
        text = spec.model_dump_json()
        resolved = ResolvedSpec(spec, text, fingerprint_of(text))
        with self._lock:
            self._remember(resolved.text, resolved)
            if isinstance(data, str):
                self._remember(data, resolved)
        return resolved

    def __len__(self) -> int:
        return len(self._by_text)

    def _remember(self, text: str, resolved: ResolvedSpec) -> None:
        self._by_text[text] = resolved
        self._by_text.move_to_end(text)
        while len(self._by_text) > self._capacity:
            self._by_text.popitem(last=False)


@functools.lru_cache(maxsize=64)
def _shared_resolver(sizes: tuple[tuple[str, int], ...], limits: SpecLimits) -> SpecResolver:
    return SpecResolver(dict(sizes), limits)


def resolver_for(sae_sizes: Mapping[str, int], limits: SpecLimits) -> SpecResolver:
    """This process's resolver for these SAEs (id -> d_sae) and limits: every stage in one
    process that checks against the same SAEs shares what it resolved."""
    return _shared_resolver(tuple(sorted(sae_sizes.items())), limits)
