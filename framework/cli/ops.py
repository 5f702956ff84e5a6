"""`mtp usage` and `mtp config versions|rollback`: read the data dir the servers write."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click

from framework.cli import resolve_tenant_dir, template_dir
from framework.errors import Unavailable
from framework.settings import Settings
from framework.usage import anomalies, forecasts, parse_group_by, parse_time
from framework.usage_redis import open_store
from framework.versions import DB_NAME as CONFIG_DB
from framework.versions import RollbackError, VersionStore, rollback

GROUPABLE = ("service", "operation", "user", "hour")
CSV_FIELDS = ("tenant", "service", "operation", "user", "hour", "calls", "errors",
              "wall_seconds", "cpu_seconds", "bytes_in", "bytes_out", "cost", "currency")


def _settings(tenant_dir: str | None) -> Settings:
    return Settings.from_env(tenant_dir=resolve_tenant_dir(tenant_dir) or template_dir())


def _time(value: str | None, name: str) -> float | None:
    if not value:
        return None
    try:
        return parse_time(value, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{name}") from None


def usage_report(settings: Settings, start: float | None, end: float | None,
                 group_by: tuple[str, ...]) -> dict[str, Any]:
    """The report `mtp usage` prints: rows, anomalies and a forecast."""
    from framework.control.tenant_check import plan_prices

    cfg = settings.load_tenant()
    store = open_store(settings)  # Redis when MTP_REDIS_URL is set: every replica's usage
    try:
        prices = plan_prices(settings.redis_url, settings.data_dir, cfg)  # a fleet's plan
        rows = store.query(cfg.tenant_id, prices, start, end, group_by)
        series = store.hourly(cfg.tenant_id, prices, start, end)
    except Unavailable as exc:
        raise click.ClickException(str(exc)) from None
    return {
        "tenant": cfg.tenant_id,
        "currency": prices.currency,
        "rows": [{"tenant": cfg.tenant_id, **row} for row in rows],
        "anomalies": [a.as_dict() for a in anomalies(series)],
        "forecast": forecasts(series),
    }


@click.command()
@click.option("--from", "start", default=None, help="ISO 8601 start (rounded down to the hour).")
@click.option("--to", "end", default=None, help="ISO 8601 end (exclusive).")
@click.option("--group-by", default="service,operation", show_default=True,
              help="Comma-separated: service, operation, user, hour.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
@click.option("--tenant-dir", default=None, help="Tenant directory (else MTP_TENANT_DIR or .).")
def usage(start: str | None, end: str | None, group_by: str, fmt: str,
          tenant_dir: str | None) -> None:
    """Usage and cost per tenant/service/operation, from MTP_DATA_DIR (or MTP_REDIS_URL)."""
    try:
        fields = parse_group_by(group_by)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--group-by") from None
    report = usage_report(_settings(tenant_dir), _time(start, "from"), _time(end, "to"), fields)
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    out = io.StringIO()
    columns = [f for f in CSV_FIELDS if f not in GROUPABLE or f in fields]
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({**row, "currency": report["currency"]})
    click.echo(out.getvalue(), nl=False)


@click.group()
def config() -> None:
    """List and roll back applied config versions."""


@config.command("versions")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--diff", "with_diff", is_flag=True, help="Include what each version changed.")
@click.option("--tenant-dir", default=None, help="Tenant directory (else MTP_TENANT_DIR or .).")
def versions(fmt: str, with_diff: bool, tenant_dir: str | None) -> None:
    """Applied config versions, newest first."""
    store = VersionStore(_settings(tenant_dir).data_dir / CONFIG_DB)
    found = [v.as_dict(with_diff=with_diff) for v in store.list()]
    if fmt == "json":
        click.echo(json.dumps({"versions": found}, indent=2))
        return
    if not found:
        click.echo("no config versions recorded yet (start the servers once)")
        return
    for v in found:
        click.echo(f"{v['id']:>5}  {v['time']}  {v['hash'][:12]}  {v['source']}")
        for change in v.get("diff", ()):
            click.echo(f"         {change['key']}: {change['old']!r} -> {change['new']!r}")


@config.command("rollback")
@click.argument("version_id", type=int)
@click.option("--tenant-dir", default=None, help="Tenant directory (else MTP_TENANT_DIR or .).")
def rollback_command(version_id: int, tenant_dir: str | None) -> None:
    """Write version VERSION_ID's overlay to MTP_CONFIG_OVERLAY; running processes apply it."""
    settings = _settings(tenant_dir)
    store = VersionStore(settings.data_dir / CONFIG_DB)
    try:
        version = rollback(store, version_id, settings.config_overlay)
    except RollbackError as exc:
        raise click.ClickException(str(exc)) from None
    # The watchers of the running processes apply the file and record the new version.
    click.echo(f"rolled back to version {version.id} ({version.hash[:12]}): wrote "
               f"{settings.config_overlay}; running processes apply it within a poll")
