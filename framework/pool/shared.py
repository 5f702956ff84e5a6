"""Isolation ``shared``: one process of a pool serves several (trusted) tenants.

The pool starts this process like a tenant's (forked from the warm parent, served by
gunicorn, registered under :data:`SHARED`, a name no tenant id can be). Its WSGI app
is :class:`SharedApps`: it checks the sidecar's signature with the key of the shared
group (:func:`shared_key`, never the pool secret), then hands the request to the Flask
app of the tenant the signed ``X-Tenant-ID`` names, built on first use with that
tenant's own Settings (its bundle, its data dir, its overlay, its webhook secret) and
kept among the ``max_apps`` most recently used. The sidecar's own calls name no
caller (``/readyz``, ``/internal/catalog``): they name the tenant in
:data:`ROUTE`, a header the sidecar strips from every client request.

Not isolated between the tenants of this process (docs/pools.md): memory, CPU,
crashes, module globals, the file system, the shared key (one tenant's code can
sign for another shared tenant). Process tenants are not reachable with it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import logs, signing
from framework.pool.bundles import stamp_of
from framework.pool.keys import derive_key, secret_name
from framework.problem import CONTENT_TYPE, problem_bytes, request_id
from framework.settings import Settings
from framework.tenant_config import TENANT_ID_RE, ConfigError
from framework.verify import IDENTITY_FREE, UNSIGNED, raw_target, signed_headers

log = logging.getLogger("mtp.pool.shared")

# The ProcessManager key and key-derivation name of the shared group: "~" is not in
# TENANT_ID_RE, so no tenant's process or derived key can ever be this one.
SHARED = "~shared"
ROUTE = "X-Sidecar-Route-Tenant"  # stripped from clients (x-sidecar-*): the sidecar's own
ROUTE_WSGI = "HTTP_" + ROUTE.upper().replace("-", "_")
MAX_APPS = 64  # MTP_POOL_SHARED_APPS: tenant apps kept built (each with its event engine thread)
RECHECK = 1.0  # seconds between two looks at a tenant's bundle stamp
# Each app's event engine polls its database when idle (50 ms in a tenant process).
# Measured: 50 idle apps cost 7.8% of a core at 50 ms, 2.3% at 1 s (~0.05% per app:
# watchdog, usage flusher and the engine together). Here a second is how late a
# delivery queued by another worker (MTP_WORKERS > 1) or falling due for a retry
# starts; one the app publishes itself wakes its engine at once.
EVENTS_POLL = 1.0
# Each app's usage meter writes its SQLite once per flush when it had calls: with 300
# active tenants a flush a second was 300 writes a second, 13% of the process in a
# profile at 900 req/s. Every 5 s here; usage (and a plan's CPU cap) lags that much.
USAGE_FLUSH_SECONDS = 5.0
SWEEP = 1.0
# A co-tenant's metric line: tenant="<id>" label of another tenant (dropped from /metrics).
_TENANT_LABEL = re.compile(r'tenant="([^"]*)"')

Build = Callable[[Settings, Any], Any]  # create_app(settings, tenant) -> WSGI app


def shared_key(pool_secret: bytes) -> bytes:
    """The signing key of the shared group: HKDF(pool secret, ``~shared``)."""
    return derive_key(pool_secret, SHARED)


class Refused(Exception):
    """The request names no tenant this process can serve."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


@dataclass
class Loaded:
    """One tenant's built app."""

    tenant_id: str
    app: Any
    stamp: tuple[object, ...]
    checked: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)
    inflight: int = 0


def close_app(app: Any, grace: float) -> None:
    """Stop an app's background parts: jobs drain for ``grace`` s, usage is flushed."""
    extensions = getattr(app, "extensions", {})
    rt = extensions.get("mtp")
    if rt is not None:
        rt.runner.stop_accepting()
        rt.runner.drain(time.monotonic() + grace)
        rt.close()
    for name in ("mtp.operations", "mtp.events"):
        part = extensions.get(name)
        if part is not None:
            with contextlib.suppress(Exception):
                part.close()
            if name == "mtp.operations":
                atexit.unregister(part.close)  # else the closed app lives on in atexit


class SharedApps:
    """The shared process's WSGI app: the signed tenant's own Flask app."""

    def __init__(self, base: Settings, *, bundles: Path, tenants_dir: Path, overlay_dir: str,
                 max_apps: int = MAX_APPS, idle: float = 300.0,
                 build: Build | None = None) -> None:
        self.base, self.bundles, self.tenants_dir = base, bundles, tenants_dir
        self.overlay_dir, self.max_apps, self.idle = overlay_dir, max_apps, idle
        self.secret = base.require_sidecar_secret()
        self.build = build or _create_app
        self.apps: OrderedDict[str, Loaded] = OrderedDict()
        self.builds = 0  # apps built so far (tests)
        self._lock = threading.Lock()  # the dict and the counters
        self._building = threading.Lock()  # one build at a time: create_app sets globals
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._closing: list[threading.Thread] = []

    # -- per tenant ----------------------------------------------------------------

    def settings_for(self, tenant_id: str, webhook_env: str) -> Settings:
        """Tenant ``tenant_id``'s Settings, as a process tenant's would be."""
        handed = self.base.environ
        # Only this tenant's secret, under its bare name (settings.secret reads it);
        # the other tenants' values stay out of its Settings (not out of the memory).
        environ = {k: v for k, v in handed.items() if "__" not in k}
        own = handed.get(secret_name(webhook_env, tenant_id), "") if webhook_env else ""
        environ.pop(webhook_env, None)
        if own:
            environ[webhook_env] = own
        overlay = str(Path(self.overlay_dir) / f"{tenant_id}.toml") if self.overlay_dir else ""
        return dataclasses.replace(
            self.base, tenant_dir=self.bundles / tenant_id,
            data_dir=self.tenants_dir / tenant_id, config_overlay=overlay, redis_url="",
            environ=environ)

    def _load(self, tenant_id: str) -> Loaded:
        from framework.cli import check_version_pin
        from framework.tenant_config import load_tenant

        directory = self.bundles / tenant_id
        stamp = stamp_of(directory)
        if stamp is None:
            raise Refused(403, "unknown-tenant", "this tenant is not served here")
        try:
            tenant = load_tenant(Path(str(stamp[0])) / "tenant.toml")
            if tenant.tenant_id != tenant_id:
                raise ConfigError(tenant.source, "tenant.id", "names another tenant")
            check_version_pin(tenant.framework_version, tenant.source)
            settings = dataclasses.replace(
                self.settings_for(tenant_id, tenant.billing.webhook_secret_env),
                tenant_dir=Path(str(stamp[0])))  # the release it resolves to now
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            before = {t.ident for t in threading.enumerate() if t.ident is not None}
            token = logs.TENANT.set(tenant_id)
            try:
                app = self.build(settings, tenant)
            finally:
                logs.TENANT.reset(token)
            logs.claim_threads(before, tenant_id)  # its threads' lines name it
        except (ConfigError, OSError) as exc:
            log.warning("tenant app not built: %s", exc, extra={"tenant": tenant_id})
            raise Refused(503, "service-unavailable",
                          "the tenant's runtime is not available") from None
        self.builds += 1
        return Loaded(tenant_id, app, stamp)

    def enter(self, tenant_id: str) -> Loaded:
        """The tenant's app (built or rebuilt when needed), counted in flight."""
        now = time.monotonic()
        with self._lock:
            loaded = self.apps.get(tenant_id)
            recheck = loaded is not None and now - loaded.checked >= RECHECK
            if recheck:
                loaded.checked = now  # type: ignore[union-attr]
        # The bundle's stamp is read outside the lock: a resolve and two stats per
        # tenant and second held every other request thread up (a profile at 900 req/s).
        if recheck and loaded is not None and stamp_of(self.bundles / tenant_id) != loaded.stamp:
            with self._lock:
                if self.apps.get(tenant_id) is loaded:  # replaced or removed
                    self._drop(tenant_id)
            loaded = None
        if loaded is not None:
            with self._lock:
                if self.apps.get(tenant_id) is loaded:  # not dropped meanwhile
                    self.apps.move_to_end(tenant_id)
                    loaded.inflight += 1
                    loaded.used = now
                    return loaded
        with self._building:
            with self._lock:
                loaded = self.apps.get(tenant_id)  # built meanwhile by another thread
                if loaded is not None:
                    loaded.inflight += 1
                    return loaded
            loaded = self._load(tenant_id)
            with self._lock:
                loaded.inflight += 1
                self.apps[tenant_id] = loaded
                self._make_room()
            return loaded

    def leave(self, loaded: Loaded) -> None:
        with self._lock:
            loaded.inflight -= 1
            loaded.used = time.monotonic()

    def _make_room(self) -> None:
        # The least recently used idle apps go; busy ones stay (the bound is exceeded
        # for as long as every app has calls in flight).
        for tenant_id in list(self.apps):
            if len(self.apps) <= self.max_apps:
                return
            if self.apps[tenant_id].inflight == 0:
                self._drop(tenant_id)

    def _drop(self, tenant_id: str) -> None:
        """Forget an app and close it in the background (lock held)."""
        loaded = self.apps.pop(tenant_id)

        def close() -> None:
            while loaded.inflight:  # calls still on it finish first
                time.sleep(0.05)
            with contextlib.suppress(Exception):
                close_app(loaded.app, float(self.base.grace_seconds))

        thread = threading.Thread(target=close, name="mtp-shared-close", daemon=True)
        self._closing = [t for t in self._closing if t.is_alive()] + [thread]
        thread.start()

    def sweep(self) -> list[str]:
        """Close the apps idle for ``idle`` seconds; their tenant ids.

        An app with an event delivery due within ``idle`` stays (its engine makes it),
        as a process tenant's process does (framework/pool/wake.py).
        """
        from framework.events.store import DB_NAME, next_due

        now = time.monotonic()
        with self._lock:
            idle = [t for t, a in self.apps.items()
                    if a.inflight == 0 and now - a.used >= self.idle]
        gone = []
        for tenant_id in idle:
            at = next_due(self.tenants_dir / tenant_id / DB_NAME)
            if at is None or at > time.time() + self.idle:
                gone.append(tenant_id)
        with self._lock:
            gone = [t for t in gone if t in self.apps and self.apps[t].inflight == 0]
            for tenant_id in gone:
                self._drop(tenant_id)
        return gone

    def start(self) -> SharedApps:
        def run() -> None:
            while not self._stop.wait(SWEEP):
                self.sweep()

        self._sweeper = threading.Thread(target=run, name="mtp-shared-sweep", daemon=True)
        self._sweeper.start()
        return self

    def stop_accepting(self) -> None:
        """SIGTERM: no app takes a new job (503), as in a tenant process."""
        with self._lock:
            apps = list(self.apps.values())
        for loaded in apps:
            rt = getattr(loaded.app, "extensions", {}).get("mtp")
            if rt is not None:
                rt.runner.stop_accepting()

    def close(self, grace: float = 0.0) -> None:
        """Close every app (the process stops): running jobs get ``grace`` seconds."""
        self._stop.set()
        with self._lock:
            apps = list(self.apps.values())
            self.apps.clear()
        for loaded in apps:
            with contextlib.suppress(Exception):
                close_app(loaded.app, grace)
        for thread in self._closing:
            thread.join(grace + 1)

    # -- WSGI ----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", ""))
        if path in UNSIGNED:  # the pool's liveness probe: this process, no tenant
            return _answer(start_response, 200, "application/json",
                           b'{"status": "ok", "shared": true}', "")
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        try:
            tenant_id = self.tenant_of(environ, path)
            loaded = self.enter(tenant_id)
        except Refused as exc:
            return _answer(start_response, exc.status, CONTENT_TYPE,
                           problem_bytes(exc.status, exc.detail, rid, kind=exc.kind), rid)
        token = logs.TENANT.set(tenant_id)
        try:
            if path == "/metrics":
                return self._metrics(loaded.app, environ, start_response, tenant_id)
            return loaded.app(environ, start_response)  # type: ignore[no-any-return]
        finally:
            logs.TENANT.reset(token)
            self.leave(loaded)

    @staticmethod
    def _metrics(app: Any, environ: dict[str, Any], start_response: Any,
                 tenant_id: str) -> list[bytes]:
        """/metrics of the process, without the co-tenants' labelled lines."""
        seen: list[Any] = []
        body = b"".join(app(environ, lambda status, headers, *exc: seen.extend(
            (status, headers))))
        status, headers = seen[0], seen[1]
        if status.startswith("200"):
            body = _own_metrics(body, tenant_id)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def tenant_of(self, environ: Mapping[str, Any], path: str) -> str:
        """The tenant a request is for; Refused unless signed with the shared key.

        Checked here, before any app is built: a request not made by the sidecar (or by
        a shared tenant's code, which holds the key) never loads a tenant's code.
        """
        headers = signed_headers(environ)
        verdict = signing.check(self.secret, str(environ.get("REQUEST_METHOD", "")),
                                raw_target(environ), headers)
        if verdict is signing.Verdict.STALE:
            raise Refused(503, "service-unavailable", "the request was held too long; retry")
        if verdict is not signing.Verdict.VALID:
            raise Refused(401, "unauthorized", "missing or invalid sidecar signature")
        tenant_id = headers[signing.TENANT]
        if not tenant_id and path in IDENTITY_FREE:
            tenant_id = str(environ.get(ROUTE_WSGI, ""))
        # fullmatch: TENANT_ID_RE's "$" would let a final newline through; the name is
        # checked before it becomes a path.
        if not TENANT_ID_RE.fullmatch(tenant_id):
            raise Refused(403, "unknown-tenant", "no tenant of the shared group named")
        return tenant_id


def _answer(start_response: Any, status: int, content_type: str, body: bytes,
            rid: str) -> list[bytes]:
    from http import HTTPStatus

    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if rid:
        headers.append(("X-Request-ID", rid))
    start_response(f"{status} {HTTPStatus(status).phrase}", headers)
    return [body]


def _own_metrics(text: bytes, tenant_id: str) -> bytes:
    """The framework's metrics without the lines labelled with another tenant."""
    keep = []
    for line in text.decode("utf-8", "replace").splitlines(keepends=True):
        found = _TENANT_LABEL.search(line)
        if found is None or found.group(1) == tenant_id:
            keep.append(line)
    return "".join(keep).encode()


def _create_app(settings: Settings, tenant: Any) -> Any:
    from framework.app import create_app

    return create_app(settings, tenant)


def make_server(settings: Settings, apps: SharedApps) -> Any:  # pragma: no cover - forked
    """gunicorn configured as for a tenant process, serving ``apps``."""
    from types import SimpleNamespace

    from framework.cli.serve import FrameworkServer, master_hook, post_worker_init

    class SharedServer(FrameworkServer):
        def load_config(self) -> None:
            super().load_config()

            def worker_init(worker: Any) -> None:
                post_worker_init(worker)
                previous = signal.getsignal(signal.SIGTERM)

                def on_term(signum: int, frame: Any) -> None:
                    apps.stop_accepting()
                    if callable(previous):
                        previous(signum, frame)

                signal.signal(signal.SIGTERM, on_term)

            def worker_exit(server: Any, worker: Any) -> None:
                apps.close(max(0.0, float(worker.cfg.graceful_timeout) - 2.0))

            self.cfg.set("post_worker_init", worker_init)
            self.cfg.set("worker_exit", master_hook("worker_exit", worker_exit))

        def load(self) -> Any:
            return apps.start()

    return SharedServer(settings, SimpleNamespace(tenant_id=SHARED))  # type: ignore[arg-type]


def serve_shared(env: Mapping[str, str],
                 secrets: Mapping[str, str]) -> None:  # pragma: no cover - forked
    """In the forked child: the shared process (gunicorn serving :class:`SharedApps`)."""
    import shutil

    from framework.cli.serve import prepare
    from framework.pool.zygote import serve_alone

    logs.share(SHARED)
    environ = dict(env)
    overlay_dir = environ.pop("MTP_CONFIG_OVERLAY", "")
    # Every tenant app's Settings derive from these (SharedApps.settings_for).
    settings = dataclasses.replace(
        Settings.from_env(environ={**environ, **secrets}, tenant_dir=env["MTP_POOL_BUNDLES"]),
        events_poll=EVENTS_POLL, usage_flush=USAGE_FLUSH_SECONDS)
    metrics_dir = prepare(settings)
    logs.setup(settings.log_level, SHARED).info(
        "starting pool shared process", extra={"bundles": env["MTP_POOL_BUNDLES"]})
    apps = SharedApps(settings, bundles=Path(env["MTP_POOL_BUNDLES"]),
                      tenants_dir=Path(env["MTP_POOL_TENANTS"]), overlay_dir=overlay_dir,
                      max_apps=int(env.get("MTP_POOL_SHARED_APPS") or MAX_APPS),
                      idle=float(env.get("MTP_POOL_IDLE") or 300))
    server = make_server(settings, apps)
    me = os.getpid()
    try:
        if settings.workers == 1:
            serve_alone(server)
        else:
            server.run()
    finally:
        if os.getpid() == me:
            shutil.rmtree(metrics_dir, ignore_errors=True)


