"""Event deliveries of tenants whose process a pool stopped: kept, or woken when due.

The embedded events engine runs inside a tenant's process, and a pool stops that
process after ``MTP_POOL_IDLE`` seconds without a request. Without this, a delivery
waiting for its retry (or one handed back by a graceful stop) would wait for the
tenant's next request, however late. So before a process is reaped for idleness the
pool asks the tenant's events database when its next delivery is due: soon (within
the idle time) keeps the process; later stops it and wakes it at that time. At start
the pool asks every tenant's database once (a pool restart loses no wake-up).
"""

from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from framework.events.store import DB_NAME, next_due
from framework.tenant_config import TENANT_ID_RE


@dataclass
class Wakeups:
    """When each stopped tenant has event deliveries due."""

    tenants_dir: Path  # the pool's $MTP_DATA_DIR/tenants: one data dir per tenant
    _heap: list[tuple[float, str]] = field(default_factory=list)

    def due(self, tenant_id: str) -> float | None:
        """The tenant's next delivery time (epoch seconds), or None."""
        return next_due(self.tenants_dir / tenant_id / DB_NAME)

    def later(self, tenant_id: str, at: float) -> None:
        """Wake ``tenant_id`` at ``at``."""
        heapq.heappush(self._heap, (at, tenant_id))

    def scan(self) -> int:
        """Every tenant with deliveries to make, once (at start); how many there are."""
        try:
            entries = list(os.scandir(self.tenants_dir))
        except OSError:
            return 0
        found = 0
        for entry in entries:
            if entry.is_dir() and TENANT_ID_RE.match(entry.name):
                at = self.due(entry.name)
                if at is not None:
                    self.later(entry.name, at)
                    found += 1
        return found

    def pop_due(self, now: float | None = None) -> list[str]:
        """The tenants whose wake-up time has come (each once)."""
        now = time.time() if now is None else now
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            _, tenant_id = heapq.heappop(self._heap)
            if tenant_id not in out:
                out.append(tenant_id)
        return out
