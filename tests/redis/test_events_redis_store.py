"""An idle consumer of the events stream waits in Redis instead of polling it.

Every framework worker and every `mtp worker` process of every tenant is a consumer;
polling the stream 20 times a second each kept two cores busy with ten idle tenants.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from framework.events.binding import new_event
from framework.events.config import EventRoute
from framework.events.store import Publisher
from framework.events.store_redis import RedisEventStore
from framework.jobs_redis import connect

pytestmark = pytest.mark.slow

WHO = Publisher("alice", (), (), "jwt", "rid-1")


def blocked_clients(store: RedisEventStore) -> int:
    return int(store.client.info("clients")["blocked_clients"])


def test_an_idle_consumer_blocks_on_the_stream_and_gets_the_next_entry_at_once(
        redis_server) -> None:
    store = RedisEventStore(connect(redis_server.url, pool_size=4), f"idle-{uuid.uuid4().hex[:8]}")
    publisher = RedisEventStore(connect(redis_server.url, pool_size=2), store.tenant)
    route = EventRoute(types=("t.*",), service="sink")
    got: list = []
    done = threading.Event()

    def consume() -> None:
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            got.extend(store.claim("c1", 4, store.lease))
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 10
    while blocked_clients(store) < 1:  # the consumer waits inside Redis, not in a sleep
        assert time.monotonic() < deadline, "the idle consumer never blocked on the stream"
        time.sleep(0.01)
    event = new_event("t.tick", {"n": 1}, None, "/bench")
    assert publisher.publish(event, WHO, [route])
    assert done.wait(20)
    assert [d.event.id for d in got] == [event.id]
    assert got[0].route.service == "sink"


def test_a_consumer_with_entries_in_hand_does_not_block(redis_server) -> None:
    """Held entries (waiting for their turn or running) are checked on every poll."""
    store = RedisEventStore(connect(redis_server.url, pool_size=4), f"busy-{uuid.uuid4().hex[:8]}")
    route = EventRoute(types=("t.*",), service="sink")
    for n in range(2):
        assert store.publish(new_event("t.tick", {"n": n}, "s", "/bench"), WHO, [route])
    first = store.claim("c1", 4, store.lease)
    assert [d.event.data for d in first] == [{"n": 0}]  # the second waits for the first
    assert store.claim("c1", 4, store.lease) == []
    store.finish(first[0].did, "c1", "done")
    second = store.claim("c1", 4, store.lease)
    assert [d.event.data for d in second] == [{"n": 1}]


def test_a_consumer_takes_only_what_it_can_run_and_leaves_the_rest_to_others(
        redis_server) -> None:
    """Entries without a subject need no order: a busy consumer does not hoard them."""
    tenant = f"spread-{uuid.uuid4().hex[:8]}"
    one = RedisEventStore(connect(redis_server.url, pool_size=2), tenant)
    two = RedisEventStore(connect(redis_server.url, pool_size=2), tenant)
    route = EventRoute(types=("t.*",), service="sink")
    for n in range(8):
        assert one.publish(new_event("t.tick", {"n": n}, None, "/bench"), WHO, [route])
    first = one.claim("c1", 4, one.lease)
    second = two.claim("c2", 4, two.lease)
    assert sorted(d.event.data["n"] for d in first + second) == list(range(8))
    assert len(first) == len(second) == 4
    for d in first:
        one.finish(d.did, "c1", "done")
    for d in second:
        two.finish(d.did, "c2", "done")
    assert one.client.xpending(one.stream, "deliver")["pending"] == 0
