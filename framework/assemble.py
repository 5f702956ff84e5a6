"""Steps 3-4 of the tenant pipeline: check a tenant repository and build its runtime tree.

The runtime tree is what the image serves from ``/srv/tenant``::

    services/*.py        the tenant's service modules (helpers starting with "_" too)
    tenant.toml          the tenant's config, unchanged
    requirements.txt     the tenant's extra dependencies (empty when it has none)
    manifest.json        tenant id, framework version, content hash, time

Tenant code is imported in a child interpreter (``python -m framework.assemble
--probe DIR``), so a module that exits, hangs or pollutes ``sys.modules`` cannot
take the assembling process with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from framework import __version__
from framework.tenant_config import SERVICE_NAME_RE, TenantConfig, load_tenant

MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
PROBE_TIMEOUT = 60.0
TEST_TIMEOUT = 900.0
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")


class AssembleError(Exception):
    """A tenant that cannot be assembled; the message is one line for the user."""


@dataclass(frozen=True)
class Assembled:
    """What :func:`assemble` built."""

    out: Path
    manifest: Mapping[str, object]


def service_files(services_dir: Path) -> list[Path]:
    """Service modules in name order; files starting with ``_`` are private helpers."""
    return sorted(p for p in services_dir.glob("*.py") if not p.name.startswith("_"))


def check_names(services_dir: Path) -> list[str]:
    """Every service name matches SERVICE_NAME_RE, else refuse naming the file."""
    names = []
    for path in service_files(services_dir):
        if not SERVICE_NAME_RE.match(path.stem):
            raise AssembleError(
                f"services/{path.name}: service name {path.stem!r} must match "
                f"{SERVICE_NAME_RE.pattern}"
            )
        names.append(path.stem)
    if not names:
        raise AssembleError(f"{services_dir}: no service modules (services/<name>.py)")
    return names


def probe_module(path: Path) -> str:
    """Import one service file; '' when it has a callable ``handle``, else the reason."""
    spec = importlib.util.spec_from_file_location(f"mtp_probe_{path.stem}", path)
    if spec is None or spec.loader is None:
        return "cannot be loaded as a Python module"
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        return f"syntax error at line {exc.lineno}: {exc.msg}"
    except BaseException as exc:  # SystemExit too: any failure of tenant code is reported
        return f"raised {type(exc).__name__} on import: {exc}"
    if not callable(getattr(module, "handle", None)):
        return "has no callable handle(context)"
    return ""


def _probe_main(services_dir: str) -> None:
    """Child side of :func:`probe_services`: one JSON object {name: reason} on stdout."""
    root = Path(services_dir)
    # Services may import their private helpers (services/_common.py) by plain name.
    sys.path.insert(0, str(root))
    results = {p.stem: probe_module(p) for p in service_files(root)}
    sys.stdout.write("\n" + json.dumps(results) + "\n")


def probe_services(services_dir: Path, python: str = sys.executable) -> None:
    """Import every service in a child interpreter; refuse the first broken one."""
    try:
        proc = subprocess.run(
            [python, "-m", "framework.assemble", "--probe", str(services_dir)],
            capture_output=True, text=True, timeout=PROBE_TIMEOUT,
            env=_child_env(), cwd=services_dir.parent, check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssembleError(
            f"importing the services took longer than {PROBE_TIMEOUT:.0f}s"
        ) from None
    lines = proc.stdout.strip().splitlines()
    try:
        results = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        results = None
    if not isinstance(results, dict):
        # The child died before reporting: a module called sys.exit or os._exit on import.
        raise AssembleError(
            f"importing the services ended the interpreter (exit {proc.returncode})"
        )
    for name, reason in sorted(results.items()):
        if reason:
            raise AssembleError(f"services/{name}.py: {reason}")


NO_TESTS_COLLECTED = 5  # pytest's exit code for an empty suite


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


class TestsFailed(AssembleError):
    """The tenant's own tests failed; carries pytest's output for the user."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, code: int, output: str) -> None:
        self.output = output
        super().__init__(f"tenant tests failed (pytest exit {code}); nothing was assembled")


def _child_env() -> dict[str, str]:
    import os

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
    services_dir = tenant_dir / "services"
    if not services_dir.is_dir():
        raise AssembleError(f"{tenant_dir}: no services/ folder")
    names = check_names(services_dir)
    for configured in cfg.services:
        if configured not in names:
            raise AssembleError(f"{toml}: services.{configured}: no module "
                                f"services/{configured}.py")
    probe_services(services_dir)
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


if __name__ == "__main__":  # pragma: no branch - the probe child's entry point
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        _probe_main(sys.argv[2])
    else:
        sys.exit("usage: python -m framework.assemble --probe SERVICES_DIR")
