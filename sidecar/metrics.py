"""Prometheus metrics of the sidecar, in a registry of its own (one per app)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests, latency, rate-limit and authz decisions, labelled tenant/service/operation."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("tenant", "service", "operation")
        self.requests = Counter("mtp_sidecar_requests", "Requests answered by the sidecar",
                                (*labels, "status"), registry=self.registry)
        self.latency = Histogram("mtp_sidecar_request_seconds", "Time from arrival to answer",
                                 labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ratelimit = Counter("mtp_sidecar_ratelimit_decisions",
                                 "Rate-limit and quota decisions", (*labels, "decision"),
                                 registry=self.registry)
        self.authz = Counter("mtp_sidecar_authz_decisions", "Authorization decisions",
                             (*labels, "decision"), registry=self.registry)
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *values: str) -> Any:
        # labels() takes a lock and builds a tuple each time; cache the children.
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, tenant: str, service: str, operation: str, status: int,
                seconds: float) -> None:
        """One answered request."""
        self._child(self.requests, tenant, service, operation, str(status)).inc()
        self._child(self.latency, tenant, service, operation).observe(seconds)

    def decision(self, metric: Counter, tenant: str, service: str, operation: str,
                 decision: str) -> None:
        """One rate-limit or authz decision."""
        self._child(metric, tenant, service, operation, decision).inc()

    def render(self) -> bytes:
        """The text exposition of this registry."""
        return generate_latest(self.registry)
