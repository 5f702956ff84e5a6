"""Prometheus metrics of the sidecar, kept in plain dicts and rendered at scrape time.

prometheus_client's own Counter/Histogram take a lock and walk every bucket on each
observation (~10 µs per request here); the sidecar is one event loop, so it counts in
dicts (a bisect and a list increment) and a custom collector turns them into metric
families only when /metrics is scraped.

Labels name only services that exist (:class:`ServiceNames`, read from the tenant dir at
start) and their declared operations; every other name is counted as ``_unknown``, so
made-up paths cannot grow the series. The scrape is rendered in a worker thread
(:meth:`Metrics.scrape`), never on the event loop.
"""

from __future__ import annotations

import ast
import os
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from framework import depstate
from framework.procmetrics import process_families
from framework.tenant_config import SERVICE_NAME_RE, TenantConfig

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
LABELS = ("tenant", "service", "operation")
UNKNOWN = "_unknown"  # not a valid service or operation name, so never a real one

Key = tuple[str, ...]


def declared_operations(path: Path) -> frozenset[str] | None:
    """A module's ``OPERATIONS`` read from its source, without running tenant code.

    Empty for a module without OPERATIONS; None when it cannot be read or is not a
    literal list of strings (its operations are then all counted as ``_unknown``).
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    operations: frozenset[str] = frozenset()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "OPERATIONS" for t in targets):
            continue
        try:
            found = ast.literal_eval(value)
        except ValueError:
            return None
        if not isinstance(found, (list, tuple)) or not all(isinstance(op, str) for op in found):
            return None
        operations = frozenset(found)  # the last assignment wins, as on import
    return operations


@dataclass(frozen=True)
class ServiceNames:
    """The services that exist (enabled modules of the tenant dir) and their operations."""

    services: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    @classmethod
    def from_tenant_dir(cls, tenant_dir: Path, tenant: TenantConfig) -> ServiceNames:
        """``services/<name>.py`` with a valid name, minus those tenant.toml disables.

        A plan's entitlements are left alone: they can change while the sidecar runs,
        and the set of files is bounded either way.
        """
        folder = Path(tenant_dir) / "services"
        found: dict[str, frozenset[str] | None] = {}
        paths = sorted(folder.glob("*.py")) if folder.is_dir() else []
        for path in paths:
            name = path.stem
            if SERVICE_NAME_RE.fullmatch(name) is None or not path.is_file():
                continue  # private helpers (_x.py) and odd names are never routable
            settings = tenant.services.get(name)
            if settings is not None and not settings.enabled:
                continue
            found[name] = declared_operations(path)
        return cls(found)

    def labels(self, service: str, operation: str) -> tuple[str, str]:
        """The (service, operation) label values a request is counted under."""
        if not service:
            return "", ""  # not a service call (/jobs, /services, /openapi.json...)
        if service not in self.services:
            return UNKNOWN, UNKNOWN if operation else ""
        if not operation:
            return service, ""
        operations = self.services[service]
        return service, operation if operations and operation in operations else UNKNOWN


class Metrics:
    """Requests, latency, rate-limit and authz decisions, labelled tenant/service/operation."""

    AUTHZ: ClassVar[str] = "authz"
    RATELIMIT: ClassVar[str] = "ratelimit"

    def __init__(self, catalog: ServiceNames | None = None) -> None:
        self.catalog = catalog or ServiceNames()
        self.requests: dict[Key, int] = {}
        self.latency: dict[Key, list[float]] = {}  # bucket counts..., +Inf count, sum
        self.decisions: dict[str, dict[Key, int]] = {self.AUTHZ: {}, self.RATELIMIT: {}}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, tenant: str, service: str, operation: str, status: int,
                seconds: float) -> None:
        """One answered request."""
        service, operation = self.catalog.labels(service, operation)
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
        service, operation = self.catalog.labels(service, operation)
        table = self.decisions[kind]
        key = (tenant, service, operation, decision)
        table[key] = table.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The collector protocol: metric families from the current counts.

        It runs in a worker thread while the loop keeps counting: each dict is copied
        first (one C-level call), so no iteration sees it change size.
        """
        requests = CounterMetricFamily("mtp_sidecar_requests", "Requests answered by the sidecar",
                                       labels=(*LABELS, "status"))
        for key, count in self.requests.copy().items():
            requests.add_metric(key, count)
        yield requests
        latency = HistogramMetricFamily("mtp_sidecar_request_seconds",
                                        "Time from arrival to answer", labels=LABELS)
        for key, row in self.latency.copy().items():
            row = row[:]
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
            for key, count in self.decisions[kind].copy().items():
                family.add_metric(key, count)
            yield family
        yield from dependency_families(depstate.dependencies())
        yield from process_families([("sidecar", os.getpid())])

    def render(self) -> bytes:
        """The text exposition of the sidecar alone."""
        return generate_latest(self.registry)

    def scrape(self, framework_text: bytes | None) -> bytes:
        """The sidecar's families merged with the framework's text: one family per name.

        Blocking work (walks every series, parses the framework's text): the caller runs
        it in a thread.
        """
        return merge(list(self.registry.collect()), framework_text)


def dependency_families(deps: list[depstate.Dependency]) -> list[Metric]:
    """``mtp_dependency_up`` and ``mtp_dependency_refusals_total`` of this process."""
    up = GaugeMetricFamily("mtp_dependency_up", "1 while the dependency answers, 0 while down",
                           labels=("dependency",))
    refusals = CounterMetricFamily(
        "mtp_dependency_refusals",
        "Requests refused (or, for the limiter, limited locally) while the dependency was down",
        labels=("dependency",))
    for dep in deps:
        up.add_metric((dep.name,), 1.0 if dep.up else 0.0)
        refusals.add_metric((dep.name,), dep.refusals)
    return [up, refusals]


class _Families:
    """A collector that yields metric families it was given (for :func:`merge`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def merge(own: list[Metric], other: bytes | None) -> bytes:
    """The sidecar's families and the framework's text as one exposition.

    Two processes export some names alike (``process_*``, ``mtp_dependency_*``); written
    one after the other, a family would appear twice, which the text format forbids, so
    families of the same name are joined (their series differ by label). A family whose
    type differs keeps the sidecar's; text that does not parse is left out, and said so.
    """
    families = {family.name: family for family in own}
    note = b""
    if other:
        try:
            parsed = list(text_string_to_metric_families(other.decode()))
        except (ValueError, UnicodeDecodeError) as exc:
            parsed = []
            note = f"# framework metrics unreadable: {type(exc).__name__}\n".encode()
        for family in parsed:
            have = families.get(family.name)
            if have is None:
                families[family.name] = family
            elif have.type == family.type:
                have.samples.extend(family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry) + note
