"""Start the real `mtp run` on loopback for end-to-end tests (tests/e2e/test_run_*.py)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import base_env, free_port, stop
from tests.sidecar.support import API_KEY, JWT_SECRET, SIDECAR_SECRET, Reply, call

WHOAMI = '''"""Echo the context the framework built (minus the logger)."""


def handle(context):
    seen = {k: v for k, v in vars(context).items() if k not in ("logger", "flags", "call")}
    return {"tenant_id": context.tenant_id, "user": context.user,
            "groups": list(context.groups), "roles": list(context.roles),
            "auth_method": context.auth_method, "request_id": context.request_id,
            "payload": context.payload, "everything": repr(seen)}
'''

SLOW = '''"""Sleep for payload["s"] seconds."""
import time

MODE = "sync"


def handle(context):
    time.sleep(float((context.payload or {}).get("s", 0.5)))
    return {"slept": True}
'''


def tenant_toml(limits: str = "rate = 10000\nburst = 10000") -> str:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    return f"""
[tenant]
id = "acme"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[auth.api_keys.ci-bot]
hash = "sha256:{digest}"
roles = ["deployer"]

[authz]
enabled = true

[[authz.rules]]
service = "whoami"

[[authz.rules]]
service = "slow"

[[authz.rules]]
service = "*"
roles = ["admin"]

[limits]
{limits}
"""


def write_tenant(root: Path, toml: str) -> Path:
    tdir = root / "tenant"
    (tdir / "services").mkdir(parents=True)
    (tdir / "tenant.toml").write_text(toml)
    (tdir / "services" / "whoami.py").write_text(WHOAMI)
    (tdir / "services" / "slow.py").write_text(SLOW)
    return tdir


@dataclass
class RunStack:
    proc: subprocess.Popen
    port: int
    root: Path
    socket: Path
    overlay: Path
    audit: Path
    log: Path

    def call(self, method: str, path: str, headers=None, body: bytes | None = None) -> Reply:
        return call(self.port, method, path, headers, body)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    return base_env(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(root / "data"),
                    MTP_UPSTREAM=f"unix:{root / 'fw.sock'}", MTP_AUDIT_FILE=str(root / "audit.log"),
                    MTP_CONFIG_OVERLAY=str(root / "overlay.toml"), MTP_WORKERS="1",
                    MTP_THREADS="8", MTP_LOG_LEVEL="WARNING", **extra)


def start_run(root: Path, tenant_dir: Path | None, env: Mapping[str, str],
              cwd: Path | None = None, timeout: float = 30.0) -> RunStack:
    """`mtp run` with output in root/run.log; returns once /readyz answers 200 and the
    banner naming the children is printed."""
    log = root / "run.log"
    args = [sys.executable, "-m", "framework", "run"]
    if tenant_dir is not None:
        args += ["--tenant-dir", str(tenant_dir)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, env=dict(env), cwd=cwd or root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    port = int(env["MTP_LISTEN"].rsplit(":", 1)[1])
    stack = RunStack(proc, port, root, root / "fw.sock", root / "overlay.toml",
                     root / "audit.log", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mtp run exited {proc.returncode}:\n{stack.output()}")
        try:
            # The banner line itself, not any log line that happens to say "children".
            if (stack.call("GET", "/readyz").status == 200
                    and re.search(r"children +\w+ pid \d+", stack.output())):
                return stack
        except OSError:
            pass
        time.sleep(0.1)
    stop(proc)
    raise TimeoutError(f"mtp run not ready:\n{stack.output()}")


def start_default(root: Path, toml: str | None = None, **extra: str) -> RunStack:
    """`mtp run` of the test tenant with the test secrets."""
    tdir = write_tenant(root, toml or tenant_toml())
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET, **extra)
    return start_run(root, tdir, env)


def pids_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found
