"""Replicas for the Redis tests: complete `mtp run` processes sharing one redis-server."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from tests.helpers import base_env, free_port, stop

SIDECAR_SECRET = "sidecar-secret-for-redis-tests-0123456789"
JWT_SECRET = "jwt-secret-for-redis-tests-" + "0123456789" * 4
TENANT = "acme"

ECHO = '''"""Echo the payload (sync or async)."""


def handle(context):
    return {"echo": context.payload, "user": context.user, "pid": __import__("os").getpid()}
'''

SLEEPY = '''"""Sleep payload["s"] seconds; idempotent in tenant.toml (safe to rerun)."""
import time


def handle(context):
    time.sleep(float((context.payload or {}).get("s", 0.5)))
    return {"slept": (context.payload or {}).get("s", 0.5), "n": (context.payload or {}).get("n")}
'''

FRAGILE = '''"""Sleep payload["s"] seconds; not idempotent (a second run would be wrong)."""
import time


def handle(context):
    time.sleep(float((context.payload or {}).get("s", 0.5)))
    return {"done": True}
'''

STUCK = '''"""Blocks SIGALRM, then sleeps: like a handler stuck in C code, no timeout reaches it."""
import signal
import time


def handle(context):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(float((context.payload or {}).get("s", 30)))
    return {"woke": True}
'''

BROKEN = '''"""Always raises."""


def handle(context):
    raise ValueError("broken on purpose")
'''


def tenant_toml(limits: str) -> str:
    return f"""
[tenant]
id = "{TENANT}"
framework_version = "0.1.0"

[services.sleepy]
idempotent = true
timeout = 20

[services.fragile]
timeout = 20

[services.late]
timeout = 0.2

[services.stuck]
timeout = 1

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[limits]
{limits}
"""


def write_tenant(root: Path, limits: str) -> Path:
    tdir = root / "tenant"
    (tdir / "services").mkdir(parents=True, exist_ok=True)
    (tdir / "tenant.toml").write_text(tenant_toml(limits))
    for name, text in (("echo", ECHO), ("sleepy", SLEEPY), ("fragile", FRAGILE),
                       ("broken", BROKEN), ("late", FRAGILE), ("stuck", STUCK)):
        (tdir / "services" / f"{name}.py").write_text(text)
    return tdir


def token(sub: str = "alice", roles: tuple[str, ...] = ()) -> str:
    claims = {"sub": sub, "tenant_id": TENANT, "exp": int(time.time()) + 3600,
              "roles": list(roles)}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def auth(user: str = "alice", roles: tuple[str, ...] = ()) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, roles)}", "Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         body: Any = None, timeout: float = 30) -> Reply:
    """One request; ``body`` is JSON-encoded unless it is bytes."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


@dataclass
class Replica:
    """One `mtp run` (sidecar + framework + worker) with its own data dir and port."""

    name: str
    root: Path
    tenant_dir: Path
    redis_url: str
    port: int = 0
    proc: subprocess.Popen | None = None
    extra_env: dict[str, str] | None = None

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def env(self) -> dict[str, str]:
        data = self.root / f"{self.name}-data"
        env = base_env(
            MTP_LISTEN=f"127.0.0.1:{self.port}", MTP_DATA_DIR=str(data),
            MTP_UPSTREAM=f"unix:{data / 'fw.sock'}", MTP_SIDECAR_SECRET=SIDECAR_SECRET,
            MTP_JWT_SECRET=JWT_SECRET, MTP_REDIS_URL=self.redis_url, MTP_WORKERS="1",
            MTP_THREADS="8", MTP_JOB_WORKERS="2", MTP_LOG_LEVEL="WARNING",
            MTP_AUDIT_FILE=str(self.root / f"{self.name}-audit.log"))
        env.update(self.extra_env or {})
        return env

    def start(self, timeout: float = 30.0) -> Replica:
        return self.launch().ready(timeout)

    def launch(self) -> Replica:
        """Start `mtp run` without waiting (start several, then wait for each)."""
        self.port = self.port or free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "framework", "run", "--tenant-dir", str(self.tenant_dir)],
                env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self, timeout: float = 30.0) -> Replica:
        """Wait until /readyz answers 200 and the job workers are up."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if self.call("GET", "/readyz").status == 200 and self.workers_ready():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def workers_ready(self) -> bool:
        return "worker" in self.log.read_text(errors="replace")

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             body: Any = None) -> Reply:
        return call(self.port, method, path, headers, body)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole replica: every child's process group, then `mtp run` itself."""
        assert self.proc is not None
        groups = {os.getpgid(pid) for pid in descendants(self.proc.pid)}
        groups.discard(os.getpgid(0))
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), including ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def wait_job(replica: Replica, job_id: str, user: str = "alice", timeout: float = 30.0,
             until: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` on ``replica`` until the job reaches one of ``until``."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        reply = replica.call("GET", f"/jobs/{job_id}", auth(user))
        assert reply.status == 200, reply.body
        body = reply.json()
        if body["status"] in until:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {body.get('status')} after {timeout}s")
