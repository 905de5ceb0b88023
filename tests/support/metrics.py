"""Reading a worker's ``/metrics`` as Prometheus would, with ``prometheus_client``'s own parser."""

from __future__ import annotations

import urllib.request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample of ``/metrics`` on ``host:port``, keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families  # (the test extra)

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def refused(port: int) -> dict[str, float]:
    """``stoker_events_refused_total`` of the worker serving ``port``, by ``why``."""
    return {
        dict(labels)["why"]: count
        for (name, labels), count in scrape(port).items()
        if name == "stoker_events_refused_total"
    }
