"""Read a running server's Prometheus /metrics into {(name, sorted labels): value}."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_samples(http) -> dict[tuple[str, tuple], float]:
    text = http.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
