"""The offline overhead benchmark's requests: each variant's specs are valid and steer as named."""

from __future__ import annotations

import pytest

from bench.overhead import build_variants, make_requests
from sae_vllm.spec import resolve_spec

D_SAE = 512
BATCH = 4


@pytest.mark.parametrize(
    "variant", build_variants(["eager"], BATCH, quick=False), ids=lambda variant: variant.name
)
def test_every_variants_requests_carry_the_specs_it_names(variant):
    requests = make_requests(variant, BATCH, D_SAE, "bench", [[1, 5, 6]])
    specs = [
        resolve_spec(params.extra_args["sae_steering"], {"bench": D_SAE})
        for _, params in requests
        if params.extra_args
    ]
    assert len(specs) == round(variant.steered_share * BATCH)
    assert len({spec.model_dump_json() for spec in specs}) == min(
        variant.distinct_specs, len(specs)
    )
    for spec in specs:
        assert len(spec.edits) == variant.edits
        assert len(spec.scopes()) == variant.scopes
    assert all(params.max_tokens == variant.output_len for _, params in requests)
