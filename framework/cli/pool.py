"""`mtp pool`: one sidecar and the worker processes of many tenants."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from framework.settings import Settings


@click.command("pool")
@click.option("--name", required=True, help="The pool's name (placement pool:NAME).")
@click.option("--bundles", required=True, type=click.Path(file_okay=False),
              help="Directory of tenant bundles: DIR/<tenant>/ (mtp assemble output).")
def pool(name: str, bundles: str) -> None:
    """Serve every tenant bundle in DIR: one sidecar, a process per active tenant."""
    from framework import logs
    from framework.pool.server import PoolSettings, serve_pool
    from sidecar.cli import install_uvloop

    settings = Settings.from_env(tenant_dir=bundles)
    settings.require_sidecar_secret()
    pool_settings = PoolSettings.from_env(name, Path(bundles), settings.environ)
    logs.setup(settings.log_level, f"pool:{name}")
    install_uvloop()
    asyncio.run(serve_pool(pool_settings, settings))
