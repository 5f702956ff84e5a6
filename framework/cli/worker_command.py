"""The ``mtp worker`` command: reads the tenant, then starts framework/cli/worker.py's pool.

A module of its own because RQ fixes its key prefix when it is imported, and
framework/cli/worker.py imports RQ at its top: the tenant's prefix
(framework/rq_keys.py) is set here first, so the worker's RQ keys are the
tenant's ``mtp:<tenant>:rq:*`` ones.
"""

from __future__ import annotations

import sys

import click

from framework.cli import check_version_pin, resolve_tenant_dir
from framework.rq_keys import use_tenant_prefix
from framework.settings import Settings
from framework.tenant_config import ConfigError


@click.command("worker")
@click.option("--tenant-dir", type=click.Path(file_okay=False), default=None,
              help="Tenant (or assembled runtime) directory.")
@click.option("--processes", type=click.IntRange(1, 256), default=None,
              help="RQ worker processes (default MTP_JOB_WORKERS).")
@click.option("--burst", is_flag=True, help="Exit once the queue is empty.")
def worker(tenant_dir: str | None, processes: int | None, burst: bool) -> None:
    """Run async jobs from the shared Redis queue."""
    directory = resolve_tenant_dir(tenant_dir)
    settings = Settings.from_env(tenant_dir=directory)
    if not settings.redis_url:
        raise ConfigError("environment", "MTP_REDIS_URL",
                          "must be set: `mtp worker` runs jobs from the shared Redis queue")
    tenant = settings.load_tenant()
    check_version_pin(tenant.framework_version, tenant.source)
    use_tenant_prefix(tenant.tenant_id)  # before RQ is imported (next line)
    from framework.cli.worker import WorkerPool
    from framework.jobs_redis import connect
    from framework.redis_wait import durability_warning

    probe = connect(settings.redis_url, pool_size=1)
    warning = durability_warning(probe)
    probe.close()
    if warning:
        click.echo(f"mtp worker: WARNING: {warning}", err=True)
    pool = WorkerPool(settings, tenant, processes or settings.job_workers, burst)
    click.echo(f"mtp worker: tenant {tenant.tenant_id}, {pool.size} process(es)", err=True)
    sys.exit(pool.run())
