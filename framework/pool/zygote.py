"""The warm parent: imports the framework once, then forks a tenant's process on demand.

``python -m framework.pool.zygote FD`` runs with an environment free of secrets and
talks to the pool over the SOCK_SEQPACKET socket FD. Each message is a JSON spec (the
tenant dir and the non-secret environment) plus one file descriptor: a pipe holding
that tenant's secrets. The zygote never reads the pipe; the forked child does, so no
tenant's secret ever passes through memory that a later fork inherits. The child then
runs what ``mtp framework`` runs: gunicorn serving the Flask app for that one tenant.

``gc.freeze()`` before forking keeps the imported modules' objects out of the
collector's reach, so the pages holding them stay shared with every child.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys
import tempfile
from typing import Any

MAX_MESSAGE = 1 << 16


def warm_up() -> None:
    """Import what every tenant process needs (Flask, gunicorn, the framework)."""
    # prometheus_client picks its multiprocess value class at import: set a directory
    # now; each child points the variable at its own fresh one before creating values.
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="mtp-zygote-"))
    import flask  # noqa: F401
    import gunicorn.app.base
    import gunicorn.workers.gthread  # noqa: F401

    import framework.app
    import framework.cli.serve
    import framework.pool.shared
    import framework.worker  # noqa: F401


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _not_dumpable() -> None:
    """Other processes of the same user may not read this one's memory or environment.

    PR_SET_DUMPABLE 0 makes /proc/<pid>/mem, environ, maps... owned by root and
    refuses ptrace to the same user: tenant B's code cannot read A's signing key out
    of A's process. (Inherited by gunicorn's forked workers; root is not stopped.)
    """
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(4, 0)  # PR_SET_DUMPABLE


def child(spec: dict[str, Any], secrets_fd: int) -> None:  # pragma: no cover - forked child
    """In the forked child: become the tenant's `mtp framework` (gunicorn master), or
    the pool's shared process (spec ``shared``: framework/pool/shared.py)."""
    import shutil

    from framework import logs
    from framework.cli import check_version_pin
    from framework.cli.serve import FrameworkServer, prepare
    from framework.settings import Settings, read_handed_secrets

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()  # its own group: stopping it stops its workers
    _die_with_parent()
    _not_dumpable()
    env: dict[str, str] = spec["env"]
    secrets = read_handed_secrets(str(secrets_fd))
    os.environ.clear()
    os.environ.update(env)  # nothing secret: tenant code reads this
    if spec.get("shared"):  # isolation `shared`: several tenants' apps in this process
        from framework.pool.shared import serve_shared

        serve_shared(env, secrets)
        return
    settings = Settings.from_env(environ={**env, **secrets}, tenant_dir=spec["tenant_dir"])
    del secrets
    tenant = settings.load_tenant()
    check_version_pin(tenant.framework_version, tenant.source)  # as `mtp framework` does
    metrics_dir = prepare(settings)  # prometheus_client's multiprocess values need one
    me = os.getpid()
    if spec.get("role") == "worker":
        try:
            job_worker(settings, tenant)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    logs.setup(settings.log_level, tenant.tenant_id).info(
        "starting pool tenant process", extra={"tenant_dir": str(settings.tenant_dir)})
    sys.argv = ["mtp-pool-tenant", tenant.tenant_id]
    try:
        if settings.workers == 1:
            serve_alone(FrameworkServer(settings, tenant))
        else:
            FrameworkServer(settings, tenant).run()
    finally:
        if os.getpid() == me:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def job_worker(settings: Any, tenant: Any) -> None:  # pragma: no cover - forked child
    """The tenant's RQ worker (its process has a Redis URL): runs its queued async jobs,
    as `mtp worker` does, one at a time; SIGTERM lets the current job finish."""
    from framework.rq_keys import use_tenant_prefix

    use_tenant_prefix(tenant.tenant_id)  # before RQ is imported (next line)
    from framework.cli.worker import run_worker

    sys.argv = ["mtp-pool-worker", tenant.tenant_id]
    sys.exit(run_worker(settings, tenant, burst=False))


def serve_alone(server: Any) -> None:  # pragma: no cover - forked child
    """One gunicorn worker and no master (MTP_WORKERS=1, a pool's default).

    A gunicorn master per tenant cost 9 MiB PSS for nothing a single worker needs:
    the pool already starts, watches and stops the process. The worker is built as the
    master would build it, with the same hooks (post_worker_init in the worker,
    worker_exit here), and stops gracefully on SIGTERM.
    """
    from gunicorn import sock

    import framework.metrics

    cfg = server.cfg
    log = cfg.logger_class(cfg)
    listeners = sock.create_sockets(cfg, log)
    worker = cfg.worker_class(1, os.getppid(), listeners, server, cfg.timeout / 2.0, cfg,
                              log)
    worker.pid = os.getpid()
    # Process metrics name this process alone: its parent is the warm parent, whose
    # other children are other tenants' processes.
    framework.metrics.gunicorn_processes = lambda: [("framework-worker", os.getpid())]
    try:
        worker.init_process()
    finally:
        cfg.worker_exit(None, worker)
        sock.close_sockets(listeners, True)


def serve(sock: socket.socket) -> None:
    """Fork one child per spec until the pool closes the socket."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except OSError:
            return
        if not msg:
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.send(b'{"error": "a spec needs one secrets pipe"}')
            continue
        spec = json.loads(msg)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - forked child
            code = 1
            try:
                sock.close()
                child(spec, fds[0])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                print(f"mtp pool: tenant process failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
            os._exit(code)
        os.close(fds[0])
        sock.send(json.dumps({"pid": pid}).encode())


def main() -> None:
    """Entry point: ``python -m framework.pool.zygote FD``."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    _die_with_parent()
    # Children are reaped by the kernel; the pool watches their pids.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the pool, which stops us
    warm_up()
    gc.collect()
    gc.freeze()
    sock.send(b'{"ready": true}')
    serve(sock)


if __name__ == "__main__":
    main()
