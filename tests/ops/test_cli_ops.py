"""`mtp usage` and `mtp config versions|rollback` read what the servers wrote."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from framework.cli import cli
from framework.overlay import live_config
from framework.tenant_config import load_tenant
from framework.usage import HOUR, UsageMeter, UsageStore, iso_hour
from framework.versions import VersionStore

TENANT = """
[tenant]
id = "acme"

[billing]
currency = "USD"
per_call = 0.5
per_cpu_second = 1.0
per_gb = 0.0
"""
T0 = 1_700_000_000 - 1_700_000_000 % HOUR


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch):
    tenant, data = tmp_path / "tenant", tmp_path / "data"
    tenant.mkdir()
    (tenant / "tenant.toml").write_text(TENANT)
    for key in ("MTP_TENANT_DIR", "MTP_DATA_DIR", "MTP_CONFIG_OVERLAY"):
        monkeypatch.delenv(key, raising=False)
    env = {"MTP_TENANT_DIR": str(tenant), "MTP_DATA_DIR": str(data),
           "MTP_CONFIG_OVERLAY": str(tmp_path / "overlay.toml")}
    return tenant, data, env


def run(env: dict[str, str], *args: str):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_usage_csv_and_json(dirs) -> None:
    _, data, env = dirs
    store = UsageStore(data / "usage.db")
    for h, user in ((0, "alice"), (1, "bob")):
        meter = UsageMeter(store, "acme", clock=lambda h=h: T0 + h * HOUR)
        meter.record("orders", "create", user, 200, 0.2, 0.5, 1, 1)
        meter.record("hello", None, user, 500, 0.1, 0.0, 0, 0)
        meter.flush()

    result = run(env, "usage")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["service"], r["operation"], r["calls"], r["errors"]) for r in rows] == [
        ("hello", "", "2", "2"), ("orders", "create", "2", "0")]
    assert rows[1]["cost"] == "2.0" and rows[1]["currency"] == "USD"
    assert rows[0]["tenant"] == "acme" and "user" not in rows[0]

    result = run(env, "usage", "--format", "json", "--group-by", "user,hour",
                 "--from", iso_hour(T0 + HOUR), "--to", "2100-01-01")
    report = json.loads(result.output)
    assert report["currency"] == "USD" and report["tenant"] == "acme"
    assert [(r["user"], r["hour"], r["calls"]) for r in report["rows"]] == [
        ("bob", iso_hour(T0 + HOUR), 2)]
    assert set(report["forecast"]) == {"next_day", "next_month"}
    assert report["anomalies"] == []


def test_usage_refuses_bad_options(dirs) -> None:
    _, _, env = dirs
    bad_time = run(env, "usage", "--from", "last week")
    assert bad_time.exit_code == 2 and "--from" in bad_time.output
    bad_group = run(env, "usage", "--group-by", "tenant")
    assert bad_group.exit_code == 2 and "unknown field 'tenant'" in bad_group.output
    assert run(env, "usage", "--format", "xml").exit_code == 2


def test_config_versions_and_rollback(dirs, tmp_path: Path) -> None:
    tenant, data, env = dirs
    assert "no config versions" in run(env, "config", "versions").output
    overlay = Path(env["MTP_CONFIG_OVERLAY"])
    overlay.write_text("[limits]\nrate = 5\n")
    versions = VersionStore(data / "config.db")
    holder, watcher = live_config(load_tenant(tenant / "tenant.toml"), str(overlay), versions,
                                  interval=60)
    watcher.stop()
    first = holder.version_id
    overlay.write_text("[limits]\nrate = 6\nburst = 1\n")
    assert watcher.poll()

    listed = json.loads(run(env, "config", "versions", "--format", "json").output)["versions"]
    assert [v["id"] for v in listed] == [holder.version_id, first]
    table = run(env, "config", "versions", "--diff").output
    assert "limits.rate: 5 -> 6" in table and str(overlay) in table

    result = run(env, "config", "rollback", str(first))
    assert result.exit_code == 0 and f"rolled back to version {first}" in result.output
    assert watcher.poll() and holder.current.limits.rate == 5

    missing = run(env, "config", "rollback", "999")
    assert missing.exit_code == 1 and "no config version 999" in missing.output
    no_overlay = run({**env, "MTP_CONFIG_OVERLAY": ""}, "config", "rollback", str(first))
    assert no_overlay.exit_code == 1 and "MTP_CONFIG_OVERLAY is not set" in no_overlay.output
