"""Prometheus metrics, shared by gunicorn workers through multiprocess mode.

``mtp framework`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
the workers fork (prometheus_client reads it at import), and marks dead workers
from gunicorn's ``child_exit`` hook. Labels only ever carry names of services
and operations that exist (the controller sets them after the registry resolved the
service and the operation was checked against its OPERATIONS), so a client cannot grow
the label set by asking for made-up names.

Multiprocess mode exports no ``process_*`` metrics: :func:`exposition` adds them for
the gunicorn master and every worker, labelled ``process`` and ``pid``
(framework/procmetrics.py), and the dependency states of framework/depstate.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import PROCESS_COLLECTOR

from framework import depstate
from framework.procmetrics import gunicorn_processes, process_families

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client picks its storage from this variable once, at import; so do we.
MULTIPROCESS = bool(os.environ.get(MULTIPROC_ENV))
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "mtp_framework_requests", "Requests answered by the framework.",
    ["tenant", "service", "operation", "status"])
LATENCY = Histogram(
    "mtp_framework_request_duration_seconds", "Time from request to answer in the framework.",
    ["tenant", "service", "operation", "status"], buckets=BUCKETS)
ERRORS = Counter(
    "mtp_framework_errors", "Error answers by problem type.",
    ["tenant", "service", "operation", "kind"])
JOB_TRANSITIONS = Counter(
    "mtp_framework_job_transitions", "Jobs entering a status.",
    ["tenant", "service", "operation", "status"])


DEPENDENCY_UP = Gauge(
    "mtp_dependency_up", "1 while the dependency answers, 0 while down.", ["dependency"],
    multiprocess_mode="livemin")  # down in any live worker: down
DEPENDENCY_REFUSALS = Counter(
    "mtp_dependency_refusals", "Requests refused while the dependency was down.",
    ["dependency"])

if not MULTIPROCESS:
    # Our own process_* families (labelled, like the sidecar's) replace the default one,
    # so the joined scrape holds each name once.
    with contextlib.suppress(KeyError):  # already gone
        REGISTRY.unregister(PROCESS_COLLECTOR)


def _dependency_event(name: str, event: str) -> None:
    """framework/depstate.py listener: multiprocess-safe state and refusal counts."""
    if event == "refused":
        DEPENDENCY_REFUSALS.labels(name).inc()
    else:
        DEPENDENCY_UP.labels(name).set(0.0 if event == "down" else 1.0)


depstate.listen(_dependency_event)

_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}


def observe(tenant: str, service: str, operation: str, status: int, seconds: float,
            kind: str | None = None) -> None:
    """Count one answered request."""
    key = (tenant, service, operation, status)
    pair = _children.get(key)
    if pair is None:  # labels() locks and hashes; the set of keys is small and bounded
        code = str(status)
        pair = _children[key] = (REQUESTS.labels(tenant, service, operation, code),
                                 LATENCY.labels(tenant, service, operation, code))
    pair[0].inc()
    pair[1].observe(seconds)
    if kind is not None:
        ERRORS.labels(tenant, service, operation, kind).inc()


def job_status(tenant: str, service: str, operation: str | None, status: str) -> None:
    """Count a job entering ``status``."""
    JOB_TRANSITIONS.labels(tenant, service, operation or "", status).inc()


class _JobsCollector:
    """Jobs per status, read from the shared store at scrape time; and process_* metrics."""

    def __init__(self, tenant: str, counts: Callable[[], dict[str, int]]) -> None:
        self.tenant, self.counts = tenant, counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("mtp_framework_jobs", "Jobs in the store by status.",
                                   labels=["tenant", "status"])
        for status, n in self.counts().items():
            family.add_metric([self.tenant, status], n)
        yield family
        yield from process_families(gunicorn_processes() if MULTIPROCESS
                                    else [("framework", os.getpid())])


def exposition(tenant: str, job_counts: Callable[[], dict[str, int]]) -> tuple[bytes, str]:
    """The text of ``GET /metrics``: every worker's metrics plus the job gauge."""
    if MULTIPROCESS:
        base = CollectorRegistry()
        multiprocess.MultiProcessCollector(base)
    else:
        base = REGISTRY
    jobs = CollectorRegistry(auto_describe=False)
    jobs.register(_JobsCollector(tenant, job_counts))
    return generate_latest(base) + generate_latest(jobs), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    """gunicorn child_exit: drop the live-gauge files of a dead worker."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
