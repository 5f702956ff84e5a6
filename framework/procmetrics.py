"""The standard ``process_*`` metrics of several processes, told apart by labels.

prometheus_client's ProcessCollector reports one process, unlabelled; its multiprocess
mode (gunicorn workers) exports none at all. The sidecar's and the framework's
``/metrics`` are joined into one scrape, so every ``process_*`` sample carries
``process`` (``sidecar``, ``framework``, ``framework-master``, ``framework-worker``)
and ``pid``: one family per metric name, one series per live process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.core import Metric

PROC = Path("/proc")


def process_families(targets: Iterable[tuple[str, int]]) -> list[Metric]:
    """``process_*`` families for each ``(role, pid)``, labelled ``process`` and ``pid``."""
    families: dict[str, Metric] = {}
    for role, pid in targets:
        collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
        for metric in collector.collect():
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = Metric(metric.name, metric.documentation,
                                                        metric.type)
            for sample in metric.samples:
                family.add_sample(sample.name, {**sample.labels, "process": role,
                                                "pid": str(pid)}, sample.value)
    return list(families.values())


def children(parent: int, proc: Path = PROC) -> list[int]:
    """Live child processes of ``parent`` (from /proc; empty where /proc is missing)."""
    listed = proc / str(parent) / "task" / str(parent) / "children"
    try:
        return sorted(int(pid) for pid in listed.read_text().split())
    except (OSError, ValueError):
        pass
    found = []  # kernels without CONFIG_PROC_CHILDREN: walk every process's stat
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def gunicorn_processes() -> list[tuple[str, int]]:
    """From inside a gunicorn worker: the master (its parent) and every worker."""
    master = os.getppid()
    return [("framework-master", master),
            *(("framework-worker", pid) for pid in children(master))]
