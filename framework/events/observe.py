"""Audit lines and metrics of events: one line per publish and per delivery outcome.

Audit lines have the sidecar's fields (framework/../sidecar/audit.py) plus ``event_id``
and ``event_type``, with ``method`` = ``EVENT``; they are appended to MTP_AUDIT_FILE (one
``write`` each, O_APPEND, so lines of the two processes never interleave) or stdout.
Metric labels carry the event type only for the first :data:`MAX_TYPES` types a process
sees (then ``other``): a client cannot grow the label set without bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from prometheus_client import Counter, Histogram

MAX_TYPES = 100

PUBLISHED = Counter("mtp_events_published", "Events accepted (not duplicates).",
                    ["tenant", "type"])
DELIVERED = Counter("mtp_events_delivered", "Deliveries that succeeded.", ["tenant", "type"])
RETRIED = Counter("mtp_events_retried", "Failed deliveries scheduled again.", ["tenant", "type"])
DEAD = Counter("mtp_events_dead", "Deliveries given up on (dead letters).", ["tenant", "type"])
LAG = Histogram("mtp_events_delivery_lag_seconds", "From publish to the handler's start.",
                ["tenant"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                     5, 10, 30, 60, 300))

_types: set[str] = set()
_types_lock = threading.Lock()


def type_label(event_type: str) -> str:
    """The event type as a metric label, bounded in number."""
    if event_type in _types:
        return event_type
    with _types_lock:
        if len(_types) < MAX_TYPES:
            _types.add(event_type)
            return event_type
    return "other"


class EventAudit:
    """Appends audit lines for events."""

    def __init__(self, path: str, tenant: str) -> None:
        self.tenant = tenant
        self._fd = (os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) if path
                    else sys.stdout.fileno())

    def write(self, *, request_id: str, user: str, auth_method: str, outcome: str,
              event_id: str, event_type: str, service: str = "", operation: str = "",
              reason: str = "", status: int = 0) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        line = json.dumps({
            "time": f"{stamp}.{int((now % 1) * 1000):03d}Z", "request_id": request_id,
            "tenant": self.tenant, "user": user, "auth_method": auth_method,
            "method": "EVENT", "service": service, "operation": operation or None,
            "outcome": outcome, "reason": reason, "rule": None, "status": status,
            "event_id": event_id, "event_type": event_type}, separators=(",", ":"))
        # A full disk must not stop deliveries; the sidecar's audit has the request.
        with contextlib.suppress(OSError):
            os.write(self._fd, line.encode() + b"\n")
