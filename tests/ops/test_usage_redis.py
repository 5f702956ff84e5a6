"""Usage in Redis: the same answers as SQLite, shared by replicas, kept through an outage."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from framework.cli import cli
from framework.settings import Settings
from framework.tenant_config import BillingSettings
from framework.usage import HOUR, UsageMeter, UsageStore, hour_of, iso_hour
from framework.usage_redis import (
    RedisUsageStore,
    RedisWebhookExporter,
    UsageUnavailable,
    connect,
    open_store,
    start_exporter,
)
from framework.webhook import ExportPolicy, WebhookExporter, idempotency_key
from tests.helpers import free_port
from tests.ops.receiver import Receiver
from tests.redis.stack import Replica, auth, write_tenant
from tests.servers import RedisServer

PRICES = BillingSettings(currency="EUR", per_call=0.5, per_cpu_second=2.0, per_gb=4.0)
SECRET = b"billing-secret-for-redis-tests"
FAST = ExportPolicy(grace=0.0, interval=0.02, base_delay=0.01, max_delay=0.05, timeout=5)
NOW = time.time()
HOURS = [hour_of(NOW) - k * HOUR for k in (3, 2, 1)]  # finished hours, within retention

# (hours ago, service, operation, user, status, wall, cpu, bytes in, bytes out, queue);
# binary fractions, so sums are exact in any order and both stores agree to the bit.
CALLS = [
    (3, "orders", "create", "alice", 200, 0.5, 0.25, 100, 900, 0.125),
    (3, "orders", "create", "alice", 500, 0.25, 0.125, 100, 100, 0.0),
    (3, "hello", None, "bob", 200, 1.0, 0.5, 0, 0, 0.0),
    (1, "orders", "get", "dee(ops)*,x|y", 504, 2.0, 0.0, 10, 20, 0.5),
    (1, "hello", None, "alice", 200, 0.125, 0.0625, 3, 4, 0.0),
    # An hour ahead, not the current one: a suite that crosses the hour while it runs
    # would otherwise see this hour finish (and sent) between collection and the test.
    (-1, "orders", "create", "bob", 200, 0.5, 0.25, 1, 2, 0.0),
]


@pytest.fixture
def client(redis_server) -> Iterator[redis.Redis]:
    """A client on database 1 (the replicas of the end-to-end test use 0), emptied."""
    c = connect(redis_server.url[:-1] + "1")
    c.flushdb()
    yield c
    c.flushdb()


def record_all(store, tenant: str = "acme") -> None:
    for ago, *call in CALLS:
        meter = UsageMeter(store, tenant, clock=lambda ago=ago: NOW - ago * HOUR)
        service, operation, user, status, wall, cpu, b_in, b_out, queue = call
        meter.record(service, operation, user, status, wall, cpu, b_in, b_out, queue)
        assert meter.flush() == 1
        meter.close()


def test_flush_and_query_answer_as_sqlite_does(client, tmp_path: Path) -> None:
    shared, local = RedisUsageStore(client), UsageStore(tmp_path / "usage.db")
    record_all(shared)
    record_all(local)
    hour = hour_of(NOW - 3 * HOUR)
    for group_by in [("service", "operation"), ("user",), ("hour", "service"),
                     ("service", "operation", "user", "hour"), ()]:
        assert shared.query("acme", PRICES, group_by=group_by) == \
            local.query("acme", PRICES, group_by=group_by), group_by
    for start, end in [(NOW - 2 * HOUR, None), (None, NOW - HOUR), (hour + 5, hour + HOUR)]:
        assert shared.query("acme", PRICES, start, end) == local.query("acme", PRICES, start, end)
        assert shared.hourly("acme", PRICES, start, end) == \
            local.hourly("acme", PRICES, start, end)
    assert shared.hour_rows("acme", hour) == local.hour_rows("acme", hour)
    assert shared.query("other", PRICES) == [] and shared.hourly("other", PRICES) == []


def test_group_by_and_cost(client) -> None:
    store = RedisUsageStore(client)
    record_all(store)
    by_user = {r["user"]: r for r in store.query("acme", PRICES, group_by=("user",))}
    assert list(by_user) == ["alice", "bob", "dee(ops)*,x|y"]  # sorted, any character
    alice = by_user["alice"]
    assert (alice["calls"], alice["errors"], alice["service"]) == (3, 1, None)
    # 3 calls * 0.5 + (0.25 + 0.125 + 0.0625) CPU-s * 2.0 + 1207 bytes / 1e9 * 4.0
    assert alice["cost"] == pytest.approx(1.5 + 0.875 + 1207e-9 * 4)
    assert by_user["dee(ops)*,x|y"]["errors"] == 1  # 504 is an error
    hours = store.hourly("acme", PRICES)
    # 3, 2 and 1 hours ago, then the current hour and the next: gaps are there, with zeros.
    assert [h.calls for h in hours] == [3, 0, 2, 0, 1]
    assert store.hour_rows("acme", HOURS[0])[0] == ("hello", "", "bob", 1, 0, 1.0, 0.5, 0,
                                                     0, 0.0)


@pytest.fixture
def meters(client) -> Iterator[Callable[..., UsageMeter]]:
    """UsageMeter, closed (thread stopped, last flush) before the database is emptied.

    A meter left running flushes what it kept on its own a second later, into
    whatever test then uses the database.
    """
    made: list[UsageMeter] = []

    def make(*args, **kwargs) -> UsageMeter:
        made.append(UsageMeter(*args, **kwargs))
        return made[-1]

    yield make
    for meter in made:
        meter.close()


def test_replicas_add_into_the_same_buckets(client, meters) -> None:
    a, b = RedisUsageStore(client), RedisUsageStore(connect(_url(client)))
    for store in (a, b, a):
        meter = meters(store, "acme")
        meter.record("orders", "create", "alice", 200, 0.5, 0.25, 1, 2)
        meter.flush()
    for store in (a, b):
        (row,) = store.query("acme", PRICES)
        assert (row["calls"], row["wall_seconds"], row["bytes_out"]) == (3, 1.5, 6)
    assert a.store_id == b.store_id  # one webhook source for every replica


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def test_counts_are_kept_through_an_outage(tmp_path: Path, caplog) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisUsageStore(connect(server.url))
        meter = UsageMeter(store, "acme")
        meter.record("orders", "create", "alice", 200, 0.5, 0.25, 1, 2)
        server.stop()  # no persistence: nothing flushed before this would survive anyway
        caplog.set_level(logging.WARNING, "mtp.usage")
        assert meter.flush() == 0
        meter.record("orders", "create", "alice", 500, 0.5, 0.25, 1, 2)
        assert meter.flush() == 0 and meter.flush() == 0
        with pytest.raises(UsageUnavailable) as err:
            store.query("acme", PRICES)
        assert err.value.status == 503
        failed = [r for r in caplog.records if "usage flush failed" in r.getMessage()]
        assert len(failed) == 1  # once per transition, not once per flush
        server.start()
        assert meter.flush() == 1
        (row,) = store.query("acme", PRICES)
        assert (row["calls"], row["errors"], row["bytes_in"]) == (2, 1, 2)
        assert any("works again" in r.getMessage() for r in caplog.records)
        meter.close()
    finally:
        server.stop()


class LostReply:
    """A client whose next MULTI/EXEC is applied but whose reply never arrives."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.armed = True

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def pipeline(self, transaction: bool = True):
        pipe = self.client.pipeline(transaction=transaction)
        if transaction and self.armed:
            self.armed = False
            execute = pipe.execute

            def lost() -> None:
                execute()
                raise redis.exceptions.TimeoutError("reply lost")

            pipe.execute = lost  # type: ignore[method-assign]
        return pipe


def test_a_batch_whose_reply_was_lost_is_not_counted_twice(client, meters) -> None:
    store = RedisUsageStore(LostReply(client))  # type: ignore[arg-type]
    meter = meters(store, "acme")
    meter.record("orders", "create", "alice", 200, 0.5, 0.25, 1, 2)
    meter.record("hello", None, "bob", 200, 0.5, 0.25, 1, 2)
    assert meter.flush() == 0  # applied, but it cannot know
    meter.record("orders", "create", "alice", 200, 0.5, 0.25, 1, 2)
    meter.record("fresh", None, "carol", 200, 0.5, 0.25, 1, 2)
    meter.flush()  # the lost batch had been written: only the new calls are added
    rows = store.query("acme", PRICES)
    assert [(r["service"], r["calls"], r["wall_seconds"]) for r in rows] == [
        ("fresh", 1, 0.5), ("hello", 1, 0.5), ("orders", 2, 1.0)]


def test_a_forked_child_does_not_settle_its_parents_batch(client, meters) -> None:
    store = RedisUsageStore(LostReply(client))  # type: ignore[arg-type]
    meter = meters(store, "acme")
    meter.record("orders", "create", "alice", 200, 0.5, 0.25, 1, 2)
    assert meter.flush() == 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves through os._exit
        os._exit(0 if store._unsure is None else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert store._unsure is not None  # still the parent's to settle


def test_open_store_follows_the_settings(tmp_path: Path, redis_server) -> None:
    env = {"MTP_DATA_DIR": str(tmp_path)}
    assert isinstance(open_store(Settings.from_env(env)), UsageStore)
    shared = open_store(Settings.from_env({**env, "MTP_REDIS_URL": redis_server.url}))
    assert isinstance(shared, RedisUsageStore)
    secretless = BillingSettings(webhook_url="http://127.0.0.1:9/billing")
    assert start_exporter(shared, "acme", secretless, "") is None
    exporter = start_exporter(shared, "acme", secretless, "s", FAST)
    local = start_exporter(UsageStore(tmp_path / "u.db"), "acme", secretless, "s", FAST)
    try:
        assert type(exporter) is RedisWebhookExporter and type(local) is WebhookExporter
    finally:
        exporter.stop()
        local.stop()


# -- the billing webhook over Redis ------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.stop()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def billing(url: str) -> BillingSettings:
    return BillingSettings(currency="EUR", per_call=0.5, per_cpu_second=2.0, webhook_url=url)


def test_one_exporter_of_all_replicas_sends_each_hour_once(client, receiver) -> None:
    store = RedisUsageStore(client)
    record_all(store)
    receiver.fail_first = 3
    a = RedisWebhookExporter(store, "acme", billing(receiver.url), SECRET, FAST).start()
    b = RedisWebhookExporter(RedisUsageStore(connect(_url(client))), "acme",
                             billing(receiver.url), SECRET, FAST).start()
    try:
        wait_for(lambda: len(receiver.accepted) == 2)  # the hours 3 and 1 ago
        # A late flush into a sent hour does not send it again (its key was used).
        late = UsageMeter(store, "acme", clock=lambda: HOURS[0] + 5)
        late.record("hello", None, "carol", 200, 0.1, 0.0, 0, 0)
        late.close()
        time.sleep(0.2)
    finally:
        a.stop()
        b.stop()
    source = store.store_id[:12]
    keys = [idempotency_key("acme", h, source) for h in (HOURS[0], HOURS[2])]
    assert sorted(receiver.accepted) == sorted(keys)
    assert all(receiver.deliveries[k] == 1 for k in keys)
    assert receiver.requests == 3 + 2 and a.source == b.source == source
    first = receiver.accepted[keys[0]]
    assert first["totals"]["calls"] == 3 and first["totals"]["errors"] == 1
    assert first["totals"]["cost"] == pytest.approx(3 * 0.5 + 0.875 * 2.0)
    status = a.status()
    assert [(s["hour"], s["state"]) for s in status] == [
        (iso_hour(HOURS[2]), "sent"), (iso_hour(HOURS[0]), "sent")]
    assert sum(s["attempts"] for s in status) == 2 + 3  # three failed attempts on the way


def test_lease_is_shared_and_handed_over(client, receiver) -> None:
    store = RedisUsageStore(client)
    a = RedisWebhookExporter(store, "acme", billing(receiver.url), SECRET, FAST)
    b = RedisWebhookExporter(store, "acme", billing(receiver.url), SECRET, FAST)
    assert a.acquire_lease() and a.acquire_lease() and not b.acquire_lease()
    a.stop()  # hands over at once
    assert b.acquire_lease()
    b.stop()


def test_exporter_rides_out_a_redis_outage(tmp_path: Path, receiver, caplog) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = RedisUsageStore(connect(server.url))
        exporter = RedisWebhookExporter(store, "acme", billing(receiver.url), SECRET, FAST)
        server.stop()
        caplog.set_level(logging.WARNING, "mtp.usage")
        assert exporter.run_once() == 0 and exporter.run_once() == 0
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
        server.start()
        record_all(store)
        assert exporter.run_once() == 2 and len(receiver.accepted) == 2
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        server.stop()
        exporter.stop()  # the lease cannot be released now: it expires by itself
    finally:
        server.stop()


# -- mtp usage -------------------------------------------------------------------------


def test_mtp_usage_reads_redis(client, tmp_path: Path) -> None:
    record_all(RedisUsageStore(client))
    tenant = tmp_path / "tenant"
    tenant.mkdir()
    (tenant / "tenant.toml").write_text('[tenant]\nid = "acme"\n\n[billing]\nper_call = 0.5\n')
    env = {"MTP_TENANT_DIR": str(tenant), "MTP_DATA_DIR": str(tmp_path / "data"),
           "MTP_REDIS_URL": _url(client)}
    result = CliRunner().invoke(cli, ["usage", "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert sum(r["calls"] for r in rows) == len(CALLS)
    assert sum(r["cost"] for r in rows) == pytest.approx(0.5 * len(CALLS))
    down = {**env, "MTP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nobody there
    result = CliRunner().invoke(cli, ["usage"], env=down)
    assert result.exit_code == 1 and "unreachable" in result.output


# -- two complete replicas -------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(redis_server, tmp_path_factory) -> Iterator[tuple[Replica, Replica]]:
    root = tmp_path_factory.mktemp("usage-replicas")
    tenant = write_tenant(root, "rate = 10000\nburst = 10000")
    with open(tenant / "tenant.toml", "a") as toml:
        toml.write('\n[billing]\ncurrency = "EUR"\nper_call = 0.25\n')
    a = Replica("a", root, tenant, redis_server.url).launch()
    b = Replica("b", root, tenant, redis_server.url).launch()
    try:
        yield a.ready(), b.ready()
    finally:
        a.stop()
        b.stop()


def usage_by_service(replica: Replica) -> dict[str, tuple[int, int, float]]:
    reply = replica.call("GET", "/usage?group_by=service", auth("root", ("admin",)))
    assert reply.status == 200, reply.body
    return {r["service"]: (r["calls"], r["errors"], r["cost"]) for r in reply.json()["rows"]}


def test_usage_on_either_replica_shows_both(replicas) -> None:
    a, b = replicas
    for replica, user, n in ((a, "alice", 3), (b, "bob", 2)):
        for i in range(n):
            assert replica.call("POST", "/services/echo", auth(user), {"i": i}).status == 200
    assert b.call("POST", "/services/broken", auth("bob"), {}).status == 500
    queued = a.call("POST", "/services/echo", {**auth("carol"), "Prefer": "respond-async"},
                    {"job": True})
    assert queued.status == 202  # run by an `mtp worker` process, metered there
    want = {"echo": (6, 0, 1.5), "broken": (1, 1, 0.25)}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        seen = [usage_by_service(a), usage_by_service(b)]
        if all(s == want for s in seen):
            break
        time.sleep(0.2)
    assert seen == [want, want]
    assert a.call("GET", "/usage", auth("alice")).status == 403
