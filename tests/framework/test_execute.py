"""Execution: one call's outcome, sync calls inline with the watchdog, jobs and the reaper."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from framework import logs
from framework.context import Context
from framework.errors import Saturated, Unavailable
from framework.execute import Executor, call_with_deadline, encode_result, run_handler
from framework.flags import FlagSet
from framework.jobrunner import JobRunner, Reaper
from framework.jobs import SqliteJobStore, runner_id
from framework.registry import ServiceSpec
from framework.watchdog import InFlight


def spec(handle, timeout: float = 1.0, name: str = "svc") -> ServiceSpec:
    return ServiceSpec(name=name, description="", operations=(), mode="both", timeout=timeout,
                       validator=None, handle=handle, fallback=None, path=Path("x.py"))


def ctx(timeout: float = 1.0, payload=None) -> Context:
    return Context(tenant_id="acme", service="svc", operation=None, user="alice", groups=(),
                   roles=(), auth_method="jwt", payload=payload or {}, params={},
                   request_id="rid-1", config={}, flags=FlagSet({}, "acme", "alice"),
                   logger=logs.service_logger("acme", "rid-1", "svc", None),
                   deadline=time.monotonic() + timeout)


def test_a_result_is_encoded_and_timed():
    def burn(c):
        return {"n": sum(range(20000)), "text": "é"}

    outcome = run_handler(spec(burn), ctx(), 1000)
    assert outcome.status == 200 and outcome.ok and outcome.body == \
        '{"n":199990000,"text":"é"}'.encode()
    assert outcome.wall > 0 and outcome.cpu > 0


@pytest.mark.parametrize(("value", "reason"), [
    (object(), "not JSON"), (float("nan"), "not JSON"), ("x" * 100, "over the 50-byte"),
    ("\ud800", "not JSON"),
])
def test_results_must_be_json_and_under_the_cap(value, reason: str):
    outcome = run_handler(spec(lambda c: value), ctx(), 50)
    assert outcome.status == 500 and reason in outcome.error.detail
    assert outcome.error.error_id


def test_a_raising_handler_is_500_with_an_error_id_in_the_log(caplog):
    def boom(c):
        raise KeyError("hidden")

    with caplog.at_level("ERROR", logger="mtp.framework.execute"):
        outcome = run_handler(spec(boom), ctx(), 100)
    assert outcome.status == 500 and "hidden" not in outcome.error.detail
    record = next(r for r in caplog.records if getattr(r, "error_id", None))
    assert record.error_id == outcome.error.error_id and record.exc_info


def test_sys_exit_in_a_handler_does_not_escape():
    outcome = run_handler(spec(lambda c: exit(3)), ctx(), 100)
    assert outcome.status == 500


def test_a_sync_call_runs_on_the_calling_thread_and_late_is_504():
    ex = Executor(100)
    seen = []
    outcome = ex.sync(spec(lambda c: seen.append(threading.current_thread()) or 1), ctx())
    assert outcome.body == b"1" and seen == [threading.current_thread()]
    slow = ex.sync(spec(lambda c: time.sleep(0.15) or 1, timeout=0.05), ctx(0.05))
    assert slow.status == 504 and "0.05s" in slow.error.detail and slow.wall >= 0.1
    assert len(ex.inflight) == 0
    ex.close()


def test_the_watchdog_counts_a_call_still_running_past_its_deadline_once():
    ex = Executor(100)
    ex.inflight.interval = 0.02
    missed = []
    ex.inflight.on_overdue = lambda entry: missed.append((entry.service, entry.overdue))
    release = threading.Event()
    result = []
    worker = threading.Thread(target=lambda: result.append(
        ex.sync(spec(lambda c: release.wait(10) and 1, timeout=0.05), ctx(0.05))))
    worker.start()
    deadline = time.monotonic() + 10
    while not missed:  # counted while the handler still runs
        assert time.monotonic() < deadline, "the watchdog never counted the hung call"
        time.sleep(0.01)
    assert ex.inflight.overdue() == 1 and len(ex.inflight) == 1
    release.set()
    worker.join(10)
    assert missed == [("svc", True)]  # once, not at every scan
    assert result[0].status == 504 and result[0].overdue
    assert len(ex.inflight) == 0 and ex.inflight.overdue() == 0
    ex.close()


def test_a_failing_overdue_listener_does_not_stop_the_watchdog(caplog):
    watch = InFlight(interval=60)
    watch.on_overdue = lambda entry: 1 / 0
    key = watch.enter("svc", None, time.monotonic() - 1)
    with caplog.at_level("ERROR", logger="mtp.framework.watchdog"):
        assert [e.service for e in watch.scan()] == ["svc"]
    assert "listener failed" in caplog.text
    assert watch.scan() == [] and watch.leave(key) is True
    watch.stop()


def test_invoke_keeps_a_deadline_in_process():
    release = threading.Event()
    ex = Executor(100)
    hung = call_with_deadline(ex.call, spec(lambda c: release.wait(10) and 1, timeout=0.1),
                              ctx(0.1))
    assert hung.status == 504 and "0.1s" in hung.error.detail
    release.set()
    assert call_with_deadline(ex.call, spec(lambda c: 2), ctx()).body == b"2"
    late = call_with_deadline(ex.call, spec(lambda c: 3, timeout=0.01), ctx(-1))
    assert late.status == 504


def test_invoke_survives_a_call_that_escapes_the_seams():
    def escapes(s, c):
        raise KeyboardInterrupt

    outcome = call_with_deadline(escapes, spec(lambda c: 1), ctx())
    assert outcome.status == 500 and outcome.error.error_id


def test_executor_seams_can_be_wrapped():
    ex = Executor(100)
    seen = []

    def wrapped(s, c):
        seen.append(c.request_id)
        return ex.run_one(s, c)

    ex.call = wrapped
    assert ex.sync(spec(lambda c: [1]), ctx()).body == b"[1]"
    assert seen == ["rid-1"]


def test_the_request_id_follows_into_the_invoke_thread():
    logs.REQUEST_ID.set("outer-id")
    ex = Executor(100)
    outcome = call_with_deadline(ex.call, spec(lambda c: logs.REQUEST_ID.get()), ctx())
    assert outcome.body == b'"outer-id"'
    logs.REQUEST_ID.set("")


def test_encode_result_rejects_deep_nesting():
    deep: list = []
    for _ in range(100000):
        deep = [deep]
    with pytest.raises(Exception, match="not JSON"):
        encode_result(deep, 10**9)


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.sqlite3")


def test_job_runner_queue_is_bounded_and_cancel_beats_start(store: SqliteJobStore):
    ex = Executor(1000)
    events = []
    runner = JobRunner(store, lambda: ex.call, runner_id(), workers=1, queue=1,
                       on_status=lambda *a: events.append(a[3]))
    gate = threading.Event()
    blocker = spec(lambda c: gate.wait(5) and "done")
    first, f1 = runner.submit(blocker, ctx(), owner="alice")
    second, f2 = runner.submit(spec(lambda c: "never"), ctx(), owner="alice")
    with pytest.raises(Saturated):
        runner.submit(blocker, ctx(), owner="alice")
    assert store.cancel(second.id)
    gate.set()
    assert f1.result(5).body == b'"done"' and f2.result(5) is None
    assert store.get(first.id).status == "succeeded"
    assert store.get(second.id).status == "cancelled"
    assert sorted(events) == ["queued", "queued", "running", "succeeded"]
    runner.shutdown()


def test_a_job_no_thread_can_take_is_503_and_not_left_queued(store: SqliteJobStore):
    ex = Executor(1000)
    runner = JobRunner(store, lambda: ex.call, runner_id(), workers=1, queue=0)
    runner.shutdown()  # a worker on its way out: its executor takes no more work
    for _ in range(2):  # the slot came back: the second is refused the same way
        with pytest.raises(Saturated, match="no more jobs"):
            runner.submit(spec(lambda c: 1), ctx(), owner="alice")
    assert store.counts()["queued"] == 0 and store.counts()["cancelled"] == 2


def test_a_late_job_is_failed_with_504(store: SqliteJobStore):
    ex = Executor(1000)
    runner = JobRunner(store, lambda: ex.call, runner_id(), workers=1, queue=0)
    job, future = runner.submit(spec(lambda c: time.sleep(0.2) or 1, timeout=0.05), ctx(),
                                owner="alice")
    assert future.result(5).status == 504
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error["status"] == 504
    runner.shutdown()


class BrokenStore:
    def create(self, job):
        raise OSError("disk full")


def test_an_unusable_store_is_503_and_frees_the_slot():
    runner = JobRunner(BrokenStore(), lambda: None, runner_id(), workers=1, queue=0)
    for _ in range(3):
        with pytest.raises(Unavailable):
            runner.submit(spec(lambda c: 1), ctx(), owner="alice")


class FlakyStore(SqliteJobStore):
    def finish(self, *a, **kw):
        raise RuntimeError("database is locked")

    def reap(self, alive=None):
        raise RuntimeError("database is locked")


def test_store_failures_in_job_threads_and_the_reaper_are_logged_not_raised(tmp_path: Path):
    store = FlakyStore(tmp_path / "j.sqlite3")
    ex = Executor(1000)
    runner = JobRunner(store, lambda: ex.call, runner_id(), workers=1, queue=0)
    _, future = runner.submit(spec(lambda c: 1), ctx(), owner="alice")
    assert future.result(5) is None
    assert Reaper(store, 60).sweep() == 0
    runner.shutdown()


def test_a_store_outage_logs_one_traceback_then_short_lines(tmp_path: Path, caplog):
    reaper = Reaper(FlakyStore(tmp_path / "j.sqlite3"), 60)
    with caplog.at_level("INFO", logger="mtp.framework.jobs"):
        assert reaper.sweep() == 0 and reaper.sweep() == 0
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert "failed again: RuntimeError" in caplog.records[-1].getMessage()
    reaper.store = SqliteJobStore(tmp_path / "ok.sqlite3")
    with caplog.at_level("INFO", logger="mtp.framework.jobs"):
        assert reaper.sweep() == 0
    assert "succeed again" in caplog.records[-1].getMessage()


def test_reaper_runs_at_start_and_periodically(store: SqliteJobStore):
    from tests.framework.test_jobs import dead_runner, job

    store.create(job("1" * 32, runner=dead_runner()))
    reaper = Reaper(store, retention=3600, interval=0.05)
    reaper.start()
    assert store.get("1" * 32).status == "failed"
    store.create(job("2" * 32, runner=dead_runner()))
    deadline = time.monotonic() + 5
    while store.get("2" * 32).status != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    reaper.stop()
