"""The sidecar's fleet gate and the registry view, against real stores (no servers of ours)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from framework.control.plans import Plan
from framework.control.registry_view import RedisView, RegistryView, SqliteView, open_view
from framework.control.store import (
    SqliteRegistry,
    TenantRecord,
    iso_now,
    open_registry,
)
from framework.tenant_config import LimitSettings
from sidecar.errors import Forbidden
from sidecar.fleet import FleetGate, effective_limits, lower
from tests.servers import RedisServer

PLANS = {"version": 1, "plans": {
    "basic": {"isolation": "shared", "services": ["echo", "rep*"],
              "limits": {"rate": 5, "daily_quota": 100, "concurrency": 0},
              "prices": {"currency": "EUR", "per_call": 0.1}},
}}


def record(tid: str, status: str = "active", plan: str = "basic") -> TenantRecord:
    now = iso_now()
    return TenantRecord(tid, tid, plan, status, "dedicated", now, now)


def view_with(tenants: dict[str, tuple[str, str]]) -> RegistryView:
    view = RegistryView()
    view._apply_plans(PLANS)
    view.tenants = dict(tenants)
    return view


def test_without_a_registry_nothing_is_refused() -> None:
    gate = FleetGate(RegistryView())
    gate.admit("anyone")
    gate.entitle("anyone", "whatever")
    own = LimitSettings(rate=50)
    assert gate.limits("anyone", own) is own


def test_a_dedicated_stack_stops_serving_a_tenant_the_operator_placed_in_a_pool() -> None:
    from sidecar.fleet import UnknownTenant

    plan = next(iter(PLANS["plans"]))
    view = view_with({t: ("active", plan) for t in ("a", "b", "c", "d", "e", "f")})
    default = view.plans[plan].default_placement
    view.placements = {
        "a": ("dedicated", ""),  # placed here
        "b": (default, ""),  # nobody chose a placement: the plan's default
        "c": ("pool:alpha", "dedicated"),  # moving away from here: drains
        "d": ("dedicated", "pool:alpha"),  # moving here: warming
        "e": ("pool:alpha", ""),  # moved away, the migration over
    }  # f: no placement known (an older record)
    dedicated, pool = FleetGate(view, dedicated=True), FleetGate(view)
    for tenant in "abcdf":
        dedicated.admit(tenant)
    with pytest.raises(UnknownTenant) as refused:
        dedicated.admit("e")
    assert refused.value.status == 403 and "placed in a pool" in str(refused.value)
    for tenant in "abcdef":  # a pool places tenants by the registry in its own way
        pool.admit(tenant)


@pytest.mark.parametrize(("status", "kind"), [
    ("suspended", "tenant-suspended"), ("offboarding", "tenant-suspended")])
def test_refusals_carry_their_problem_kind(status: str, kind: str) -> None:
    gate = FleetGate(view_with({"acme": (status, "basic"), "ok": ("active", "basic")}))
    with pytest.raises(Forbidden) as err:
        gate.admit("acme")
    assert err.value.kind == kind and err.value.status == 403
    with pytest.raises(Forbidden) as err:
        gate.admit("stranger")
    assert err.value.kind == "unknown-tenant"
    gate.admit("ok")


def test_entitlements_are_the_plans_globs() -> None:
    gate = FleetGate(view_with({"acme": ("active", "basic"), "odd": ("active", "gone")}))
    gate.entitle("acme", "echo")
    gate.entitle("acme", "report")
    with pytest.raises(Forbidden) as err:
        gate.entitle("acme", "billing")
    assert err.value.kind == "not-entitled"
    gate.entitle("odd", "billing")  # a plan not published (yet): tenant.toml decides


def test_each_limit_is_the_lower_one() -> None:
    assert lower("rate", 100.0, 5) == 5 and lower("rate", 2.0, 5) == 2.0
    assert lower("daily_quota", 0, 100) == 100  # 0 is "none": the plan's applies
    assert lower("daily_quota", 50, 0) == 50
    assert lower("concurrency", 3, None) == 3
    plan = Plan("p", "shared", ("*",), {"rate": 5, "burst": 3, "daily_quota": 100})
    got = effective_limits(LimitSettings(rate=100, burst=100, daily_quota=0, delay=False), plan)
    assert (got.rate, got.burst, got.daily_quota, got.delay) == (5, 3, 100, False)
    assert isinstance(got.burst, int) and isinstance(got.rate, float)
    gate = FleetGate(view_with({"acme": ("active", "basic")}))
    own = LimitSettings(rate=100, daily_quota=1000)
    first = gate.limits("acme", own)
    assert (first.rate, first.daily_quota) == (5, 100) and gate.limits("acme", own) is first


def wait(view: RegistryView, check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check(view):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sqlite_view_follows_the_registry(tmp_path: Path) -> None:
    view = SqliteView(tmp_path).start()
    try:
        time.sleep(0.1)
        assert not view.fleet and view.refusal("acme") is None  # no fleet.db: no fleet
        reg = open_registry("", tmp_path)
        assert isinstance(reg, SqliteRegistry)
        reg.put_plans(PLANS)
        reg.create(record("acme"))
        wait(view, lambda v: v.fleet and v.refusal("acme") is None)
        assert view.refusal("other") == "unknown-tenant"
        reg.update("acme", {"status": "suspended"})
        wait(view, lambda v: v.refusal("acme") == "tenant-suspended")
        assert view.plan_of("acme").name == "basic"
        reg.close()
    finally:
        view.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_an_opened_view_has_read_the_registry_before_anything_is_served(
        tmp_path: Path, store: str) -> None:
    """open_view returns after the first read: a data plane (or pool) starting never
    serves, even for a moment, a tenant the registry already refuses."""
    server = RedisServer(tmp_path / "redis") if store == "redis" else None
    if server is not None:
        server.start()
    url = server.url if server is not None else ""
    try:
        reg = open_registry(url, tmp_path)
        reg.put_plans(PLANS)
        reg.create(record("acme", status="suspended"))
        for tenant in ("", "acme"):  # every record (pools), one tenant's (a dedicated stack)
            view = open_view(url, tmp_path, tenant) if url else open_view(url, tmp_path)
            try:
                assert view.settled.is_set()
                assert view.refusal("acme") == "tenant-suspended"  # no wait, no retry
            finally:
                view.close()
        reg.close()
    finally:
        if server is not None:
            server.stop()


def test_an_opened_view_of_an_unreachable_store_does_not_hold_the_start(
        tmp_path: Path) -> None:
    view = open_view("redis://127.0.0.1:1/0", tmp_path)  # nothing listens on port 1
    try:
        assert view.settled.is_set() and not view.fleet  # as before: no copy to go by
    finally:
        view.close()


def test_redis_view_keeps_its_copy_through_an_outage(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    view = RedisView(server.url).start()
    try:
        reg = open_registry(server.url, tmp_path)
        reg.create(record("acme"))
        wait(view, lambda v: "acme" in v.tenants)
        assert not view.fleet  # records but no plans published: not a fleet yet
        reg.put_plans(PLANS)
        wait(view, lambda v: v.fleet)
        reg.update("acme", {"status": "suspended"})
        wait(view, lambda v: v.refusal("acme") == "tenant-suspended")
        server.stop()
        time.sleep(0.5)
        assert view.refusal("acme") == "tenant-suspended"  # the last copy stays in force
        server.start()  # an empty database: the view reconnects and resyncs
        reg2 = open_registry(server.url, tmp_path)
        reg2.put_plans(PLANS)
        reg2.create(record("acme"))
        wait(view, lambda v: v.refusal("acme") is None)
        reg2.close()
    finally:
        view.close()
        server.stop()


def test_a_tenants_redis_view_reads_its_own_record_on_its_acl_user(tmp_path: Path) -> None:
    """A dedicated data plane's view: its record's key, the plans, its channel; nothing
    of other tenants. Records from before their own keys are copied by the backfill."""
    from redis import Redis

    from framework.control.acl import set_user
    from framework.control.store import TENANTS

    server = RedisServer(tmp_path / "redis")
    server.start()
    admin = Redis.from_url(server.url, decode_responses=True)
    reg = open_registry(server.url, tmp_path)
    old = record("acme", status="suspended")
    admin.hset(TENANTS, "acme", json.dumps(old.as_dict()))  # written before per-tenant keys
    reg.create(record("beta"))
    user = set_user(admin, "acme")
    assert user is not None
    view = RedisView(user.url(server.url), "acme").start()
    try:
        reg.put_plans(PLANS)
        wait(view, lambda v: v.fleet)
        assert view.refusal("acme") == "unknown-tenant"  # its key is not there yet
        assert reg.backfill() == 1 and reg.backfill() == 0  # idempotent
        wait(view, lambda v: v.refusal("acme") == "tenant-suspended")  # read every second
        reg.update("acme", {"status": "active"})
        wait(view, lambda v: v.refusal("acme") is None)  # announced on its channel
        reg.update("beta", {"status": "suspended"})
        assert view.tenants == {"acme": ("active", "basic")}  # beta's is not its to read
        reg.put_plans({"version": 2, "plans": {**PLANS["plans"], "more": PLANS["plans"][
            "basic"]}})
        wait(view, lambda v: v.plans_version == 2)  # no channel of its: the read each second
    finally:
        view.close()
        reg.close()
        server.stop()


def test_a_view_its_user_may_not_read_refuses_every_call(tmp_path: Path) -> None:
    """A user without the registry's read rules (an older control plane made it): fail closed."""
    from redis import Redis

    server = RedisServer(tmp_path / "redis")
    server.start()
    admin = Redis.from_url(server.url, decode_responses=True)
    reg = open_registry(server.url, tmp_path)
    reg.put_plans(PLANS)
    reg.create(record("acme"))
    admin.execute_command("ACL", "SETUSER", "t-acme", "on", ">pw", "~mtp:acme:*",
                          "&mtp:acme:*", "+@all", "-@dangerous")
    url = server.url.replace("redis://", "redis://t-acme:pw@")
    view = RedisView(url, "acme").start()
    try:
        wait(view, lambda v: v.fleet)
        assert view.refusal("acme") == "unknown-tenant"
        from framework.control.acl import upgrade_users

        # A connection that may not run ACL (a managed Redis without it): logged, no change.
        assert upgrade_users(Redis.from_url(url), ["acme"]) == 0
        assert upgrade_users(admin, ["acme", "gone"]) == 1  # "gone" has no user
        wait(view, lambda v: v.refusal("acme") is None)  # same password, now it may read
    finally:
        view.close()
        reg.close()
        server.stop()


def test_fleet_present_looks_at_the_store(tmp_path: Path) -> None:
    from framework.control.tenant_check import fleet_present
    from tests.helpers import free_port

    assert not fleet_present("", tmp_path)
    assert not fleet_present(f"redis://127.0.0.1:{free_port()}/0", tmp_path)  # unreachable
    (tmp_path / "fleet.db").write_text("not a database")
    assert not fleet_present("", tmp_path)
    (tmp_path / "fleet.db").unlink()
    reg = open_registry("", tmp_path)
    assert not fleet_present("", tmp_path)  # a registry file, but no plans published
    reg.put_plans(PLANS)
    assert fleet_present("", tmp_path)
    reg.close()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        assert not fleet_present(server.url, tmp_path / "elsewhere")
        open_registry(server.url, tmp_path).put_plans(PLANS)
        assert fleet_present(server.url, tmp_path / "elsewhere")
    finally:
        server.stop()


def test_plan_prices_are_the_tenants_own_only_without_a_fleet(tmp_path: Path) -> None:
    from framework.control.tenant_check import PricesUnavailable, plan_prices
    from framework.tenant_config import parse_tenant

    own = parse_tenant({"tenant": {"id": "acme"},
                        "billing": {"currency": "GBP", "per_call": 9.0}}, "tenant.toml")
    assert plan_prices("", tmp_path, own) is own.billing  # no registry
    reg = open_registry("", tmp_path)
    reg.put_plans(PLANS)
    with pytest.raises(PricesUnavailable):  # a fleet, acme not registered: never GBP
        plan_prices("", tmp_path, own)
    reg.create(record("acme"))
    got = plan_prices("", tmp_path, own)
    assert (got.currency, got.per_call, got.per_gb) == ("EUR", 0.1, 0.0)
    reg.update("acme", {"plan": "gone"})
    with pytest.raises(PricesUnavailable):  # a plan no longer published
        plan_prices("", tmp_path, own)
    reg.close()
    (tmp_path / "fleet.db").write_bytes(b"garbage")
    with pytest.raises(PricesUnavailable):  # unreadable: fail closed
        plan_prices("", tmp_path, own)


def test_the_limits_cache_stays_small() -> None:
    gate = FleetGate(view_with({"acme": ("active", "basic")}))
    for i in range(200):  # e.g. many overlay changes over a long run
        assert gate.limits("acme", LimitSettings(rate=10 + i)).rate == 5
    assert len(gate._limits) <= 65


def test_past_the_quota_a_degraded_rate_slows_rather_than_refuses() -> None:
    import asyncio

    from sidecar.errors import RateLimited
    from sidecar.limiter import MemoryBackend
    from sidecar.ratelimit import QUOTA_DEGRADED, RateLimiter

    now = [0.0]
    rl = RateLimiter(MemoryBackend(), clock=lambda: now[0])
    limits = LimitSettings(rate=1000, burst=1000, daily_quota=2, degraded_rate=1.0)
    first = [asyncio.run(rl.admit(limits, "t", "u"))[0] for _ in range(2)]
    assert not any(QUOTA_DEGRADED in h for h in first)
    slowed = asyncio.run(rl.admit(limits, "t", "u"))[0]
    assert slowed[QUOTA_DEGRADED] == "true"  # over the quota, and still served
    asyncio.run(rl.admit(limits, "t", "u"))  # the one-request burst of the degraded rate
    with pytest.raises(RateLimited) as exc:  # faster than 1/s: 429, degraded
        asyncio.run(rl.admit(limits, "t", "u"))
    assert exc.value.headers[QUOTA_DEGRADED] == "true"
    assert exc.value.headers["Retry-After"] == "1"
    now[0] += 1.0
    assert asyncio.run(rl.admit(limits, "t", "u"))[0][QUOTA_DEGRADED] == "true"
    plan = Plan("p", "shared", ("*",), {"daily_quota": 2, "degraded_rate": 0.5})
    got = effective_limits(LimitSettings(daily_quota=10), plan)
    assert (got.daily_quota, got.degraded_rate) == (2, 0.5)  # the plan's, not the lower
    assert effective_limits(LimitSettings(), Plan("q", "shared", ("*",))).degraded_rate == 0.0


def test_cpu_watch_reads_todays_cpu_and_survives_a_broken_store(monkeypatch,
                                                                 tmp_path: Path) -> None:
    import sidecar.fleet as fleet_mod
    from framework.usage import UsageStore
    from sidecar.fleet import CpuWatch
    from tests.control.seed import usage_row

    monkeypatch.setattr(fleet_mod, "CPU_POLL", 0.01)
    view = view_with({"acme": ("active", "basic")})
    view._apply_plans({"version": 2, "plans": {"basic": {
        "isolation": "shared", "services": ["*"], "limits": {"daily_cpu_seconds": 1.0}}}})
    path = tmp_path / "usage.db"
    path.mkdir()  # a directory where the database should be: the store cannot be opened
    watch = CpuWatch(view, lambda _tenant: UsageStore(path))
    assert not watch.over("acme", view.plan_of("acme"))  # asked: read from now on
    watch.read({})  # a round by hand: the store fails, the reading stays as it was
    assert watch.used == {} and not watch.over("acme", view.plan_of("acme"))
    watch.start()
    try:
        path.rmdir()
        UsageStore(path).add([usage_row("acme", 3, cpu=1.5), usage_row("other", 3, cpu=9.0)])
        wait(view, lambda v: watch.used.get("acme") == 1.5)
        assert watch.over("acme", view.plan_of("acme"))
        gate = FleetGate(view, watch)
        assert gate.limits("acme", LimitSettings(daily_quota=100)).daily_quota == 1
    finally:
        watch.close()


def test_cpu_watch_reads_only_the_tenants_served_lately(monkeypatch, tmp_path: Path) -> None:
    import sidecar.fleet as fleet_mod
    from framework.usage import UsageStore
    from sidecar.fleet import CpuWatch
    from tests.control.seed import usage_row

    view = view_with({"acme": ("active", "capped"), "globex": ("active", "capped"),
                      "initech": ("active", "free")})
    view._apply_plans({"version": 2, "plans": {
        "capped": {"isolation": "process", "services": ["*"],
                   "limits": {"daily_cpu_seconds": 1.0}},
        "free": {"isolation": "process", "services": ["*"]}}})
    opened: list[str] = []

    def open_usage(tenant: str) -> UsageStore:  # a pool: each tenant's own store
        opened.append(tenant)
        store = UsageStore(tmp_path / tenant / "usage.db")
        return store

    for tenant, cpu in (("acme", 2.0), ("globex", 0.5), ("initech", 9.0)):
        UsageStore(tmp_path / tenant / "usage.db").add([usage_row(tenant, 3, cpu=cpu)])
    watch = CpuWatch(view, open_usage)  # rounds run by hand here
    stores: dict = {}
    watch.read(stores)
    assert opened == [] and watch.used == {}  # nobody asked yet: nothing read
    assert not watch.over("acme", view.plan_of("acme"))  # not read yet: served
    assert not watch.over("globex", view.plan_of("globex"))
    assert not watch.over("initech", view.plan_of("initech"))  # no cap: never read
    watch.read(stores)
    watch.read(stores)
    assert sorted(opened) == ["acme", "globex"]  # each store opened once, kept
    assert watch.used == {"acme": 2.0, "globex": 0.5}
    assert watch.over("acme", view.plan_of("acme"))
    assert not watch.over("globex", view.plan_of("globex"))
    # A tenant without requests for CPU_FORGET seconds is no longer read.
    monkeypatch.setattr(fleet_mod, "CPU_FORGET", -1.0)
    watch.read(stores)
    assert watch.used == {} and stores == {}
