"""In a fleet, usage is priced at the operator's plan only, never at the tenant's own
`[billing]`: the registry read by `PlanPrices` (GET /usage, `mtp usage`) and the hourly
billing webhook, on SQLite (`fleet.db` in the data dir) and on a real redis-server.

A registry that cannot be read fails closed: an error (503 for GET /usage), and the
webhook holds the hour back and sends it at the plan's prices once the registry is
readable again. Without a registry the tenant prices itself, as it always did.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from framework.cli import cli
from framework.control.plans import PlanSet, parse_plans
from framework.control.store import (
    DB_NAME,
    PLANS,
    RedisRegistry,
    SqliteRegistry,
    TenantRecord,
    connect_redis,
    iso_now,
)
from framework.control.tenant_check import PlanPrices, PricesUnavailable, plan_prices
from framework.tenant_config import TenantConfig, load_tenant
from framework.usage import HOUR, UsageMeter, UsageStore, hour_of
from framework.usage_redis import RedisUsageStore, RedisWebhookExporter
from framework.usage_redis import connect as connect_usage
from framework.webhook import ExportPolicy, WebhookExporter
from tests.helpers import eventually as wait_for
from tests.helpers import free_port
from tests.ops.receiver import Receiver

SECRET = b"billing-secret-for-fleet-price-tests"
FAST = ExportPolicy(grace=0.0, interval=0.02, base_delay=0.01, max_delay=0.05, timeout=5)
NOW = time.time()
HOURS = [hour_of(NOW) - k * HOUR for k in (3, 2, 1)]  # finished hours

PLANS_TOML = """
[plans.std]
isolation = "dedicated"
services = ["*"]
prices = { currency = "USD", per_call = 0.5, per_cpu_second = 2.0, per_gb = 1.0 }

[plans.free]
isolation = "shared"
services = ["*"]
"""


def tenant_toml(webhook_url: str = "http://127.0.0.1:1/billing") -> str:
    """A tenant that would charge 1000 XYZ per call if it priced itself."""
    return f"""
[tenant]
id = "acme"

[billing]
currency = "XYZ"
per_call = 1000.0
per_cpu_second = 1000.0
per_gb = 1000.0
webhook_url = "{webhook_url}"
"""


def make_tenant(tmp: Path, webhook_url: str = "http://127.0.0.1:1/billing") -> TenantConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tenant.toml").write_text(tenant_toml(webhook_url))
    return load_tenant(tmp / "tenant.toml")


def plans_doc() -> dict[str, Any]:
    plans = parse_plans(tomllib.loads(PLANS_TOML), "plans.toml")
    return PlanSet(plans, "test").as_dict()


def record(tenant_id: str = "acme", plan: str = "std") -> TenantRecord:
    now = iso_now()
    return TenantRecord(tenant_id, tenant_id, plan, "active", "dedicated", now, now)


@dataclass
class Fleet:
    """A registry and the usage store beside it (SQLite data dir, or one redis-server)."""

    kind: str
    redis_url: str
    data_dir: Path
    registry: Any
    usage: Any
    exporter_cls: type[WebhookExporter]

    def prices(self) -> PlanPrices:
        return PlanPrices(self.redis_url, self.data_dir)

    def publish(self, plan: str = "std") -> None:
        """What `mtp control` does: the plans in force, and acme on ``plan``."""
        self.registry.put_plans(plans_doc())
        self.registry.create(record(plan=plan))

    def break_registry(self) -> Callable[[], None]:
        """Make the registry unreadable (the store itself stays up); returns the repair."""
        if self.redis_url:
            client = self.registry.client
            good = client.get(PLANS)
            client.set(PLANS, "{not json")
            return lambda: client.set(PLANS, good)
        path = self.data_dir / DB_NAME
        # Everything into the main file first: pages still in the WAL would be read from it.
        self.registry._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        aside = path.with_name("fleet.db.aside")
        os.replace(path, aside)
        path.write_bytes(b"this is not an SQLite database" * 100)
        return lambda: os.replace(aside, path)


@pytest.fixture(params=["sqlite", "redis"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    data = tmp_path / "data"
    data.mkdir()
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        registry = RedisRegistry(connect_redis(url))
        registry.client.flushdb()
        yield Fleet("redis", url, data, registry, RedisUsageStore(connect_usage(url)),
                    RedisWebhookExporter)
    else:
        registry = SqliteRegistry(data / DB_NAME)
        yield Fleet("sqlite", "", data, registry, UsageStore(data / "usage.db"),
                    WebhookExporter)
    registry.close()


def seed_usage(store: Any) -> None:
    """Finished hours of acme: 2, 3 and 4 calls, CPU and bytes in each."""
    for i, hour in enumerate(HOURS):
        meter = UsageMeter(store, "acme", clock=lambda h=hour: h + 5)
        for _ in range(i + 2):
            meter.record("orders", "create", "alice", 200, 0.1, 0.25, 10, 20)
        assert meter.flush() == 1
        meter.close()


def assert_plan_priced(doc: dict[str, Any]) -> None:
    """Every row and the totals at std's USD 0.5/call, 2.0/CPU-second, 1.0/GB."""
    assert doc["currency"] == "USD"

    def cost(calls: float, cpu: float, nbytes: float) -> float:
        return calls * 0.5 + cpu * 2.0 + nbytes / 1e9 * 1.0

    for row in doc["rows"]:
        assert row["cost"] == pytest.approx(
            cost(row["calls"], row["cpu_seconds"], row["bytes_in"] + row["bytes_out"]))
    t = doc["totals"]
    assert t["calls"] > 0
    assert t["cost"] == pytest.approx(cost(t["calls"], t["cpu_seconds"],
                                           t["bytes_in"] + t["bytes_out"]))
    assert "XYZ" not in json.dumps(doc)


# -- the prices themselves ---------------------------------------------------------------


def test_without_a_registry_the_tenant_prices_itself(fleet: Fleet, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t")
    if fleet.kind == "sqlite":
        fleet.registry.close()
        (fleet.data_dir / DB_NAME).unlink()  # no fleet.db at all
    assert plan_prices(fleet.redis_url, fleet.data_dir, tenant) is tenant.billing


def test_in_a_fleet_the_plan_prices_and_the_webhook_stays_the_tenants(
        fleet: Fleet, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t", "https://billing.acme.test/hook")
    fleet.publish()
    prices = plan_prices(fleet.redis_url, fleet.data_dir, tenant)
    assert (prices.currency, prices.per_call, prices.per_cpu_second, prices.per_gb) == \
        ("USD", 0.5, 2.0, 1.0)
    assert prices.webhook_url == "https://billing.acme.test/hook"
    assert prices.webhook_secret_env == tenant.billing.webhook_secret_env
    # A plan without prices charges nothing, never the tenant's 1000 XYZ.
    fleet.registry.update("acme", {"plan": "free"})
    free = plan_prices(fleet.redis_url, fleet.data_dir, tenant)
    assert (free.currency, free.per_call, free.per_cpu_second, free.per_gb) == \
        ("EUR", 0.0, 0.0, 0.0)


def test_an_unreadable_registry_fails_closed(fleet: Fleet, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t")
    fleet.publish()
    repair = fleet.break_registry()
    with pytest.raises(PricesUnavailable) as caught:
        plan_prices(fleet.redis_url, fleet.data_dir, tenant)
    assert caught.value.status == 503 and "cannot be read" in caught.value.detail
    repair()
    assert plan_prices(fleet.redis_url, fleet.data_dir, tenant).currency == "USD"


def test_an_unreachable_redis_fails_closed(tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t")
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(PricesUnavailable, match="unreachable"):
        plan_prices(nobody, tmp_path, tenant)


def test_a_tenant_or_plan_missing_from_the_registry_fails_closed(
        fleet: Fleet, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t")
    fleet.registry.put_plans(plans_doc())  # a fleet, and acme not in it
    with pytest.raises(PricesUnavailable, match="not in the fleet's registry"):
        plan_prices(fleet.redis_url, fleet.data_dir, tenant)
    fleet.registry.create(record(plan="gone"))  # its plan was removed from the plans file
    with pytest.raises(PricesUnavailable, match="not in the plans in force"):
        plan_prices(fleet.redis_url, fleet.data_dir, tenant)


def test_a_registry_that_vanishes_after_it_was_seen_fails_closed(
        fleet: Fleet, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t")
    fleet.publish()
    prices = fleet.prices()
    assert prices(tenant).currency == "USD"
    if fleet.redis_url:
        fleet.registry.client.flushdb()
    else:
        fleet.registry.close()
        (fleet.data_dir / DB_NAME).unlink()
    with pytest.raises(PricesUnavailable, match="gone"):
        prices(tenant)


def test_mtp_usage_is_at_the_plans_prices_and_fails_closed(fleet: Fleet, tmp_path: Path) -> None:
    tdir = tmp_path / "t"
    make_tenant(tdir)
    seed_usage(fleet.usage)
    fleet.publish()
    env = {"MTP_TENANT_DIR": str(tdir), "MTP_DATA_DIR": str(fleet.data_dir),
           "MTP_REDIS_URL": fleet.redis_url}
    result = CliRunner().invoke(cli, ["usage", "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["currency"] == "USD"
    assert sum(r["cost"] for r in report["rows"]) == pytest.approx(
        sum(r["calls"] * 0.5 + r["cpu_seconds"] * 2.0 for r in report["rows"]), rel=1e-4)
    repair = fleet.break_registry()
    result = CliRunner().invoke(cli, ["usage"], env=env)
    assert result.exit_code == 1 and "registry cannot be read" in result.output
    assert "XYZ" not in result.output
    repair()


# -- the hourly billing webhook ----------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.stop()



def test_the_webhook_sends_every_hour_at_the_plans_prices(
        fleet: Fleet, receiver: Receiver, tmp_path: Path) -> None:
    tenant = make_tenant(tmp_path / "t", receiver.url)
    seed_usage(fleet.usage)
    fleet.publish()
    prices = fleet.prices()
    exporter = fleet.exporter_cls(fleet.usage, "acme", tenant.billing, SECRET, FAST,
                                  pricing=lambda: prices(tenant)).start()
    try:
        wait_for(lambda: len(receiver.accepted) == len(HOURS))
    finally:
        exporter.stop()
    assert receiver.bad_signatures == 0  # verified with the Standard Webhooks library
    for doc in receiver.accepted.values():
        assert_plan_priced(doc)
    assert sum(d["totals"]["calls"] for d in receiver.accepted.values()) == 2 + 3 + 4


def test_the_webhook_holds_hours_back_while_the_registry_is_unreadable(
        fleet: Fleet, receiver: Receiver, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    tenant = make_tenant(tmp_path / "t", receiver.url)
    seed_usage(fleet.usage)
    fleet.publish()
    prices = fleet.prices()
    assert prices(tenant).currency == "USD"
    repair = fleet.break_registry()
    caplog.set_level(logging.DEBUG, logger="mtp.webhook")
    exporter = fleet.exporter_cls(fleet.usage, "acme", tenant.billing, SECRET, FAST,
                                  pricing=lambda: prices(tenant)).start()
    try:
        # Retried with the usual backoff, nothing sent, until the registry is back.
        wait_for(lambda: sum(s["attempts"] for s in exporter.status()) >= 3 * len(HOURS))
        assert receiver.requests == 0
        states = exporter.status()
        assert {s["state"] for s in states} == {"retry"}
        assert all(s["last_error"].startswith("prices unavailable") for s in states)
        warnings = [r for r in caplog.records
                    if r.name == "mtp.webhook" and r.levelno >= logging.WARNING]
        down = [r for r in warnings if "fleet_registry is down" in r.getMessage()]
        assert len(down) == 1 and len(warnings) == 1  # one line per outage, not per attempt
        repair()
        wait_for(lambda: len(receiver.accepted) == len(HOURS))
    finally:
        exporter.stop()
    for doc in receiver.accepted.values():
        assert_plan_priced(doc)
    assert {s["state"] for s in exporter.status()} == {"sent"}
    assert any("fleet_registry reachable again" in r.getMessage() for r in caplog.records)
