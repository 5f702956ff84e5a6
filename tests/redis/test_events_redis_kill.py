"""A replica SIGKILLed while it runs event deliveries loses nothing: its consumers stop
refreshing their entries, and a live consumer takes them over with XAUTOCLAIM.

Its own module, so its redis-server holds no other replicas of the tenant.
"""

from __future__ import annotations

import uuid

import pytest

from tests.events.stack import lines, write_events_tenant
from tests.redis.stack import Replica, descendants
from tests.redis.test_events_redis import publish, wait_for

pytestmark = pytest.mark.slow


def test_a_replica_killed_mid_delivery_loses_nothing(redis_server, tmp_path) -> None:
    tenant = write_events_tenant(tmp_path)
    a = Replica("a", tmp_path, tenant, redis_server.url).launch()
    b = Replica("b", tmp_path, tenant, redis_server.url).launch()
    try:
        a.ready()
        b.ready()
        family = set(descendants(a.proc.pid))
        ids = []
        for n in range(8):
            eid = uuid.uuid4().hex
            ids.append(eid)
            assert publish(a, {"id": eid, "source": "/k", "type": "slow.k",
                               "data": {"n": n, "sleep": 1.5}}) == 202
        started = tmp_path / "record.jsonl.started"
        # Kill A while one of its processes is inside a handler.
        victim = wait_for(lambda: next((s["id"] for s in lines(started)
                                        if s["pid"] in family), None), timeout=20)
        a.kill()
        assert victim not in {r["event"]["id"] for r in lines(tmp_path / "record.jsonl")}
        wait_for(lambda: {r["event"]["id"] for r in lines(tmp_path / "record.jsonl")}
                 >= set(ids), timeout=60)
    finally:
        if a.proc is not None:
            a.stop()
        b.stop()
