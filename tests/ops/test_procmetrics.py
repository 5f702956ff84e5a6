"""process_* metrics of several processes, labelled; children found with or without the
kernel's per-task children list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from framework.procmetrics import children, gunicorn_processes, process_families


def test_families_hold_one_labelled_series_per_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        families = {f.name: f for f in process_families([("a", os.getpid()),
                                                         ("b", child.pid)])}
        cpu = families["process_cpu_seconds"]
        assert cpu.type == "counter"
        assert {(s.labels["process"], s.labels["pid"]) for s in cpu.samples} == {
            ("a", str(os.getpid())), ("b", str(child.pid))}
        assert child.pid in children(os.getpid())
    finally:
        child.kill()
        child.wait()
    # A process that went away meanwhile leaves no series (and no error).
    assert process_families([("gone", child.pid)]) == []


def test_children_without_the_task_children_list(tmp_path: Path) -> None:
    for pid, state, ppid in ((10, "S", 1), (11, "S", 10), (12, "Z", 10), (13, "R", 10)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python3 (x)) {state} {ppid} 1 1\n")
    (tmp_path / "14").mkdir()
    (tmp_path / "14" / "stat").write_text("garbage")
    assert children(10, proc=tmp_path) == [11, 13]  # zombies are not processes any more


def test_gunicorn_processes_are_the_parent_and_its_children() -> None:
    found = gunicorn_processes()
    assert found[0] == ("framework-master", os.getppid())
    assert ("framework-worker", os.getpid()) in found
