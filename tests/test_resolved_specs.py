"""Specs resolved once per process: what is remembered, what is not, and what it never mixes up."""

from __future__ import annotations

import json
import threading

import pytest

from sae_vllm.resolved_specs import SpecResolver, resolver_for
from sae_vllm.spec import SpecLimits, SteeringSpecError, resolve_spec

SIZES = {"a": 64, "b": 32}


def edit(feature=3, sae="a", op="set", value=2.0):
    return {"sae": sae, "feature": feature, "op": op, "value": value}


def spec_text(*edits, apply_to="generated", indent=None):
    return json.dumps({"edits": list(edits), "apply_to": apply_to}, indent=indent)


def test_the_resolved_text_is_the_spec_and_resolves_to_itself():
    resolver = SpecResolver({"a": 64}, SpecLimits())
    resolved = resolver.resolve({"edits": [{"feature": 3, "op": "add", "value": 1.5}]})
    assert resolved.spec == resolve_spec(json.loads(resolved.text), {"a": 64})
    assert resolved.spec.edits[0].sae == "a"  # the omitted SAE id is filled in the text
    assert resolved.fingerprint == resolved.spec.fingerprint()
    again = SpecResolver({"a": 64}, SpecLimits()).resolve(resolved.text)
    assert again.text == resolved.text and again.fingerprint == resolved.fingerprint


def test_a_text_seen_before_is_answered_from_memory_and_any_other_is_resolved():
    resolver = SpecResolver(SIZES, SpecLimits())
    pretty = spec_text(edit(), indent=2)
    first = resolver.resolve(pretty)
    assert resolver.resolve(pretty) is first
    assert resolver.resolve(first.text) is first  # the canonical text is remembered too
    other = resolver.resolve(spec_text(edit(value=2.5)))
    assert other.spec.edits[0].value == 2.5 and other.fingerprint != first.fingerprint


def test_dicts_are_resolved_every_time_but_share_the_canonical_text():
    resolver = SpecResolver(SIZES, SpecLimits())
    one = resolver.resolve({"edits": [edit()]})
    two = resolver.resolve({"edits": [edit()]})
    assert one is not two and one == two
    assert resolver.resolve(one.text) in (one, two)


def test_bad_specs_are_refused_every_time_and_never_remembered():
    resolver = SpecResolver(SIZES, SpecLimits())
    bad = spec_text(edit(feature=64))
    for _ in range(2):
        with pytest.raises(SteeringSpecError) as info:
            resolver.resolve(bad)
        assert info.value.field == "edits[0].feature"
    assert len(resolver) == 0


def test_the_same_text_is_checked_against_each_resolvers_own_saes_and_limits():
    text = spec_text(edit(feature=40, value=50.0))
    assert SpecResolver(SIZES, SpecLimits()).resolve(text).spec.edits[0].feature == 40
    with pytest.raises(SteeringSpecError, match="out of range"):
        SpecResolver({"a": 32}, SpecLimits()).resolve(text)
    with pytest.raises(SteeringSpecError, match="magnitude"):
        SpecResolver(SIZES, SpecLimits(max_abs_value=10.0)).resolve(text)


def test_one_shared_resolver_per_sae_set_and_limits():
    assert resolver_for({"a": 64, "b": 32}, SpecLimits()) is resolver_for(
        {"b": 32, "a": 64}, SpecLimits()
    )
    assert resolver_for(SIZES, SpecLimits()) is not resolver_for(SIZES, SpecLimits(max_edits=2))
    assert resolver_for(SIZES, SpecLimits()) is not resolver_for({"a": 64}, SpecLimits())


def test_memory_is_bounded_and_keeps_the_most_recently_used():
    resolver = SpecResolver(SIZES, SpecLimits(), capacity=4)
    texts = [spec_text(edit(feature=f)) for f in range(3)]
    # each is remembered under its own text and its canonical text: two entries
    first, second = resolver.resolve(texts[0]), resolver.resolve(texts[1])
    assert resolver.resolve(texts[0]) is first  # used last: first's canonical text is oldest now
    resolver.resolve(texts[2])  # evicts the two oldest: first's and second's canonical texts
    assert len(resolver) == 4
    assert resolver.resolve(texts[0]) is first and resolver.resolve(texts[1]) is second
    assert resolver.resolve(second.text) is not second  # resolved again
    assert len(resolver) == 4


def test_resolved_specs_are_frozen():
    spec = SpecResolver(SIZES, SpecLimits()).resolve(spec_text(edit())).spec
    with pytest.raises(ValueError, match="frozen"):
        spec.apply_to = "all"
    with pytest.raises(ValueError, match="frozen"):
        spec.edits[0].value = 9.0


def test_threads_resolving_at_once_each_get_their_own_spec():
    resolver = SpecResolver(SIZES, SpecLimits(), capacity=8)
    texts = [spec_text(edit(feature=f % 60, value=float(f))) for f in range(200)]
    failures: list[str] = []

    def work(offset: int) -> None:
        for i in range(len(texts)):
            text = texts[(i + offset) % len(texts)]
            got = resolver.resolve(text).spec.edits[0]
            if got.value != json.loads(text)["edits"][0]["value"]:
                failures.append(text)

    threads = [threading.Thread(target=work, args=(k * 37,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(resolver) <= 8
