"""A real `mtp control` process for the tests, its plans file and operator credentials."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.redis.stack import Reply, call

OPERATOR_SECRET = "operator-secret-for-control-tests-0123456789abcdef"
OPERATOR_KEY = "opkey-0123456789abcdef0123456789abcdef"
TENANT_SECRET = "tenant-secret-for-control-tests-0123456789abcdef"

PLANS = """
[plans.free]
isolation = "shared"
services = ["*"]
limits = { rate = 10, burst = 10, user_rate = 5, concurrency = 2,
           daily_quota = 1000, daily_cpu_seconds = 60, degraded_rate = 1 }
prices = { currency = "EUR", per_call = 0.0002, per_cpu_second = 0.03, per_gb = 0.08 }

[plans.pro]
isolation = "dedicated"
services = ["echo", "report*"]
limits = { rate = 100, burst = 100 }
prices = { currency = "EUR", per_call = 0.001 }
"""


def operator_token(sub: str = "ops-alice", roles: tuple[str, ...] = ("platform-admin",),
                   secret: str = OPERATOR_SECRET, **extra: Any) -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 600, "roles": list(roles), **extra}
    return jwt.encode(claims, secret, algorithm="HS256")


def op_headers(**kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {operator_token(**kw)}",
            "Content-Type": "application/json"}


@dataclass
class ControlPlane:
    """`mtp control` on a free loopback port; ``redis_url`` '' means the SQLite backend."""

    root: Path
    redis_url: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    plans: str = PLANS
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def plans_file(self) -> Path:
        return self.root / "plans.toml"

    @property
    def audit_file(self) -> Path:
        return self.root / "admin-audit.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        keys = self.root / "operator-keys.toml"
        digest = hashlib.sha256(OPERATOR_KEY.encode()).hexdigest()
        keys.write_text(f'[keys.ci-robot]\nhash = "sha256:{digest}"\n')
        env = base_env(
            MTP_CONTROL_LISTEN=f"127.0.0.1:{self.port}", MTP_DATA_DIR=str(self.data_dir),
            MTP_PLANS_FILE=str(self.plans_file), MTP_OPERATOR_JWT_SECRET=OPERATOR_SECRET,
            MTP_OPERATOR_KEYS_FILE=str(keys), MTP_AUDIT_FILE=str(self.audit_file),
            MTP_POOL_DOMAIN="fleet.test", MTP_LOG_LEVEL="INFO")
        if self.redis_url:
            env["MTP_REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start(self) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.plans_file.exists():
            self.plans_file.write_text(self.plans)
        self.proc = spawn([sys.executable, "-m", "framework", "control"], self.env(),
                          log=self.root / "control.log")
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Reply:
        return call(self.port, method, path, op_headers() if headers is None else headers, body)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.audit_file.read_text().splitlines() if x.strip()]

    def wait_offboarded(self, tenant: str, timeout: float = 20.0) -> None:
        """Until the kept export exists (written before the purge) and the purge logged."""
        deadline = time.monotonic() + timeout
        log = self.root / "control.log"
        while time.monotonic() < deadline:
            if f"tenant {tenant} purged" in log.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{tenant} not purged:\n{log.read_text()[-2000:]}")
