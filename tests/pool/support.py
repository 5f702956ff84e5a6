"""A pool of tenants served by `mtp pool` as a subprocess, and its bundles."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jwt

from framework.assemble import assemble
from framework.pool.keys import derive_key, secret_name
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port

POOL_SECRET = "pool-secret-" + secrets.token_hex(8)
DOMAIN = "pool.test"

SPY = '''"""Reports what this process can see: its environment and secrets in its memory."""
import os
import re

PATTERN = re.compile(rb"pool-secret-[0-9a-f]{16}|jwtsecret-[a-z]+-[0-9a-f]{24}"
                     rb"|hooksecret-[a-z]+-[0-9a-f]{24}|(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


def handle(context):
    found = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1] or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(m.decode() for m in PATTERN.findall(chunk))
    with open("/proc/self/environ", "rb") as f:
        proc_environ = f.read().decode(errors="replace")
    return {"tenant": context.tenant_id, "environ": dict(os.environ),
            "proc_environ": proc_environ, "found": sorted(found)}
'''

WHOAMI = '''"""Who is calling, from which process, in which version."""
import os

VERSION = "{version}"


def handle(context):
    return {{"tenant": context.tenant_id, "user": context.user, "version": VERSION,
            "pid": os.getpid(), "method": context.auth_method}}
'''

SLOW = '''"""Sleeps a little: a call in flight (after burning ``burn`` seconds of CPU)."""
import time


def handle(context):
    end = time.process_time() + float(context.payload.get("burn", 0))
    while time.process_time() < end:
        pass
    time.sleep(float(context.payload.get("seconds", 0.5)))
    return {"tenant": context.tenant_id}
'''


@dataclass
class Tenant:
    """One tenant of the test pool, with its own credentials."""

    id: str
    jwt_secret: str = ""
    webhook_secret: str = ""
    api_key: str = ""

    def __post_init__(self) -> None:
        self.jwt_secret = self.jwt_secret or f"jwtsecret-{self.id}-{secrets.token_hex(12)}"
        self.webhook_secret = f"hooksecret-{self.id}-{secrets.token_hex(12)}"
        self.api_key = f"key-{self.id}-{secrets.token_hex(12)}"

    @property
    def key_digest(self) -> str:
        return hashlib.sha256(self.api_key.encode()).hexdigest()

    @property
    def signing_key(self) -> str:
        return derive_key(POOL_SECRET.encode(), self.id).decode()

    def token(self, *, tenant: str | None = None, key: str | None = None,
              roles: tuple[str, ...] = ("admin",), user: str = "alice") -> str:
        claims = {"sub": user, "tenant_id": tenant or self.id, "roles": list(roles),
                  "exp": int(time.time()) + 300}
        return jwt.encode(claims, key or self.jwt_secret, algorithm="HS256")

    def env(self) -> dict[str, str]:
        return {secret_name("MTP_JWT_SECRET", self.id): self.jwt_secret,
                secret_name("MTP_BILLING_SECRET", self.id): self.webhook_secret}


def write_source(directory: Path, tenant: Tenant, version: str = "v1") -> Path:
    """A tenant repository: tenant.toml and its services."""
    (directory / "services").mkdir(parents=True, exist_ok=True)
    (directory / "tenant.toml").write_text(f'''
[tenant]
id = "{tenant.id}"
name = "Tenant {tenant.id}"

[services.slow]
timeout = 10

[auth.jwt]
algorithms = ["HS256"]
secret_env = "MTP_JWT_SECRET"

[auth.api_keys.ci-bot]
hash = "sha256:{tenant.key_digest}"
roles = ["admin"]

[billing]
webhook_secret_env = "MTP_BILLING_SECRET"
''')
    (directory / "services" / "spy.py").write_text(SPY)
    (directory / "services" / "whoami.py").write_text(WHOAMI.format(version=version))
    (directory / "services" / "slow.py").write_text(SLOW)
    return directory


def publish(root: Path, tenant: Tenant, version: str = "v1") -> Path:
    """Assemble the tenant and swap it in: ``root/<id>`` is a symlink replaced by rename."""
    source = write_source(root.parent / "src" / f"{tenant.id}-{version}", tenant, version)
    release = root.parent / "releases" / f"{tenant.id}-{version}"
    assemble(source, release, run_tests=False, when=datetime.now(UTC), report=lambda _l: None)
    link = root / tenant.id
    tmp = root / f".{tenant.id}.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(release)
    os.replace(tmp, link)  # atomic: a reader sees the old release or the new one
    return release


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Pool:
    """A running `mtp pool`."""

    name: str
    port: int
    bundles: Path
    proc: subprocess.Popen
    log: Path
    run_dir: Path
    tenants: dict[str, Tenant] = field(default_factory=dict)

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None, timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k: v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def socket_of(self, tenant: str) -> Path:
        """The unix socket of the tenant's live process."""
        found = sorted(self.run_dir.glob(f"{tenant}-*.sock"), key=lambda p: p.stat().st_mtime)
        assert found, f"no socket of {tenant}"
        return found[-1]


def start_pool(tmp: Path, name: str, tenants: list[Tenant], **env: str) -> Pool:
    """`mtp pool --name NAME --bundles tmp/bundles` with the tenants published."""
    bundles = tmp / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    for tenant in tenants:
        publish(bundles, tenant)
    port = free_port()
    extra = {"MTP_SIDECAR_SECRET": POOL_SECRET, "MTP_LISTEN": f"127.0.0.1:{port}",
             "MTP_DATA_DIR": str(tmp / "data"), "MTP_POOL_DOMAIN": DOMAIN,
             "MTP_GRACE_SECONDS": "6", "MTP_POOL_RUN_DIR": str(tmp / "run"),
             "MTP_LOG_LEVEL": "WARNING", **env}
    for tenant in tenants:
        extra.update(tenant.env())
    log = tmp / f"pool-{name}.log"
    proc = spawn([sys.executable, "-m", "framework", "pool", "--name", name,
                  "--bundles", str(bundles)], base_env(**extra), log=log)
    wait_for_port(port, proc, timeout=30)
    return Pool(name, port, bundles, proc, log, tmp / "run", {t.id: t for t in tenants})


def stop_pool(pool: Pool) -> None:
    stop(pool.proc, timeout=30)


def fleet_store(request) -> str:
    """The fleet's store of a fixture parametrized "redis" / "sqlite": a flushed
    redis-server's URL, or "" (the control plane's SQLite in its data dir)."""
    if request.param != "redis":
        return ""
    from redis import Redis

    url = request.getfixturevalue("redis_server").url
    Redis.from_url(url).flushdb()
    return url


@contextmanager
def fleet_pool(base: Path, plans: str, placed: list[tuple[Tenant, str, str]],
               tenants: list[Tenant], redis_url: str = "", **env: str) -> Iterator[tuple]:
    """A real `mtp control` (on ``redis_url``, else SQLite) registering each of ``placed``
    (tenant, plan, placement), and pool ``alpha`` in that fleet with ``tenants``' bundles."""
    from tests.control.fleet import ControlPlane

    cp = ControlPlane(base / "control", redis_url=redis_url, plans=plans).start()
    store = {"MTP_REDIS_URL": redis_url} if redis_url else {"MTP_DATA_DIR": str(cp.data_dir)}
    pool = None
    try:
        for tenant, plan, placement in placed:
            assert cp.call("POST", "/admin/tenants", {
                "id": tenant.id, "name": tenant.id, "plan": plan,
                "placement": placement}).status == 201
        pool = start_pool(base / "alpha", "alpha", tenants, **{**store, **env})
        yield pool, cp
    finally:
        if pool is not None:
            stop_pool(pool)
        cp.stop()
