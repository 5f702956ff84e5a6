"""The one object a worker process builds at start and every request reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from framework.execute import Executor
from framework.jobrunner import JobRunner, Reaper
from framework.jobs import JobStore
from framework.registry import Registry
from framework.settings import Settings
from framework.tenant_config import TenantConfig


@dataclass
class Runtime:
    """Settings, tenant config and the live parts built from them.

    ``tenant`` is the effective config; a live overlay may replace it (and the
    registry's copy) with a newer version while the process runs.
    """

    settings: Settings
    tenant: TenantConfig
    registry: Registry
    executor: Executor
    jobs: JobStore
    runner: JobRunner
    reaper: Reaper
    log: logging.Logger
    secret: bytes

    def set_tenant(self, tenant: TenantConfig) -> None:
        """Switch to a new effective config (same tenant id)."""
        self.tenant = tenant
        self.registry.tenant = tenant

    def close(self) -> None:
        """Stop background threads (tests; gunicorn workers simply exit)."""
        self.reaper.stop()
        self.runner.shutdown()
        self.executor.close()
