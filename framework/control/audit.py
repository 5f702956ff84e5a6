"""The admin audit trail: one JSON line per admin action, to stdout or MTP_AUDIT_FILE.

A line names the operator, the action, the tenant, the fields changed (names and
new values of record fields, never a credential), the outcome status and the
request id. Refusals (401/403) are audited too: who tried matters most then.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import IO, Any

from framework.control.store import iso_now


class AdminAudit:
    """Writes one line per action, flushed at once (admin actions are rare and matter)."""

    def __init__(self, path: str = "") -> None:
        self._own = bool(path)
        self._out: IO[str] = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, *, operator: str, action: str, status: int, request_id: str,
              tenant: str = "", fields: dict[str, Any] | None = None, reason: str = "") -> None:
        line = json.dumps({
            "time": iso_now(), "kind": "admin", "request_id": request_id,
            "operator": operator, "action": action, "tenant": tenant,
            "fields": fields or {}, "status": status, "reason": reason,
        }, separators=(",", ":"), sort_keys=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()
