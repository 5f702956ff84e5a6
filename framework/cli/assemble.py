"""`mtp assemble`: check a tenant repository and write its runtime tree (pipeline steps 3-4)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import click

from framework.assemble import AssembleError, TestsFailed
from framework.assemble import assemble as build_runtime
from framework.cli import resolve_tenant_dir


def _build_time(environ: Mapping[str, str]) -> datetime:
    """SOURCE_DATE_EPOCH (reproducible builds) when set, else now."""
    epoch = environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():
        return datetime.fromtimestamp(int(epoch), UTC)
    return datetime.now(UTC)


@click.command()
@click.option("--tenant-dir", default=None,
              help="The tenant repository (else MTP_TENANT_DIR or the current directory).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the runtime tree (replaced when it is an earlier one).")
@click.option("--skip-tests", is_flag=True,
              help="Do not run the tenant's tests/ (when this pipeline already ran them).")
def assemble(tenant_dir: str | None, out: Path, skip_tests: bool) -> None:
    """Check tenant.toml and every service, run the tenant's tests, build the runtime tree."""
    found = resolve_tenant_dir(tenant_dir)
    if found is None:
        raise click.UsageError("no tenant: pass --tenant-dir, set MTP_TENANT_DIR, "
                               "or run in a folder holding tenant.toml")
    try:
        result = build_runtime(found, out, run_tests=not skip_tests,
                               when=_build_time(os.environ),
                               report=lambda line: click.echo(f"mtp assemble: {line}"))
    except TestsFailed as exc:
        # pytest's own report says which test failed; the last line says what it means.
        click.echo(exc.output.rstrip(), err=True)
        click.echo(f"mtp assemble: {exc}", err=True)
        sys.exit(1)
    except AssembleError as exc:
        for line in str(exc).splitlines():
            click.echo(f"mtp assemble: {line}", err=True)
        sys.exit(1)
    click.echo(str(result.out / "manifest.json"))
