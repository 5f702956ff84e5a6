"""The framework's log lines: buffered access lines, kept in order with the others."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator

import pytest

from framework import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    log = logs.setup("INFO", "acme", out)
    yield out
    logs.flush()
    log.handlers[:] = []


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


def test_access_lines_wait_for_the_flush_interval(stream: io.StringIO) -> None:
    logs.access(logging.getLogger(logs.LOGGER_NAME), "r1", {"status": 200})
    assert stream.getvalue() == ""  # no write per request
    deadline = time.monotonic() + 5
    while not stream.getvalue():
        assert time.monotonic() < deadline, "the access line never came"
        time.sleep(0.02)
    (line,) = lines(stream)
    assert (line["msg"], line["request_id"], line["tenant"], line["status"]) == \
        ("request", "r1", "acme", 200)


def test_any_other_line_first_writes_the_buffered_ones(stream: io.StringIO) -> None:
    log = logging.getLogger(logs.LOGGER_NAME)
    logs.access(log, "r1", {"status": 200})
    logs.access(log, "r2", {"status": 404})
    log.warning("something else")
    assert [x["request_id"] for x in lines(stream)] == ["r1", "r2", ""]
    assert lines(stream)[-1]["msg"] == "something else"


def test_a_full_buffer_is_written_at_once(stream: io.StringIO) -> None:
    log = logging.getLogger(logs.LOGGER_NAME)
    filler = "x" * 1000
    count = 2 * (logs.ACCESS_BUFFER_BYTES // 1000 + 1)  # fills it even after a timed flush
    for i in range(count):
        logs.access(log, f"r{i}", {"pad": filler})
    # Written by the request that filled it, not a flush interval later.
    assert len(stream.getvalue()) >= logs.ACCESS_BUFFER_BYTES
    assert [x["request_id"] for x in lines(stream)] == [f"r{i}" for i in range(len(lines(stream)))]


def test_a_forked_child_does_not_write_its_parents_lines(stream: io.StringIO) -> None:
    log = logging.getLogger(logs.LOGGER_NAME)
    logs.access(log, "parent", {"status": 200})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        logs.flush()
        os._exit(0 if stream.getvalue() == "" else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    logs.flush()
    assert [x["request_id"] for x in lines(stream)] == ["parent"]


def test_below_info_nothing_is_buffered() -> None:
    out = io.StringIO()
    log = logs.setup("WARNING", "acme", out)
    try:
        logs.access(log, "r1", {"status": 200})
        logs.flush()
        assert out.getvalue() == ""
    finally:
        log.handlers[:] = []
