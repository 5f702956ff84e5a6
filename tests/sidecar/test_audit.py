"""The audit line: valid JSON with exactly the decision's fields, whatever the strings hold."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.audit import AuditLog

FIELDS = ["time", "request_id", "tenant", "user", "auth_method", "method", "service",
          "operation", "outcome", "reason", "rule", "status"]

text = st.text(max_size=40)  # any code point, quotes, backslashes, controls, surrogates


@settings(max_examples=300, deadline=None)
@given(request_id=text, tenant=text, user=text, auth_method=text, method=text, service=text,
       operation=st.none() | text, outcome=text, reason=text,
       rule=st.none() | st.integers(0, 10**6), status=st.integers(100, 599))
def test_any_field_values_give_one_json_line(tmp_path_factory, **fields) -> None:
    path = tmp_path_factory.mktemp("audit") / "audit.log"
    audit = AuditLog(str(path))
    audit.write(**fields)
    asyncio.run(audit.close())  # flushes
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and raw.isascii()
    line = json.loads(raw)
    assert list(line) == FIELDS
    assert {k: line[k] for k in fields} == fields
    assert line["time"].endswith("Z") and len(line["time"]) == len("2026-01-01T00:00:00.000Z")


def test_lines_are_buffered_until_flushed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path))
    audit.write(request_id="r1", method="GET", outcome="allowed", status=200)
    assert path.read_bytes() == b""  # no system call per request
    audit.flush()
    assert json.loads(path.read_bytes())["request_id"] == "r1"
    asyncio.run(audit.close())
