"""Building and serving the control plane from its checked config."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from framework.control.api import Control, make_app
from framework.control.audit import AdminAudit
from framework.control.auth import load_auth
from framework.control.backends import load_backends
from framework.control.config import ControlConfig
from framework.control.plans import PlanBook
from framework.control.store import connect_redis, open_registry
from framework.control.tenant_data import TenantData

STORE_THREADS_REDIS = 4


def build(config: ControlConfig) -> Control:
    """The control plane, checked (config errors raise here, before anything listens)."""
    plans = PlanBook(config.plans_file)
    backends = load_backends(config.gateway_file)
    auth = load_auth(config.operator_jwt_secret, config.operator_keys_file)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    registry = open_registry(config.redis_url, config.data_dir)
    data = TenantData(config.data_dir,
                      connect_redis(config.redis_url) if config.redis_url else None)
    # SQLite: one thread, one writer (a connection is not shared between threads);
    # Redis: a few, so one slow call does not queue every other.
    threads = STORE_THREADS_REDIS if config.redis_url else 1
    return Control(registry=registry, plans=plans, auth=auth,
                   audit=AdminAudit(config.audit_file), data=data,
                   pool_domain=config.pool_domain, backends=backends,
                   drain=float(config.grace_seconds),
                   store_thread=ThreadPoolExecutor(threads, thread_name_prefix="mtp-control"))


def serve(config: ControlConfig) -> None:
    """Serve the admin API until SIGINT/SIGTERM."""
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = make_app(build(config))
    host, port = config.listen
    web.run_app(app, host=host, port=port, access_log=None, print=None,
                shutdown_timeout=10.0, handle_signals=True)
