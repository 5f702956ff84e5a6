"""framework/ticker.py: every chore of a kind on one thread, however many registered."""

from __future__ import annotations

import threading

from framework.ticker import Ticker
from tests.helpers import eventually


def test_many_chores_run_on_one_thread_and_stop_when_cancelled() -> None:
    ticker = Ticker("test")
    counts = [0] * 50
    threads: set[str] = set()

    def chore(i: int):
        def run() -> None:
            counts[i] += 1
            threads.add(threading.current_thread().name)
        return run

    before = threading.active_count()
    cancels = [ticker.every(0.01, chore(i)) for i in range(50)]
    assert threading.active_count() == before + 1 and len(ticker) == 50
    eventually(lambda: min(counts) >= 3)
    assert threads == {"mtp-test"}
    for cancel in cancels:
        cancel()
    assert len(ticker) == 0
    settled = list(counts)
    # A chore registered now has run twice: a cancelled one would have run meanwhile.
    barrier: list[int] = []
    cancel = ticker.every(0.01, lambda: barrier.append(1))
    eventually(lambda: len(barrier) >= 2)
    cancel()
    assert counts == settled


def test_a_failing_chore_does_not_stop_the_others(caplog) -> None:
    ticker = Ticker("failing")
    ran = []

    def boom() -> None:
        raise RuntimeError("chore broke")

    cancel_boom = ticker.every(0.01, boom)
    cancel_ok = ticker.every(0.01, lambda: ran.append(1))
    eventually(lambda: len(ran) >= 3)
    assert "failing chore failed" in caplog.text
    cancel_boom()
    cancel_ok()


def test_a_chore_registered_later_runs_at_its_own_interval() -> None:
    ticker = Ticker("later")
    slow, fast = [], []
    cancel_slow = ticker.every(60.0, lambda: slow.append(1))  # the thread now waits ~60 s
    cancel_fast = ticker.every(0.01, lambda: fast.append(1))  # and is woken for this one
    eventually(lambda: len(fast) >= 3)
    assert slow == []
    cancel_slow()
    cancel_fast()
