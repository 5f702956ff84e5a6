"""The tenant pipeline's steps 1-4 with local git repositories, then the assembled runtime
served exactly as the image serves it (the Dockerfile's ENV, ENTRYPOINT and CMD).

(1) a tenant repository made from tenant_template (git init, commit); (2) this framework
cloned from the project's own repository and checked out at a tag; (3) tenant tests and
dependencies; (4) the clone's `mtp assemble` into the clone's build/runtime — the build
context docker/Dockerfile copies. Step 5 (the image itself) is scripts/image-test.sh.

No fresh venv (too slow): the clone runs on the base interpreter with PYTHONPATH = the
clone, then this venv's site-packages. Added that way, the venv's .pth files are not
run, so the editable install's import hook cannot fill a gap in the clone with a file
from the working tree: only committed code at the tag is exercised.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, base_env, free_port, spawn, stop, wait_for_port

pytestmark = pytest.mark.slow
# A git of its own: no user config (signing, hooks, default branch) changes what runs.
GIT_ENV = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "pipeline", "GIT_AUTHOR_EMAIL": "pipeline@example.org",
           "GIT_COMMITTER_NAME": "pipeline", "GIT_COMMITTER_EMAIL": "pipeline@example.org"}


def sh(args: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dockerfile_runtime(target: str = "") -> tuple[dict[str, str], list[str]]:
    """A stage's ENV (without PATH) and ENTRYPOINT + CMD of docker/Dockerfile, with what
    it inherits from the stages it is built FROM (default: the final stage)."""
    text = (ROOT / "docker/Dockerfile").read_text().replace("\\\n", " ")
    stages = {m.group(2): (m.group(1), body) for m, body in (
        (re.match(r"FROM (\S+) AS (\S+)", part), part)
        for part in re.split(r"^(?=FROM )", text, flags=re.M)[1:])}
    chain, name = [], target or list(stages)[-1]
    while name in stages:
        chain.insert(0, stages[name][1])
        name = stages[name][0]
    env: dict[str, str] = {}
    entry: list[str] = []
    cmd: list[str] = []
    for body in chain:
        for line in body.splitlines():
            if line.startswith("ENV "):
                env.update(pair.split("=", 1) for pair in line[4:].split())
            elif line.startswith("ENTRYPOINT "):
                entry, cmd = json.loads(line.split(" ", 1)[1]), []  # a new one resets CMD
            elif line.startswith("CMD "):
                cmd = json.loads(line.split(" ", 1)[1])
    env.pop("PATH", None)
    return env, entry + cmd


class Pipeline:
    """What steps 1-4 produced, and the runtime started from it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tenant = tmp / "tenant"
        self.framework = tmp / "framework"
        self.deps = tmp / "tenant-deps"
        self.runtime = self.framework / "build" / "runtime"
        self.python = getattr(sys, "_base_executable", "") or sys.executable
        path = [self.framework, self.deps, sysconfig.get_path("purelib"),
                sysconfig.get_path("platlib")]
        self.env = base_env(PYTHONPATH=os.pathsep.join(map(str, dict.fromkeys(path))),
                            PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", **GIT_ENV)
        self.jwt_secret = secrets.token_hex(32)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "run.log"

    def mtp(self, *args: str | Path, **extra: str) -> str:
        """The checked-out framework's CLI (what `mtp` is after `pip install ./framework`)."""
        return sh([self.python, "-m", "framework", *args], self.tmp, {**self.env, **extra})

    def step1_tenant_repo(self) -> None:
        shutil.copytree(ROOT / "tenant_template", self.tenant,
                        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
        sh(["git", "init", "-q", "-b", "main"], self.tenant, self.env)
        sh(["git", "add", "."], self.tenant, self.env)
        sh(["git", "commit", "-q", "-m", "tenant from template"], self.tenant, self.env)

    def step2_framework_at_tag(self, tag: str) -> None:
        sh(["git", "clone", "-q", ROOT, self.framework], self.tmp, self.env)
        sh(["git", "tag", "-f", tag, "HEAD"], self.framework, self.env)
        sh(["git", "checkout", "-q", tag], self.framework, self.env)

    def step3_install_and_test(self) -> None:
        sh([self.python, "-m", "pip", "install", "-q", "--target", self.deps,
            "-r", "requirements.txt"], self.tenant, self.env)
        sh([self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
           self.tenant, self.env)

    def step4_assemble(self) -> None:
        self.mtp("assemble", "--tenant-dir", self.tenant, "--out", self.runtime, "--skip-tests")

    def start(self) -> None:
        """The image's command and environment, with paths and port made local."""
        image_env, command = dockerfile_runtime()
        assert command[0] == "mtp"
        local = {"MTP_TENANT_DIR": str(self.runtime), "MTP_DATA_DIR": str(self.tmp / "data"),
                 "MTP_LISTEN": f"127.0.0.1:{self.port}"}
        assert set(local) <= set(image_env)
        env = {**self.env, **image_env, **local, "MTP_JWT_SECRET": self.jwt_secret}
        self.proc = spawn([self.python, "-m", "framework", *command[1:]], env, log=self.log,
                          cwd=self.tmp)
        wait_for_port(self.port, self.proc, timeout=60)

    def token(self, user: str) -> str:
        return self.mtp("token", "--user", user, MTP_TENANT_DIR=str(self.runtime),
                        MTP_JWT_SECRET=self.jwt_secret).strip()

    def request(self, path: str, body: object = None, token: str | None = None,
                method: str | None = None) -> tuple[int, dict[str, str], object]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    from framework import __version__

    p = Pipeline(tmp_path_factory.mktemp("pipeline"))
    p.step1_tenant_repo()
    p.step2_framework_at_tag(f"v{__version__}")
    p.step3_install_and_test()
    p.step4_assemble()
    p.start()
    yield p
    if p.proc is not None:
        stop(p.proc)


LOADED = """
import sys
import framework.app, framework.cli.run, framework.assemble, sidecar.app, sidecar.startup
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] in ("framework", "sidecar") and getattr(module, "__file__", None):
        print(module.__file__)
"""


def test_framework_is_the_tagged_clone(pipeline):
    from framework import __version__

    loaded = sh([pipeline.python, "-c", LOADED], pipeline.tmp, pipeline.env).split()
    assert loaded, "nothing of framework/ or sidecar/ was imported"
    outside = [f for f in loaded if not Path(f).is_relative_to(pipeline.framework)]
    assert not outside, f"modules loaded from outside the tagged clone: {outside}"
    described = sh(["git", "describe", "--tags", "--exact-match"], pipeline.framework,
                   pipeline.env)
    assert described.strip() == f"v{__version__}"
    assert pipeline.mtp("--version").strip() == f"mtp {__version__}"


def test_runtime_tree_is_in_the_build_context(pipeline):
    manifest = json.loads((pipeline.runtime / "manifest.json").read_text())
    assert manifest["tenant_id"] == "demo"
    assert manifest["framework_version"] == pipeline.mtp("--version").split()[1]
    assert sorted(p.name for p in (pipeline.runtime / "services").glob("*.py")) == [
        "hello.py", "orders.py", "report.py"]
    assert not (pipeline.runtime / "tests").exists()


def test_health_and_readiness_need_no_credentials(pipeline):
    assert pipeline.request("/healthz")[0] == 200
    status = None
    for _ in range(300):  # ready once the framework behind the sidecar answers
        status = pipeline.request("/readyz")[0]
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200


def test_service_through_the_sidecar_with_a_jwt(pipeline):
    token = pipeline.token("alice")
    status, headers, body = pipeline.request("/services/hello", {"name": "Pipeline"}, token)
    assert status == 200, body
    assert body == {"message": "Hello, Pipeline!", "tenant": "demo"}
    assert headers.get("X-Request-ID")
    status, _, order = pipeline.request("/services/orders/create", {"item": "book"}, token)
    assert status == 200, order
    assert order["created_by"] == "alice" and order["currency"] == "EUR"
    status, _, listing = pipeline.request("/services", token=token)
    assert status == 200
    assert {s["name"] for s in listing["services"]} == {"hello", "orders", "report"}


def test_no_token_is_refused_with_a_problem(pipeline):
    status, headers, body = pipeline.request("/services/hello", {"name": "x"})
    assert status == 401
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == 401 and body["request_id"]


def call(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                 data=json.dumps({"name": "Pool"}).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_the_pool_image_command_serves_the_runtime_tree_as_a_bundle(pipeline, tmp_path):
    """The pool target's ENV and command (docker/Dockerfile --target pool), paths made
    local, serve step 4's runtime tree as the bundle of its tenant."""
    image_env, command = dockerfile_runtime("pool")
    assert command[:2] == ["mtp", "pool"] and "MTP_TENANT_DIR" not in image_env
    bundles = tmp_path / "bundles"
    shutil.copytree(pipeline.runtime, bundles / "demo")
    args = [str(bundles) if a == "/srv/bundles" else a for a in command[1:]]
    assert str(bundles) in args
    port = free_port()
    local = {"MTP_DATA_DIR": str(tmp_path / "data"), "MTP_LISTEN": f"127.0.0.1:{port}"}
    assert set(local) <= set(image_env)
    env = {**pipeline.env, **image_env, **local, "MTP_SIDECAR_SECRET": secrets.token_hex(32),
           "MTP_POOL_DOMAIN": "pool.test", "MTP_JWT_SECRET__DEMO": pipeline.jwt_secret}
    proc = spawn([pipeline.python, "-m", "framework", *args], env, log=tmp_path / "pool.log",
                 cwd=tmp_path)
    try:
        wait_for_port(port, proc, timeout=60)
        bearer = {"Authorization": f"Bearer {pipeline.token('alice')}"}
        for path, headers in (("/tenants/demo/services/hello", bearer),
                              ("/services/hello", {"Host": "demo.pool.test", **bearer})):
            status, _, body = call(port, path, headers)
            assert (status, body) == (200, {"message": "Hello, Pool!", "tenant": "demo"}), body
        status, headers, body = call(port, "/services/hello", {"Host": "acme.pool.test"})
        assert status == 403 and body["type"].endswith("unknown-tenant"), body
        assert headers["Content-Type"].startswith("application/problem+json")
    finally:
        assert stop(proc, timeout=30) == 0, (tmp_path / "pool.log").read_text()[-3000:]


def test_sigterm_drains_and_exits_cleanly(pipeline):
    # Last in this module: `podman stop` / Kubernetes send SIGTERM and expect exit 0.
    assert stop(pipeline.proc, timeout=30) == 0, pipeline.log.read_text()[-3000:]
