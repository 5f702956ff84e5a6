"""`mtp run`: the framework and the sidecar together, supervised like gunicorn's arbiter.

Signal handlers only record the signal; the main loop acts on it. SIGTERM or
SIGINT drains within MTP_GRACE_SECONDS (framework/grace.py): the sidecar stops
first (it answers the requests it holds), then the framework and the worker;
whatever is still running at the budget's kill time is killed with its whole
process group. A second SIGINT kills at once.

A child that dies, or stops answering its health check (``/healthz``, every
MTP_HEALTH_INTERVAL seconds, MTP_HEALTH_MISSES misses in a row), stops the run:
a hung child's process group is killed, the others are drained and `mtp run`
exits non-zero, so the container restarts. It does not restart the child itself:
a restart in place would hide a crash loop from the orchestrator, which counts
restarts, backs off and alerts. The list of children is data: a worker joins
when MTP_REDIS_URL is set.

Each child gets only the secrets it uses. The framework and the worker run
tenant code: they never get the sidecar's secrets (JWT secret, LDAP bind
password), and get their own (MTP_SIDECAR_SECRET for the framework, the billing
webhook secret for both) over an inherited pipe, not in their environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import click
import jwt

from framework.cli import check_version_pin, resolve_tenant_dir, template_dir
from framework.devsecret import dev_jwt_secret
from framework.grace import StopBudget, stop_budget
from framework.rq_keys import ENV as RQ_PREFIX_ENV
from framework.rq_keys import prefix as rq_prefix
from framework.settings import SECRETS_FD_ENV, Settings
from framework.tenant_config import ConfigError, TenantConfig

CHILD_DIED = 3
CHILD_HUNG = 4
POLL_SECONDS = 0.1
READY_SECONDS = 30.0
DEV_TOKEN_TTL = 8 * 3600
PIPE_CAPACITY = 65536  # Linux's default pipe buffer: the secrets are written before the child runs

Address = tuple[str, int] | str


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process: an `mtp` subcommand, and where it answers /healthz."""

    name: str
    command: tuple[str, ...]
    health: Address | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "framework", *self.command]


def child_specs(settings: Settings) -> list[ChildSpec]:
    """What `mtp run` starts, in start order; the last one (the sidecar) stops first."""
    specs = [ChildSpec("framework", ("framework",), settings.upstream),
             ChildSpec("sidecar", ("sidecar",), settings.listen)]
    if settings.redis_url:  # shared jobs: this replica also runs queued ones (mtp worker)
        # No health endpoint: a worker that stops is found by its death, a job that
        # hangs by the worker's own heartbeat monitor.
        specs.insert(1, ChildSpec("worker", ("worker",)))
    return specs


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child only
    # Linux: a child whose supervisor is SIGKILLed gets SIGTERM instead of living on.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def become_subreaper() -> bool:
    """Adopt our children's orphans (Linux), so that killed grandchildren are reaped here.

    A gunicorn worker killed with its master is re-parented; without this it would
    go to an init that may never reap it (a container's), and a zombie's pid still
    looks alive to the job reaper, which then never marks its jobs interrupted.
    """
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def reap_adopted(ours: set[int]) -> None:
    """Reap adopted orphans that have exited, leaving our own children to Popen."""
    while True:
        try:
            # WNOWAIT: look first, so that a child of ours is not reaped behind Popen's back.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in ours:
            return  # nothing exited, or one of ours did: the main loop sees that
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def reap_orphans(deadline: float) -> None:
    """After every child of ours is reaped: reap adopted orphans until none is left."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child at all: every one is reaped
        if pid == 0:
            time.sleep(POLL_SECONDS / 2)  # still dying (SIGKILL is not instant)


def _connect_target(address: Address) -> tuple[int, Address]:
    if isinstance(address, str):
        return socket.AF_UNIX, address
    host = "127.0.0.1" if address[0] in ("0.0.0.0", "") else address[0]
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, address[1])


def answers_health(address: Address, timeout: float) -> bool:
    """True if ``GET /healthz`` at ``address`` answers 200 within ``timeout``.

    Connecting is not enough: a stopped process's listen backlog still accepts.
    """
    family, target = _connect_target(address)
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(family) as sock:
            sock.settimeout(timeout)
            sock.connect(target)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                         b"Connection: close\r\n\r\n")
            head = b""
            while b"\r\n" not in head and len(head) < 64:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(64)
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return head.split(b" ", 2)[1:2] == [b"200"]


@dataclass
class HealthWatch:
    """Asks one child's /healthz every ``interval`` s on a daemon thread; counts misses.

    A probe waits up to ``interval`` for its answer, and only ``misses`` in a row
    make the child hung, so a brief stall (a GC pause, a busy moment) is tolerated.
    A child that has not answered yet is starting, not hung, for READY_SECONDS.
    """

    name: str
    address: Address
    interval: float
    started: float = field(default_factory=time.monotonic)
    missed: int = 0
    answered: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"health-{self.name}", daemon=True).start()

    def _loop(self) -> None:
        pause = self.interval
        while not self.done.wait(pause):
            began = time.monotonic()
            if answers_health(self.address, self.interval):
                self.answered, self.missed = True, 0
            elif self.answered or began - self.started > READY_SECONDS:
                self.missed += 1
            # A probe that waited out its timeout was the wait: the next one is due now.
            pause = max(0.0, self.interval - (time.monotonic() - began))


@dataclass
class Supervisor:
    """Starts children, watches them, drains them."""

    specs: list[ChildSpec]
    envs: Mapping[str, Mapping[str, str]]
    handed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    budget: StopBudget = field(default_factory=lambda: stop_budget(25))
    health_interval: float = 5.0
    health_misses: int = 3
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    watches: dict[str, HealthWatch] = field(default_factory=dict)
    signals: list[int] = field(default_factory=list)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)  # nothing else here: the main loop acts on it

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        # Own process group: a terminal's Ctrl-C reaches only us, and we can
        # stop each child's whole tree (gunicorn workers too).
        env = dict(self.envs[spec.name])
        handed = self.handed.get(spec.name)
        if not handed:
            return subprocess.Popen(spec.argv(), env=env, process_group=0,
                                    preexec_fn=_die_with_parent)
        payload = json.dumps(dict(handed)).encode()
        if len(payload) >= PIPE_CAPACITY:
            raise ConfigError("environment", SECRETS_FD_ENV, "the secrets to hand over are "
                              "too large for a pipe")
        read, write = os.pipe()
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(write, view):]
        finally:
            os.close(write)  # the child reads to EOF
        env[SECRETS_FD_ENV] = str(read)
        try:
            return subprocess.Popen(spec.argv(), env=env, process_group=0,
                                    preexec_fn=_die_with_parent, pass_fds=(read,))
        finally:
            os.close(read)

    def start(self) -> None:
        for spec in self.specs:
            self.procs[spec.name] = self._spawn(spec)
            if spec.health is not None:
                watch = HealthWatch(spec.name, spec.health, self.health_interval)
                watch.start()
                self.watches[spec.name] = watch

    def dead_child(self) -> tuple[str, int] | None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def hung_child(self) -> str | None:
        for name, watch in self.watches.items():
            if watch.missed >= self.health_misses:
                return name
        return None

    def wait(self) -> int:
        """Run until a signal, a dead or hung child; then drain. Returns the exit code."""
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
            hung = self.hung_child()
            if hung is not None:
                click.echo(f"mtp run: {hung} did not answer its health check "
                           f"{self.health_misses} times in a row; killing it and stopping",
                           err=True)
                self._kill(self.procs[hung])
                self.stop()
                return CHILD_HUNG
            reap_adopted({proc.pid for proc in self.procs.values()})
            time.sleep(POLL_SECONDS)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # The child's whole group (also its orphans), then reap it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def _drain(self, names: list[str], deadline: float) -> None:
        """SIGTERM ``names`` and wait until they are gone or ``deadline`` passes."""
        procs = [self.procs[n] for n in names if n in self.procs]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if self.signals.count(signal.SIGINT) > 1:
                return  # a second Ctrl-C: no more waiting
            time.sleep(POLL_SECONDS / 2)

    def stop(self) -> None:
        """Drain within the budget: the sidecar first, then the rest; kill what is left."""
        for watch in self.watches.values():
            watch.done.set()  # a draining child may refuse probes: it is not hung
        began = time.monotonic()
        front, *rest = [spec.name for spec in reversed(self.specs)]
        # The sidecar's drain, plus its second to cancel what is left and close.
        self._drain([front], began + self.budget.sidecar + 1)
        self._drain(rest, began + self.budget.kill_after)
        for proc in self.procs.values():
            self._kill(proc)
        reap_orphans(max(began + self.budget.total - 0.5, time.monotonic() + 0.5))


def child_env(settings: Settings, tenant_dir: Path, template: bool,
              tenant: TenantConfig) -> dict[str, str]:
    """The environment every child starts from: ours plus what `mtp run` decides."""
    env = dict(settings.environ)
    env["MTP_TENANT_DIR"] = str(tenant_dir)
    env["MTP_DATA_DIR"] = str(settings.data_dir)
    upstream = settings.upstream
    env["MTP_UPSTREAM"] = (f"unix:{upstream}" if isinstance(upstream, str)
                           else f"{upstream[0]}:{upstream[1]}")
    # RQ keys under the tenant's prefix in every child (framework/rq_keys.py): a data plane
    # can then run as the tenant's Redis ACL user, limited to mtp:<tenant>:*.
    env[RQ_PREFIX_ENV] = rq_prefix(tenant.tenant_id)
    if not env.get("MTP_SIDECAR_SECRET"):
        env["MTP_SIDECAR_SECRET"] = secrets.token_hex(32)  # per run, never printed
    if template and tenant.jwt.uses_hmac and not env.get(tenant.jwt.secret_env):
        env[tenant.jwt.secret_env] = dev_jwt_secret(settings.data_dir)
    return env


def sidecar_secrets(tenant: TenantConfig) -> set[str]:
    """Variables holding secrets only the sidecar uses."""
    return {"MTP_JWT_SECRET", tenant.jwt.secret_env, tenant.ldap.bind_password_env,
            "MTP_OPERATOR_JWT_SECRET"}


def framework_secrets(tenant: TenantConfig) -> set[str]:
    """Variables holding the framework's own secrets: verifying the sidecar, signing usage,
    the tokens of event sink routes."""
    return ({"MTP_SIDECAR_SECRET", tenant.billing.webhook_secret_env}
            | {r.sink_token_env for r in tenant.events.routes if r.sink_token_env})


def split_env(env: Mapping[str, str], tenant: TenantConfig, names: list[str]
              ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Each child's environment, and the secrets handed to it over a pipe.

    The sidecar runs no tenant code and gets everything but the webhook secret. The
    framework and the worker run tenant code: no secret of the sidecar, none of their
    own in the environment; theirs come over the pipe (the worker's: the webhook's).
    """
    own = framework_secrets(tenant)
    private = sidecar_secrets(tenant) | own
    envs: dict[str, dict[str, str]] = {}
    handed: dict[str, dict[str, str]] = {}
    for name in names:
        if name == "sidecar":
            keep = own - {"MTP_SIDECAR_SECRET"}
            envs[name] = {k: v for k, v in env.items() if k not in keep}
            continue
        envs[name] = {k: v for k, v in env.items() if k not in private}
        # The worker runs no HTTP (no sidecar secret) but exports usage like the framework.
        needs = own if name == "framework" else own - {"MTP_SIDECAR_SECRET"}
        handed[name] = {k: env[k] for k in sorted(needs) if env.get(k)}
    return envs, handed


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


def _accepting(listen: Address) -> bool:
    family, target = _connect_target(listen)
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
    specs = child_specs(settings)
    envs, handed = split_env(env, tenant, [spec.name for spec in specs])
    sup = Supervisor(specs, envs, handed, stop_budget(settings.grace_seconds),
                     settings.health_interval, settings.health_misses)
    sup.install()
    become_subreaper()
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
