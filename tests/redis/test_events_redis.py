"""Events on the shared engine: two `mtp run` replicas (sidecar, framework, worker each)
on one redis-server, one stream per tenant with a consumer group.

Any replica accepts, any consumer delivers; duplicates are caught across replicas;
the same subject stays in publish order across replicas; dead letters are shared.
(A replica SIGKILLed mid-delivery: test_events_redis_kill.py, with its own redis-server.)
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.events.stack import lines, write_events_tenant
from tests.helpers import eventually as wait_for
from tests.redis.stack import Replica, token

pytestmark = pytest.mark.slow

CE = "application/cloudevents+json"


def publish(replica: Replica, event: dict, user: str = "alice", roles: tuple = ()) -> int:
    headers = {"Authorization": f"Bearer {token(user, roles)}", "Content-Type": CE}
    return replica.call("POST", "/events", headers,
                        json.dumps({"specversion": "1.0", **event}).encode()).status



@pytest.fixture(scope="module")
def pair(redis_server, tmp_path_factory) -> Iterator[tuple[Replica, Replica]]:
    root = tmp_path_factory.mktemp("events-redis")
    tenant = write_events_tenant(root)
    a = Replica("a", root, tenant, redis_server.url).launch()
    b = Replica("b", root, tenant, redis_server.url).launch()
    try:
        yield a.ready(), b.ready()
    finally:
        a.stop()
        b.stop()


def test_published_on_one_replica_delivered_once_and_duplicates_caught_on_another(
        pair) -> None:
    a, b = pair
    eid = uuid.uuid4().hex
    event = {"id": eid, "source": "/r", "type": "order.created", "subject": "eu/7",
             "data": {"n": 1}}
    assert publish(a, event) == 202
    assert publish(b, event) == 202  # the duplicate, on the other replica
    out = a.root / "record.jsonl"
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(out)))
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(a.root / "eu.jsonl")))
    time.sleep(0.5)  # a second delivery would have been made by now
    assert sum(r["event"]["id"] == eid for r in lines(out)) == 1
    record = next(r for r in lines(out) if r["event"]["id"] == eid)
    assert record["user"] == "alice" and record["payload"] == {"n": 1}


def test_same_subject_in_order_across_replicas(pair) -> None:
    a, b = pair
    subject = f"cart-{uuid.uuid4().hex[:8]}"
    for n in range(8):
        replica = a if n % 2 else b
        assert publish(replica, {"id": uuid.uuid4().hex, "source": "/r", "type": "slow.x",
                                 "subject": subject, "data": {"n": n, "sleep": 0.05}}) == 202
    out = a.root / "record.jsonl"
    wait_for(lambda: sum(r["event"]["subject"] == subject for r in lines(out)) >= 8)
    mine = [r for r in lines(out) if r["event"]["subject"] == subject]
    assert [r["payload"]["n"] for r in mine] == list(range(8))
    for before, after in itertools.pairwise(mine):
        assert after["started"] >= before["ended"]


def test_dead_letters_are_shared_and_replayed_from_any_replica(pair) -> None:
    a, b = pair
    marker = a.root / "failing"
    marker.write_text("1")
    eid = uuid.uuid4().hex
    assert publish(a, {"id": eid, "source": "/r", "type": "flaky.x"}) == 202
    admin = {"Authorization": f"Bearer {token('root', ('admin',))}"}

    def letter():
        answer = b.call("GET", "/events/dead", admin)
        assert answer.status == 200, answer.body
        return next((d for d in answer.json()["dead"] if d["event"]["id"] == eid), None)

    found = wait_for(letter)
    assert found["attempts"] == 3
    marker.unlink()
    assert a.call("POST", f"/events/dead/{found['id']}/replay", admin).status == 202
    wait_for(lambda: any(r["event"]["id"] == eid for r in lines(a.root / "flaky.jsonl")))
    assert a.call("POST", f"/events/dead/{found['id']}/replay", admin).status == 404
