"""Prometheus metrics, in a registry of the app's own (not the process-global one).

Labels are bounded: `tenant` comes from an API key (made by an operator), `adapter` is
the base model's name or a registered adapter of that tenant, `version` is "base" or a
registered version, `engine` one of the configured engines; a deleted version's series
are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.adapters.registry import Version
    from service.engine.pool import Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("tenant", "adapter", "version")
        self.requests = Counter(
            "lorag_chat_requests", "Chat requests by tenant, adapter version and outcome.", (*labels, "outcome"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "lorag_chat_tokens", "Tokens by tenant and adapter version; kind is prompt or completion.",
            (*labels, "kind"), registry=self.registry,
        )
        self.latency = Histogram(
            "lorag_chat_latency_seconds", "Chat request time, admission to last byte.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.first_token = Histogram(
            "lorag_chat_time_to_first_token_seconds", "Streaming chat: admission to the first token sent.", labels,
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.retrieval = Histogram(
            "lorag_retrieval_seconds", "Chat retrieval time per request; stage is embed, search or prompt.",
            ("tenant", "stage"), buckets=_FAST_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "lorag_chat_in_flight", "Chat requests admitted and not yet finished.", registry=self.registry
        )
        self.waiting = Gauge(
            "lorag_chat_waiting", "Queue depth: chat requests sent to an engine that has not answered yet.",
            registry=self.registry,
        )
        self.tenant_in_flight = Gauge(
            "lorag_tenant_in_flight", "Chat requests admitted and not yet finished, by tenant.", ("tenant",),
            registry=self.registry,
        )
        self.tenant_refused = Counter(
            "lorag_tenant_refused", "Chat requests refused for the tenant's fair share; reason is inflight or tokens.",
            ("tenant", "reason"), registry=self.registry,
        )
        self.engine_connections = Counter(
            "lorag_engine_connections_opened", "Connections opened to the engines for chat. Streams reuse them: "
            "a rate that follows the request rate means keep-alive is not holding (each costs a connect).",
            registry=self.registry,
        )
        self.adapter_load = Histogram(
            "lorag_adapter_load_seconds", "Time for one engine to load an adapter version.", labels,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry,
        )

    def watch_engines(self, engines: Callable[[], list[Engine]]) -> None:
        """`lorag_engine_up{engine}`, read from the pool at each scrape (never stale)."""
        self.registry.register(_EngineCollector(engines))

    def forget(self, version: Version) -> None:
        """Drop a deleted version's series so label sets stay bounded."""
        labels = version.labels
        for metric in (self.requests, self.tokens, self.latency, self.first_token, self.adapter_load):
            for key in list(metric._metrics):  # prometheus_client has no public way to list children
                if key[:3] == labels:
                    metric.remove(*key)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engines: Callable[[], list[Engine]]):
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "lorag_engine_up", "1 when the engine answers /health and has its adapters synced.", labels=("engine",)
        )
        for engine in self._engines():
            family.add_metric((engine.name,), 1.0 if engine.up and engine.url else 0.0)
        yield family
