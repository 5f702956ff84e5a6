"""`mtp run`: the framework and the sidecar together, supervised like gunicorn's arbiter.

Signal handlers only record the signal; the main loop acts on it. SIGTERM or
SIGINT drains: the sidecar stops first (it finishes the requests it holds), then
the framework; whatever is still running after DRAIN_SECONDS is killed with its
whole process group. A second SIGINT kills at once. If a child dies on its own,
the others are stopped and `mtp run` exits with CHILD_DIED, so a container
restarts. The list of children is data: a worker joins when MTP_REDIS_URL is set.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
import jwt

from framework.cli import check_version_pin, resolve_tenant_dir, template_dir
from framework.devsecret import dev_jwt_secret
from framework.settings import Settings
from framework.tenant_config import ConfigError, TenantConfig

CHILD_DIED = 3
DRAIN_SECONDS = 25.0
POLL_SECONDS = 0.1
READY_SECONDS = 30.0
DEV_TOKEN_TTL = 8 * 3600


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process: an `mtp` subcommand."""

    name: str
    command: tuple[str, ...]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "framework", *self.command]


def child_specs(settings: Settings) -> list[ChildSpec]:
    """What `mtp run` starts, in start order (stopped in reverse)."""
    specs = [ChildSpec("framework", ("framework",)), ChildSpec("sidecar", ("sidecar",))]
    if settings.redis_url:  # shared jobs: this replica also runs queued ones (mtp worker)
        specs.insert(1, ChildSpec("worker", ("worker",)))
    return specs


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child only
    # Linux: a child whose supervisor is SIGKILLed gets SIGTERM instead of living on.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Supervisor:
    """Starts children, watches them, drains them."""

    specs: list[ChildSpec]
    env: Mapping[str, str]
    drain_seconds: float = DRAIN_SECONDS
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    signals: list[int] = field(default_factory=list)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # nothing else here: the main loop acts on it

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def start(self) -> None:
        for spec in self.specs:
            # Own process group: a terminal's Ctrl-C reaches only us, and we can
            # stop each child's whole tree (gunicorn workers too).
            self.procs[spec.name] = subprocess.Popen(
                spec.argv(), env=dict(self.env), process_group=0,
                preexec_fn=_die_with_parent)

    def dead_child(self) -> tuple[str, int] | None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def wait(self) -> int:
        """Run until a signal or a child's death; then drain. Returns the exit code."""
        while True:
            if self.signals:
                sig = self.signals[0]
                click.echo(f"mtp run: {signal.Signals(sig).name}, draining", err=True)
                self.stop()
                return 0
            dead = self.dead_child()
            if dead is not None:
                click.echo(f"mtp run: {dead[0]} exited with code {dead[1]}; stopping", err=True)
                self.stop()
                return CHILD_DIED
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        """Stop children in reverse start order, each drained, all within drain_seconds."""
        deadline = time.monotonic() + self.drain_seconds
        for spec in reversed(self.specs):
            proc = self.procs.get(spec.name)
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.monotonic() < deadline:
                if self.signals.count(signal.SIGINT) > 1:
                    break  # a second Ctrl-C: no more waiting
                time.sleep(POLL_SECONDS / 2)
        for proc in self.procs.values():
            # Kill whatever is left of each child's group (also its orphans), then reap.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def child_env(settings: Settings, tenant_dir: Path, template: bool,
              tenant: TenantConfig) -> dict[str, str]:
    """The children's environment: ours plus what `mtp run` decides for them."""
    env = dict(settings.environ)
    env["MTP_TENANT_DIR"] = str(tenant_dir)
    env["MTP_DATA_DIR"] = str(settings.data_dir)
    upstream = settings.upstream
    env["MTP_UPSTREAM"] = (f"unix:{upstream}" if isinstance(upstream, str)
                           else f"{upstream[0]}:{upstream[1]}")
    if not env.get("MTP_SIDECAR_SECRET"):
        env["MTP_SIDECAR_SECRET"] = secrets.token_hex(32)  # per run, never printed
    if template and tenant.jwt.uses_hmac and not env.get(tenant.jwt.secret_env):
        env[tenant.jwt.secret_env] = dev_jwt_secret(settings.data_dir)
    return env


def dev_token(tenant: TenantConfig, secret: str, user: str = "developer") -> str:
    """A development token, as `mtp token` makes them."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, tenant.jwt.tenant_claim: tenant.tenant_id,
                                 "iat": now, "exp": now + DEV_TOKEN_TTL, "groups": [],
                                 "roles": ["admin"]}
    if tenant.jwt.issuer:
        claims["iss"] = tenant.jwt.issuer
    if tenant.jwt.audience:
        claims["aud"] = tenant.jwt.audience
    alg = next(a for a in tenant.jwt.algorithms if a.startswith("HS"))
    return jwt.encode(claims, secret, algorithm=alg)


def public_url(listen: tuple[str, int] | str) -> str:
    if isinstance(listen, str):
        return f"unix:{listen}"
    host, port = listen
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def _accepting(listen: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(listen, str) else socket.AF_INET
    target = listen if isinstance(listen, str) else (
        "127.0.0.1" if listen[0] in ("0.0.0.0", "") else listen[0], listen[1])
    with socket.socket(family) as s:
        s.settimeout(0.2)
        try:
            s.connect(target)
        except OSError:
            return False
    return True


def wait_ready(sup: Supervisor, settings: Settings) -> bool:
    """True once sidecar and framework accept connections; False if a child died first."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and not sup.signals:
        if sup.dead_child() is not None:
            return False
        if _accepting(settings.listen) and _accepting(settings.upstream):
            return True
        time.sleep(POLL_SECONDS)
    return True  # slow or interrupted: the main loop decides


@click.command()
@click.option("--tenant-dir", type=click.Path(file_okay=False), default=None,
              help="Tenant (or assembled runtime) directory; default: the bundled template.")
def run(tenant_dir: str | None) -> None:
    """Start sidecar and framework together; Ctrl-C or SIGTERM drains and stops both."""
    found = resolve_tenant_dir(tenant_dir)
    template = found is None
    directory = template_dir() if template else found
    settings = Settings.from_env(tenant_dir=directory)
    tenant = settings.load_tenant()
    check_version_pin(tenant.framework_version, tenant.source)
    env = child_env(settings, directory, template, tenant)
    if tenant.jwt.uses_hmac and not env.get(tenant.jwt.secret_env):
        # Said here, once, rather than by a sidecar child that dies at start.
        raise ConfigError("environment", tenant.jwt.secret_env,
                          "must be set: [auth.jwt] accepts HS* tokens")
    sup = Supervisor(child_specs(settings), env)
    sup.install()
    sup.start()
    url = public_url(settings.listen)
    if wait_ready(sup, settings):
        click.echo(f"mtp run: tenant {tenant.tenant_id} ({directory})\n"
                   f"  sidecar   {url}\n  framework {env['MTP_UPSTREAM']}\n"
                   f"  children  {', '.join(f'{n} pid {p.pid}' for n, p in sup.procs.items())}")
        if template and tenant.jwt.uses_hmac:
            token = dev_token(tenant, env[tenant.jwt.secret_env])
            click.echo("Try it (development token, user 'developer', role admin):\n"
                       f"  curl -s -H 'Authorization: Bearer {token}' "
                       f"-H 'Content-Type: application/json' -d '{{\"name\": \"Ada\"}}' "
                       f"{url}/services/hello")
        sys.stdout.flush()
    sys.exit(sup.wait())
