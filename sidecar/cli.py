"""`mtp sidecar`: run the security sidecar alone."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import click

from framework import logs
from framework.cli import resolve_tenant_dir
from framework.grace import stop_budget
from framework.settings import Settings

LOGGER_NAME = "mtp.sidecar"


def install_uvloop() -> str:
    """Use uvloop's event loop when it is installed (a faster loop, same semantics)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


@click.command()
@click.option("--tenant-dir", default=None, help="Tenant directory (else MTP_TENANT_DIR or .).")
def sidecar(tenant_dir: str | None) -> None:
    """Run the security sidecar: authenticate, authorize, limit, sign, proxy."""
    from sidecar.server import run
    from sidecar.startup import create_app

    found = resolve_tenant_dir(tenant_dir)
    settings = Settings.from_env(tenant_dir=found)
    tenant = settings.load_tenant()
    # One log format for both processes: JSON lines with tenant and request id (the
    # framework's), every library's lines included. The audit log keeps its own format.
    logs.setup(settings.log_level, tenant.tenant_id,
               libraries=max(settings.log_level, "WARNING", key=logging.getLevelName))
    log = logging.getLogger(LOGGER_NAME)
    app = create_app(settings, tenant)  # refuses missing secrets before listening
    loop_name = install_uvloop()
    where = settings.listen
    if isinstance(where, str):
        target: dict[str, Any] = {"path": where}
        shown = f"unix:{where}"
    else:
        target = {"host": where[0], "port": where[1]}
        shown = f"http://{where[0]}:{where[1]}"
    log.info("mtp sidecar: tenant %s on %s -> %s (%s)", tenant.tenant_id, shown,
             settings.upstream_url, loop_name,
             extra={"listen": shown, "upstream": settings.upstream_url, "loop": loop_name})
    # The sidecar stops first and its answers come from the framework, which outlives it.
    run(app, shutdown_timeout=stop_budget(settings.grace_seconds).sidecar, **target)
