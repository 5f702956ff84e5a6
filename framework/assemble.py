"""Steps 3-4 of the tenant pipeline: check a tenant repository and build its runtime tree.

The runtime tree is what the image serves from ``/srv/tenant``::

    services/            the tenant's service modules
    tenant.toml          the tenant's config, unchanged
    requirements.txt     the tenant's extra dependencies (empty when it has none)
    manifest.json        tenant id, framework version, content hash, time

Services are checked exactly as ``mtp check`` checks them (the framework's
registry), in a child interpreter (``python -m framework.assemble --probe DIR``),
so a module that exits, hangs or pollutes ``sys.modules`` cannot take the
assembling process with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from framework import __version__
from framework.tenant_config import TenantConfig, load_tenant

MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
PROBE_TIMEOUT = 60.0
TEST_TIMEOUT = 900.0
NO_TESTS_COLLECTED = 5  # pytest's exit code for an empty suite
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")


class AssembleError(Exception):
    """A tenant that cannot be assembled; the message is one line per reason."""


class ServiceProblems(AssembleError):
    """Service modules ``mtp check`` would refuse; one reason per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class TestsFailed(AssembleError):
    """The tenant's own tests failed; carries pytest's output for the user."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, code: int, output: str) -> None:
        self.output = output
        super().__init__(f"tenant tests failed (pytest exit {code}); nothing was assembled")


@dataclass(frozen=True)
class Assembled:
    """What :func:`assemble` built."""

    out: Path
    manifest: Mapping[str, object]


def _probe_main(tenant_dir: str) -> None:
    """Child side of :func:`probe_services`: one JSON line {"names", "problems"} on stdout."""
    import logging

    from framework.registry import Registry

    # The reasons are reported by the parent, once; the registry's log lines would repeat them.
    logging.getLogger("mtp").handlers[:] = [logging.NullHandler()]
    logging.getLogger("mtp").propagate = False
    root = Path(tenant_dir)
    registry = Registry(root, load_tenant(root / "tenant.toml"))
    result = {"names": registry.names(), "problems": registry.problems()}
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def probe_services(tenant_dir: Path, python: str = sys.executable) -> list[str]:
    """Check every service as ``mtp check`` does, in a child interpreter; return the names.

    Uses the framework's own registry (the loader the runtime serves with), so a
    tree that assembles is a tree the runtime can load.
    """
    try:
        proc = subprocess.run(
            [python, "-m", "framework.assemble", "--probe", str(tenant_dir)],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT,
            env=_child_env(), cwd=tenant_dir, check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssembleError(
            f"importing the services took longer than {PROBE_TIMEOUT:.0f}s"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        # No report: a module ended the interpreter on import, or wrote over it at exit.
        raise AssembleError(
            f"importing the services ended the check without a report (exit {proc.returncode})"
        )
    if result["problems"]:
        raise ServiceProblems(result["problems"])
    if not result["names"]:
        raise AssembleError(f"{tenant_dir / 'services'}: no service modules (services/<name>.py)")
    return list(result["names"])


def run_tenant_tests(tenant_dir: Path, python: str = sys.executable) -> int:
    """Run the tenant's pytest suite; return pytest's exit code (0, or 5: none collected).

    Refuses when a test fails or errors.
    """
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TEST_TIMEOUT,
                              env=_child_env(), cwd=tenant_dir, check=False)
    except subprocess.TimeoutExpired:
        raise AssembleError(f"tenant tests took longer than {TEST_TIMEOUT:.0f}s") from None
    if proc.returncode not in (0, NO_TESTS_COLLECTED):
        raise TestsFailed(proc.returncode, proc.stdout + proc.stderr)
    return proc.returncode


def _child_env() -> dict[str, str]:
    # The children run tenant code: keep it from writing bytecode into the tenant repo.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def runtime_files(root: Path) -> list[Path]:
    """The files that make up a runtime tree, relative to ``root``, in a stable order."""
    files = [p.relative_to(root) for p in (root / "services").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")]
    files += [Path(n) for n in ("tenant.toml", REQUIREMENTS) if (root / n).is_file()]
    return sorted(files, key=lambda p: p.as_posix())


def content_hash(root: Path, files: Iterable[Path]) -> tuple[str, dict[str, str]]:
    """sha256 over (path, length, bytes) of each file in order, plus each file's own hash."""
    total = hashlib.sha256()
    per_file = {}
    for rel in files:
        data = (root / rel).read_bytes()
        per_file[rel.as_posix()] = hashlib.sha256(data).hexdigest()
        # Length-prefixing keeps "a"+"bc" and "ab"+"c" from hashing alike.
        total.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        total.update(data)
    return "sha256:" + total.hexdigest(), per_file


def build_manifest(cfg: TenantConfig, root: Path, when: datetime) -> dict[str, object]:
    """The manifest of a runtime tree: what it is, for which framework, and its hash."""
    digest, per_file = content_hash(root, runtime_files(root))
    return {
        "tenant_id": cfg.tenant_id,
        "tenant_name": cfg.name,
        "framework_version": __version__,
        "content_hash": digest,
        "files": per_file,
        "assembled_at": when.astimezone(UTC).isoformat(timespec="seconds"),
    }


def copy_tree(tenant_dir: Path, dest: Path) -> None:
    """Copy services, tenant.toml and requirements.txt (an empty one when absent)."""
    shutil.copytree(tenant_dir / "services", dest / "services", ignore=_IGNORED)
    shutil.copy2(tenant_dir / "tenant.toml", dest / "tenant.toml")
    reqs = tenant_dir / REQUIREMENTS
    if reqs.is_file():
        shutil.copy2(reqs, dest / REQUIREMENTS)
    else:
        (dest / REQUIREMENTS).write_text("# this tenant has no extra dependencies\n")


def prepare_out(out: Path) -> None:
    """Refuse to overwrite a folder that is not an earlier runtime tree."""
    if out.is_file():
        raise AssembleError(f"{out}: --out is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise AssembleError(f"{out}: not empty and not an assembled runtime tree; "
                            "refusing to overwrite it")


def assemble(tenant_dir: Path, out: Path, *, run_tests: bool = True,
             when: datetime | None = None,
             report: Callable[[str], None] | None = None) -> Assembled:
    """Check ``tenant_dir`` like ``mtp check``, run its tests, write the runtime tree to ``out``.

    ``report`` (optional) receives one progress line per step. ``out`` is replaced
    only once everything passed, so a refused tenant leaves an earlier tree intact.
    """
    from framework.cli import check_version_pin

    say = report or (lambda _line: None)
    tenant_dir, out = tenant_dir.resolve(), out.resolve()
    toml = tenant_dir / "tenant.toml"
    cfg = load_tenant(toml)
    check_version_pin(cfg.framework_version, str(toml))
    if not (tenant_dir / "services").is_dir():
        raise AssembleError(f"{tenant_dir}: no services/ folder")
    names = probe_services(tenant_dir)
    say(f"checked tenant {cfg.tenant_id}: {len(names)} services ({', '.join(names)})")
    if run_tests and (tenant_dir / "tests").is_dir():
        code = run_tenant_tests(tenant_dir)
        say("tenant tests passed" if code == 0 else "tenant tests/: no tests collected")
    prepare_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assemble-", dir=out.parent))
    try:
        copy_tree(tenant_dir, staging)
        manifest = build_manifest(cfg, staging, when or datetime.now(UTC))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"runtime tree written to {out} ({manifest['content_hash']})")
    return Assembled(out=out, manifest=manifest)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        _probe_main(sys.argv[2])
    else:
        sys.exit("usage: python -m framework.assemble --probe TENANT_DIR")
