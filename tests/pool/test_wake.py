"""A pool's idle reaper and the event deliveries a tenant's process still has to make.

The reaper asks the tenant's own events database (a real SQLite file made by the
engine's EventStore) before it stops a process; the processes here are real ones
(``sleep``) in their own process group, as tenant processes are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from pathlib import Path

from framework.events.store import DB_NAME, PENDING, RUNNING, EventStore, next_due
from framework.pool.procs import ProcessManager, TenantProcess
from framework.pool.wake import Wakeups


def delivery(tenants: Path, tenant: str, status: str, next_at: float) -> None:
    """One delivery row in the tenant's events database, as the engine writes it."""
    path = tenants / tenant / DB_NAME
    EventStore(path)  # the schema
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO deliveries (seq, route_key, route, subject, status, next_at,"
                     " updated) VALUES (1, 'k', '{}', NULL, ?, ?, 0)", (status, next_at))


def test_next_due_reads_the_earliest_pending_and_running_is_now(tmp_path: Path) -> None:
    assert next_due(tmp_path / "none" / DB_NAME) is None  # the tenant never published
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_text("not a database")
    assert next_due(tmp_path / "junk" / DB_NAME) is None
    EventStore(tmp_path / "empty" / DB_NAME)
    assert next_due(tmp_path / "empty" / DB_NAME) is None
    delivery(tmp_path, "later", PENDING, 2_000_000_000.0)
    delivery(tmp_path, "later", PENDING, 1_900_000_000.0)
    assert next_due(tmp_path / "later" / DB_NAME) == 1_900_000_000.0
    delivery(tmp_path, "busy", RUNNING, 1.0)
    assert abs(next_due(tmp_path / "busy" / DB_NAME) - time.time()) < 5


def test_a_restarted_pool_finds_every_tenant_with_deliveries(tmp_path: Path) -> None:
    delivery(tmp_path, "acme", PENDING, 100.0)
    delivery(tmp_path, "globex", PENDING, 300.0)
    EventStore(tmp_path / "initech" / DB_NAME)  # nothing to deliver
    (tmp_path / "Not_A_Tenant").mkdir()
    wake = Wakeups(tmp_path)
    assert wake.scan() == 2
    assert wake.pop_due(50.0) == []
    assert wake.pop_due(200.0) == ["acme"]
    wake.later("globex", 250.0)
    assert wake.pop_due(400.0) == ["globex"]  # once, however often it was scheduled
    assert Wakeups(tmp_path / "missing").scan() == 0


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_the_reaper_keeps_a_process_with_deliveries_soon_and_wakes_one_later(
        tmp_path: Path) -> None:
    now = time.time()
    delivery(tmp_path, "soon", PENDING, now + 2)
    delivery(tmp_path, "later", PENDING, now + 120)
    procs = {t: sleeper() for t in ("soon", "later", "idle")}
    wake = Wakeups(tmp_path)

    async def reap() -> list[str]:
        manager = ProcessManager(None, tmp_path / "run", lambda *a: ({}, {}),  # type: ignore[arg-type]
                                 idle=10, max_procs=10, grace=1, wake=wake)
        for tenant, proc in procs.items():
            manager.live[tenant] = TenantProcess(tenant, proc.pid, tmp_path / f"{tenant}.sock",
                                                 (), last_used=time.monotonic() - 60)
        stopped = manager.reap_idle()
        await manager.close()
        return stopped

    try:
        assert sorted(asyncio.run(reap())) == ["idle", "later"]
        assert wake.pop_due(now + 60) == []
        assert wake.pop_due(now + 121) == ["later"]
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_making_room_for_another_tenant_schedules_the_evicted_ones_deliveries(
        tmp_path: Path) -> None:
    now = time.time()
    delivery(tmp_path, "old", PENDING, now - 5)  # due already: woken after an idle time
    wake = Wakeups(tmp_path)
    proc = sleeper()

    async def evict() -> None:
        manager = ProcessManager(None, tmp_path / "run", lambda *a: ({}, {}),  # type: ignore[arg-type]
                                 idle=30, max_procs=1, grace=1, wake=wake)
        manager.live["old"] = TenantProcess("old", proc.pid, tmp_path / "old.sock", ())
        manager.make_room()
        assert "old" not in manager.live
        await manager.close()

    try:
        asyncio.run(evict())
        assert wake.pop_due(now + 10) == []  # not straight back: it would evict another
        assert wake.pop_due(now + 31) == ["old"]
    finally:
        proc.kill()
        proc.wait()
