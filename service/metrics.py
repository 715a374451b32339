"""Prometheus metrics, in a registry of the app's own (not the process-global one).

Labels are bounded: `adapter` is the base model's name or a registered adapter,
`version` is "base" or a registered version; a deleted version's series are removed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("adapter", "version")
        self.requests = Counter(
            "lorag_chat_requests", "Chat requests by adapter version and outcome.", (*labels, "outcome"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "lorag_chat_tokens", "Tokens by adapter version; kind is prompt or completion.", (*labels, "kind"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorag_chat_latency_seconds", "Chat request time, admission to last byte.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "lorag_chat_in_flight", "Chat requests admitted and not yet finished.", registry=self.registry
        )
        self.adapter_load = Histogram(
            "lorag_adapter_load_seconds", "Time for one engine to load an adapter version.", labels,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )

    def forget(self, adapter: str, version: str) -> None:
        """Drop a deleted version's series so label sets stay bounded."""
        for metric in (self.requests, self.tokens, self.latency, self.adapter_load):
            for labels in list(metric._metrics):  # prometheus_client has no public way to list children
                if labels[:2] == (adapter, version):
                    metric.remove(*labels)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
