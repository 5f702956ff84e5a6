"""Prometheus metrics of the sidecar, kept in plain dicts and rendered at scrape time.

prometheus_client's own Counter/Histogram take a lock and walk every bucket on each
observation (~10 µs per request here); the sidecar is one event loop, so it counts in
dicts (a bisect and a list increment) and a custom collector turns them into metric
families only when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import ClassVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
LABELS = ("tenant", "service", "operation")

Key = tuple[str, ...]
# Service and operation labels come from request paths, and the sidecar cannot know
# which services exist: past this many distinct pairs, new ones are counted as OTHER
# (not a valid service name), so made-up names cannot grow the series without end.
MAX_TARGETS = 1000
OTHER = "_other"


class Metrics:
    """Requests, latency, rate-limit and authz decisions, labelled tenant/service/operation."""

    AUTHZ: ClassVar[str] = "authz"
    RATELIMIT: ClassVar[str] = "ratelimit"

    def __init__(self, max_targets: int = MAX_TARGETS) -> None:
        self.max_targets = max_targets
        self._targets: set[tuple[str, str]] = set()
        self.requests: dict[Key, int] = {}
        self.latency: dict[Key, list[float]] = {}  # bucket counts..., +Inf count, sum
        self.decisions: dict[str, dict[Key, int]] = {self.AUTHZ: {}, self.RATELIMIT: {}}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _target(self, service: str, operation: str) -> tuple[str, str]:
        """The (service, operation) labels to count under: themselves, or OTHER past the cap."""
        pair = (service, operation)
        if pair in self._targets:
            return pair
        if len(self._targets) < self.max_targets:
            self._targets.add(pair)
            return pair
        return OTHER, OTHER

    def observe(self, tenant: str, service: str, operation: str, status: int,
                seconds: float) -> None:
        """One answered request."""
        service, operation = self._target(service, operation)
        key = (tenant, service, operation, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        hkey = (tenant, service, operation)
        row = self.latency.get(hkey)
        if row is None:
            row = self.latency[hkey] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def decision(self, kind: str, tenant: str, service: str, operation: str,
                 decision: str) -> None:
        """One rate-limit or authz decision."""
        service, operation = self._target(service, operation)
        table = self.decisions[kind]
        key = (tenant, service, operation, decision)
        table[key] = table.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The collector protocol: metric families from the current counts."""
        requests = CounterMetricFamily("mtp_sidecar_requests", "Requests answered by the sidecar",
                                       labels=(*LABELS, "status"))
        for key, count in self.requests.items():
            requests.add_metric(key, count)
        yield requests
        latency = HistogramMetricFamily("mtp_sidecar_request_seconds",
                                        "Time from arrival to answer", labels=LABELS)
        for key, row in self.latency.items():
            cumulative, buckets = 0.0, []
            for bound, in_bucket in zip((*LATENCY_BUCKETS, float("inf")), row[:-1],
                                        strict=True):
                cumulative += in_bucket
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            latency.add_metric(key, buckets, row[-1])
        yield latency
        for kind, help_text in ((self.RATELIMIT, "Rate-limit and quota decisions"),
                                (self.AUTHZ, "Authorization decisions")):
            family = CounterMetricFamily(f"mtp_sidecar_{kind}_decisions", help_text,
                                         labels=(*LABELS, "decision"))
            for key, count in self.decisions[kind].items():
                family.add_metric(key, count)
            yield family

    def render(self) -> bytes:
        """The text exposition."""
        return generate_latest(self.registry)
