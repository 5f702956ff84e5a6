"""`mtp invoke` keeps a deadline in-process: a hung handler is 504, not a hung command."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.framework.tenant import make_tenant
from tests.framework.test_cli import run_mtp


def test_invoke_answers_504_at_the_deadline_of_a_hung_handler(tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "tenant")
    started = time.monotonic()
    # [services.hang] timeout = 0.5; the handler would sleep a minute.
    done = run_mtp(["invoke", "hang", "--data", '{"seconds": 60}', "--tenant-dir", str(tenant)],
                   MTP_DATA_DIR=str(tmp_path / "data"))
    assert time.monotonic() - started < 45  # long before the handler would return
    assert done.returncode == 1
    doc = json.loads(done.stderr.strip().splitlines()[-1])
    assert doc["status"] == 504 and doc["type"].endswith("deadline-exceeded")
    assert "0.5s" in doc["detail"]
