"""Data planes obey the registry: a real `mtp run` beside a real `mtp control`.

On Redis (the fleet's shared store) and on one machine's SQLite (the same
MTP_DATA_DIR): unknown tenant 403 unknown-tenant, suspended and offboarding 403
tenant-suspended, resumed served again, entitlements and limits from the plan.
Without a registry in the store the tenant image behaves as it always did.
Usage (GET /usage and the hourly billing webhook) is priced at the plan only, and
waits (503, retried hours) while the registry cannot be read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framework.control.store import DB_NAME
from framework.control.store import PLANS as PLANS_KEY
from framework.usage import HOUR, UsageMeter, UsageStore, hour_of, iso_hour
from framework.usage_redis import RedisUsageStore, prefix
from framework.usage_redis import connect as connect_usage
from tests.control.fleet import ControlPlane
from tests.helpers import eventually as wait_until
from tests.ops.receiver import Receiver
from tests.redis.stack import Replica, Reply, auth, write_tenant
from tests.servers import RedisServer

PLANS = """
[plans.std]
isolation = "dedicated"
services = ["*"]
limits = { rate = 1000, burst = 1000 }
prices = { currency = "USD", per_call = 0.5 }

[plans.echo-only]
isolation = "dedicated"
services = ["echo", "rep*"]

[plans.tiny]
isolation = "dedicated"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_quota = 2 }

[plans.cpu]
isolation = "dedicated"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_cpu_seconds = 0.2 }

[plans.slow]
isolation = "dedicated"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_quota = 2, degraded_rate = 1 }
"""



def echo(replica: Replica) -> Reply:
    return replica.call("POST", "/services/echo", auth(), {"x": 1})


def kind(reply: Reply) -> str:
    if reply.status < 400:
        return str(reply.status)
    return f"{reply.status} {reply.json()['type'].rsplit(':', 1)[-1]}"


def start_replica(replica: Replica, timeout: float = 40.0) -> Replica:
    """Start `mtp run` and wait for /readyz (without Redis there is no worker to wait for)."""
    replica.launch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert replica.proc is not None and replica.proc.poll() is None, \
            replica.log.read_text()[-3000:]
        try:
            if replica.call("GET", "/readyz").status == 200:
                return replica
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(replica.log.read_text()[-3000:])


@pytest.fixture(params=["redis", "sqlite"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Replica, ControlPlane]]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    if url:  # a fresh database per test: a registry of an earlier test is not this one's
        from redis import Redis

        Redis.from_url(url).flushdb()
    tdir = write_tenant(tmp_path, "rate = 1000\nburst = 1000")
    replica = Replica("acme", tmp_path, tdir, url)
    cp = ControlPlane(tmp_path / "control", redis_url=url, plans=PLANS,
                      extra_env={"MTP_DATA_DIR": str(tmp_path / "acme-data")})
    try:
        yield replica, cp
    finally:
        replica.stop()
        cp.stop()


def test_the_registry_decides_who_is_served(fleet: tuple[Replica, ControlPlane]) -> None:
    replica, cp = fleet
    start_replica(replica)
    assert echo(replica).status == 200  # no registry in the store: served as today
    cp.start()  # now the store holds a registry, and acme is not in it
    wait_until(lambda: kind(echo(replica)) == "403 unknown-tenant")
    doc = echo(replica).json()
    assert doc["request_id"] and "Traceback" not in str(doc)
    assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                              "plan": "std"}).status == 201
    wait_until(lambda: echo(replica).status == 200)
    assert cp.call("PATCH", "/admin/tenants/acme", {"status": "suspended"}).status == 200
    wait_until(lambda: kind(echo(replica)) == "403 tenant-suspended")
    # Refused before anything runs: also async calls and the job routes.
    assert kind(replica.call("POST", "/services/echo?mode=async", auth(), {})) == \
        "403 tenant-suspended"
    assert replica.call("GET", "/healthz").status == 200  # liveness needs no tenant
    assert cp.call("PATCH", "/admin/tenants/acme", {"status": "active"}).status == 200
    wait_until(lambda: echo(replica).status == 200)
    # Usage is charged at the plan's prices, not tenant.toml's (none: EUR 0).
    report = replica.call("GET", "/usage", auth(roles=("admin",))).json()
    assert report["currency"] == "USD"
    calls = sum(r["calls"] for r in report["rows"])
    assert calls >= 3 and sum(r["cost"] for r in report["rows"]) == pytest.approx(0.5 * calls)
    assert cp.call("DELETE", "/admin/tenants/acme").status == 202
    wait_until(lambda: kind(echo(replica)) == "403 tenant-suspended")
    audit = replica.root / "acme-audit.log"  # flushed every 0.2 s
    wait_until(lambda: "tenant acme is suspended or offboarding" in audit.read_text())


def test_plan_entitlements_and_limits_apply(fleet: tuple[Replica, ControlPlane]) -> None:
    replica, cp = fleet
    cp.start()
    assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                              "plan": "echo-only"}).status == 201
    start_replica(replica)
    wait_until(lambda: echo(replica).status == 200)
    refused = replica.call("POST", "/services/sleepy", auth(), {"s": 0})
    assert kind(refused) == "403 not-entitled"
    listed = replica.call("GET", "/services", auth())
    assert listed.status == 200  # not a service call: no entitlement check
    # tenant.toml allows 1000/s with no daily quota; the plan's quota of 2 wins.
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "tiny"}).status == 200
    wait_until(lambda: replica.call("POST", "/services/sleepy", auth(), {"s": 0}).status != 403)
    statuses = [echo(replica).status for _ in range(4)]
    assert statuses[-1] == 429 and statuses.count(200) <= 2
    assert int(echo(replica).headers["Retry-After"]) > 1  # until midnight UTC
    # Degradation rather than denial: the same used-up quota, a plan with degraded_rate.
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "slow"}).status == 200
    wait_until(lambda: echo(replica).headers.get("X-Quota-Degraded") == "true")
    burst = [echo(replica) for _ in range(10)]
    served = [r for r in burst if r.status == 200]
    assert all(r.headers["X-Quota-Degraded"] == "true" for r in burst)
    assert any(r.status == 429 for r in burst)  # faster than 1/s is refused
    assert all(r.status in (200, 429) for r in burst) and served


BURN = '''"""Burn about 0.1 s of CPU."""
import time


def handle(context):
    end = time.process_time() + 0.1
    n = 0
    while time.process_time() < end:
        n += 1
    return {"n": n}
'''


def test_daily_cpu_seconds_caps_handler_cpu(fleet: tuple[Replica, ControlPlane]) -> None:
    replica, cp = fleet
    (replica.tenant_dir / "services" / "burn.py").write_text(BURN)
    cp.start()
    assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                              "plan": "cpu"}).status == 201
    start_replica(replica)
    wait_until(lambda: echo(replica).status == 200)
    for _ in range(3):  # 0.3 s of handler CPU against a cap of 0.2 s
        assert replica.call("POST", "/services/burn", auth(), {}).status == 200
    # Usage is flushed each second and read by the sidecar every two: then refused.
    wait_until(lambda: echo(replica).status == 429, timeout=20)
    refused = echo(replica)
    assert refused.json()["type"].endswith("too-many-requests")
    assert int(refused.headers["Retry-After"]) > 1  # until midnight UTC
    # A plan without the cap: served again.
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "std"}).status == 200
    wait_until(lambda: echo(replica).status == 200)


def test_two_tenant_stacks_one_suspended_the_other_untouched(redis_server,
                                                             tmp_path: Path) -> None:
    import jwt
    from redis import Redis

    from tests.redis.stack import JWT_SECRET

    Redis.from_url(redis_server.url).flushdb()
    acme = Replica("acme", tmp_path, write_tenant(tmp_path / "a", "rate = 1000\nburst = 1000"),
                   redis_server.url)
    beta_dir = write_tenant(tmp_path / "b", "rate = 1000\nburst = 1000")
    toml = beta_dir / "tenant.toml"
    toml.write_text(toml.read_text().replace('id = "acme"', 'id = "beta"'))
    beta = Replica("beta", tmp_path, beta_dir, redis_server.url)
    beta_token = jwt.encode({"sub": "bob", "tenant_id": "beta", "exp": int(time.time()) + 600},
                            JWT_SECRET, algorithm="HS256")
    beta_auth = {"Authorization": f"Bearer {beta_token}", "Content-Type": "application/json"}

    def beta_echo() -> Reply:
        return beta.call("POST", "/services/echo", beta_auth, {"x": 1})

    cp = ControlPlane(tmp_path / "control", redis_url=redis_server.url, plans=PLANS)
    try:
        cp.start()
        for tid in ("acme", "beta"):
            assert cp.call("POST", "/admin/tenants", {"id": tid, "name": tid,
                                                      "plan": "std"}).status == 201
        start_replica(acme)
        start_replica(beta)
        wait_until(lambda: echo(acme).status == 200 and beta_echo().status == 200)
        assert beta.call("POST", "/services/echo", auth(), {}).status == 403  # acme's token
        assert cp.call("PATCH", "/admin/tenants/acme", {"status": "suspended"}).status == 200
        wait_until(lambda: kind(echo(acme)) == "403 tenant-suspended")
        assert [beta_echo().status for _ in range(5)] == [200] * 5
        assert cp.call("DELETE", "/admin/tenants/acme").status == 202
        cp.wait_offboarded("acme")
        assert kind(echo(acme)) == "403 tenant-suspended"
        assert beta_echo().status == 200
        assert cp.call("GET", "/admin/tenants/beta").json()["usage"]["calls"] >= 6
    finally:
        acme.stop()
        beta.stop()
        cp.stop()


# -- prices from the plan only: GET /usage and the hourly billing webhook ----------------

BILLING_SECRET = "billing-secret-for-fleet-webhook-tests"
OWN_BILLING = """
[billing]
currency = "XYZ"
per_call = 1000.0
per_cpu_second = 1000.0
per_gb = 1000.0
webhook_url = "{url}"
"""


def bill_itself(replica: Replica, receiver: Receiver) -> None:
    """acme's tenant.toml would charge 1000 XYZ per call, sent to its own receiver."""
    toml = replica.tenant_dir / "tenant.toml"
    toml.write_text(toml.read_text() + OWN_BILLING.format(url=receiver.url))
    replica.extra_env = {**(replica.extra_env or {}), "MTP_BILLING_SECRET": BILLING_SECRET}


def seed_finished_hours(store: Any) -> list[int]:
    """acme's usage in three finished hours (2, 3, 4 calls): the exporter's first work."""
    hours = [hour_of(time.time()) - k * HOUR for k in (7, 6, 5)]
    for i, hour in enumerate(hours):
        meter = UsageMeter(store, "acme", clock=lambda h=hour: h + 5)
        for _ in range(i + 2):
            meter.record("echo", None, "alice", 200, 0.1, 0.25, 10, 20)
        assert meter.flush() == 1
        meter.close()
    return hours


def assert_std_prices(receiver: Receiver, hours: list[int]) -> None:
    """Each hour arrived, verified by standardwebhooks, at std's USD 0.5 per call."""
    docs = {d["hour"]: d for d in receiver.accepted.values()}
    assert sorted(docs) == [iso_hour(h) for h in hours] and receiver.bad_signatures == 0
    for doc in docs.values():
        assert doc["currency"] == "USD" and "XYZ" not in json.dumps(doc)
        for row in [*doc["rows"], doc["totals"]]:
            assert row["cost"] == pytest.approx(0.5 * row["calls"])
    assert [docs[iso_hour(h)]["totals"]["calls"] for h in hours] == [2, 3, 4]


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 503 and reply.headers["Content-Type"] == "application/problem+json"
    doc = reply.json()
    assert doc["type"].endswith("registry-unavailable") and doc["request_id"]
    assert "XYZ" not in reply.body.decode() and "Traceback" not in reply.body.decode()


def export_attempts(replica: Replica, hours: list[int]) -> list[tuple[str, int, str]]:
    """(state, attempts, last_error) of each hour, from the usage store the exporter uses."""
    if replica.redis_url:
        from redis import Redis

        with Redis.from_url(replica.redis_url, decode_responses=True) as r:
            found = [r.hmget(f"{prefix('acme')}:export:{h}", "state", "attempts", "last_error")
                     for h in hours]
        return [(s or "", int(a or 0), e or "") for s, a, e in found]
    db = replica.root / "acme-data" / "usage.db"
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = dict((h, (s, a, e)) for h, s, a, e in conn.execute(
            "SELECT hour, state, attempts, last_error FROM webhook_exports"))
    return [rows.get(h, ("", 0, "")) for h in hours]


def test_the_webhook_and_usage_are_priced_by_the_plan_and_wait_for_the_registry(
        fleet: tuple[Replica, ControlPlane]) -> None:
    replica, cp = fleet
    receiver = Receiver(BILLING_SECRET.encode()).start()
    try:
        bill_itself(replica, receiver)
        cp.start()
        assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                                  "plan": "std"}).status == 201
        cp.stop()  # the registry stays in the store; data planes need no control plane
        if replica.redis_url:
            from redis import Redis

            store: Any = RedisUsageStore(connect_usage(replica.redis_url))
            registry = Redis.from_url(replica.redis_url)
            good = registry.get(PLANS_KEY)
            registry.set(PLANS_KEY, b"{not json")  # the registry unreadable, the store up

            def repair() -> None:
                registry.set(PLANS_KEY, good)
        else:
            (replica.root / "acme-data").mkdir(exist_ok=True)
            store = UsageStore(replica.root / "acme-data" / "usage.db")
            fleet_db = replica.root / "acme-data" / DB_NAME  # the control plane's too
            with contextlib.closing(sqlite3.connect(fleet_db)) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file
            aside = fleet_db.with_name("fleet.db.aside")
            os.replace(fleet_db, aside)
            fleet_db.write_bytes(b"not an SQLite database " * 200)  # unreadable

            def repair() -> None:
                os.replace(aside, fleet_db)
        hours = seed_finished_hours(store)
        start_replica(replica)
        assert_unavailable(replica.call("GET", "/usage", auth(roles=("admin",))))
        # The exporter tries, has no prices, sends nothing and retries with its backoff.
        wait_until(lambda: any(a >= 2 for _, a, _ in export_attempts(replica, hours)),
                   timeout=30)
        states = export_attempts(replica, hours)
        assert all(s == "retry" and e.startswith("prices unavailable") for s, _, e in states
                   if s), states
        assert receiver.requests == 0
        repair()
        wait_until(lambda: len(receiver.accepted) == len(hours), timeout=40)
        assert_std_prices(receiver, hours)
        report = replica.call("GET", "/usage", auth(roles=("admin",)))
        assert report.status == 200 and report.json()["currency"] == "USD"
        # One line per process and outage, not one per attempt (a worker and `mtp worker`).
        log = replica.log.read_text(errors="replace")
        assert 1 <= log.count("dependency fleet_registry is down") <= 2, log[-3000:]
    finally:
        receiver.stop()


def test_the_webhook_waits_out_a_stopped_redis_and_sends_at_the_plans_prices(
        tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", persist=True)  # the registry survives a restart
    redis.start()
    receiver = Receiver(BILLING_SECRET.encode(), fail_first=10**6).start()  # refuses until told
    replica = Replica("acme", tmp_path, write_tenant(tmp_path, "rate = 1000\nburst = 1000"),
                      redis.url)
    cp = ControlPlane(tmp_path / "control", redis_url=redis.url, plans=PLANS)
    try:
        bill_itself(replica, receiver)
        cp.start()
        assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme",
                                                  "plan": "std"}).status == 201
        cp.stop()
        hours = seed_finished_hours(RedisUsageStore(connect_usage(redis.url)))
        start_replica(replica)
        wait_until(lambda: receiver.requests >= 1, timeout=30)  # hours pending, not sent
        redis.stop()  # the fleet's Redis (registry and usage) is gone
        assert_unavailable(replica.call("GET", "/usage", auth(roles=("admin",))))
        receiver.fail_first = 0
        redis.start()
        wait_until(lambda: len(receiver.accepted) == len(hours), timeout=60)
        assert_std_prices(receiver, hours)
    finally:
        replica.stop()
        cp.stop()
        redis.stop()
        receiver.stop()
