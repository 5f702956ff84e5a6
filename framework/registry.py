"""Service registry: a name -> a loaded, checked :class:`ServiceSpec`, cached.

Names are checked against ``SERVICE_NAME_RE`` before the filesystem is touched.
Modules are loaded from ``<tenant>/services/<name>.py`` by file location under
a private package name, never through ``sys.path``: a tenant's ``os.py`` or
``json.py`` can neither shadow the standard library nor be reached by asking
for ``os``. Three failures are told apart: no such service (404), the module
raised on import (500, file and line named), the module is not a usable service
(500, reason named).

``services/_x.py`` (a leading underscore) is a private helper: services import it
relatively (``from ._x import f`` or ``from . import _x``), as a submodule of the
same private package, so it resolves in ``mtp run``, ``mtp invoke``, an assembled
tree and the image alike. A helper is never a service: its name fails
``SERVICE_NAME_RE``, so it is refused (404) before the filesystem is asked and
never listed. In dev mode a changed helper reloads the services with it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import re
import sys
import threading
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cachetools
import jsonschema
import jsonschema.validators

from framework.errors import (
    Forbidden,
    NotFound,
    ServiceInvalid,
    ServiceLoadFailed,
    ServiceNotFound,
)
from framework.tenant_config import MODES, SERVICE_NAME_RE, TenantConfig

OPERATION_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
HELPER_NAME_RE = re.compile(r"_[a-z][a-z0-9_]{0,63}")
DEFAULT_TIMEOUT = 30.0
CACHE_SIZE = 1024

log = logging.getLogger("mtp.framework.registry")


@dataclass(frozen=True)
class ServiceSpec:
    """A loaded service: what the module declares, with tenant.toml overrides applied."""

    name: str
    description: str
    operations: tuple[str, ...]
    mode: str
    timeout: float
    validator: Any  # a jsonschema validator for the payload, or None
    handle: Callable[[Any], Any]
    fallback: Callable[[Any], Any] | None
    path: Path
    doc: str = ""  # the whole module docstring (description is its first line)

    def check_operation(self, operation: str | None) -> None:
        """404 unless ``operation`` is one of OPERATIONS (or absent when there are none)."""
        if self.operations and operation not in self.operations:
            raise NotFound(f"service {self.name!r} has no operation {(operation or '')[:80]!r}"
                           if operation else f"service {self.name!r} needs an operation: "
                           f"{', '.join(self.operations)}")
        if not self.operations and operation is not None:
            raise NotFound(f"service {self.name!r} takes no operation")

    def listing(self) -> dict[str, Any]:
        """The entry of ``GET /services``."""
        return {"name": self.name, "description": self.description,
                "operations": list(self.operations), "mode": self.mode}


def valid_name(name: str) -> bool:
    """True for a well-formed service name (fullmatch: no trailing newline sneaks in)."""
    return SERVICE_NAME_RE.fullmatch(name) is not None


def helper_name(name: str) -> bool:
    """True for a private helper module's name (``_x``)."""
    return HELPER_NAME_RE.fullmatch(name) is not None


def _where(exc: BaseException, path: Path) -> int | None:
    """The line of ``path`` where an import failed."""
    if isinstance(exc, SyntaxError) and exc.filename == str(path):
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    return line


class Registry:
    """Resolves and caches the services of one tenant directory."""

    def __init__(self, tenant_dir: Path, tenant: TenantConfig, dev: bool = False) -> None:
        self.services_dir = (Path(tenant_dir) / "services").resolve()
        self.tenant = tenant
        self.dev = dev
        # A package name private to this directory, so two tenants (or a tenant
        # and the stdlib) never share a module namespace.
        digest = hashlib.sha256(str(self.services_dir).encode()).hexdigest()[:12]
        self.package = f"mtp_services_{digest}"
        self._cache: cachetools.LRUCache[str, tuple[Any, Any]] = cachetools.LRUCache(CACHE_SIZE)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def rel(self, path: Path) -> str:
        """A service file as the tenant knows it: ``services/x.py``."""
        return f"services/{path.name}"

    def resolve(self, name: str) -> ServiceSpec:
        """The service called ``name``; raises the framework error that fits."""
        if not valid_name(name):
            raise ServiceNotFound(f"no service named {name[:80]!r}")
        settings = self.tenant.services.get(name)
        if settings is not None and not settings.enabled:
            raise Forbidden(f"service {name!r} is disabled")
        if not self.tenant.entitled(name):
            raise Forbidden(f"service {name!r} is not included in plan {self.tenant.plan!r}")
        with self._lock:
            entry = self._cache.get(name)
        if entry is not None and not self.dev:
            return self._unwrap(entry[1])
        path = self.services_dir / f"{name}.py"
        stamp = self._stamp(path)
        if stamp is None:
            raise ServiceNotFound(f"no service named {name!r}")
        if self.dev:
            stamp = (*stamp, self._helpers_stamp())
        if entry is not None and entry[0] == stamp:
            return self._unwrap(entry[1])
        with self._load_lock:
            with self._lock:
                entry = self._cache.get(name)
            if entry is None or entry[0] != stamp:
                entry = (stamp, self._load(name, path))
                with self._lock:
                    self._cache[name] = entry
        return self._unwrap(entry[1])

    @staticmethod
    def _unwrap(value: Any) -> ServiceSpec:
        # A failed load is cached too: its import side effects must not repeat per call.
        if isinstance(value, Exception):
            raise value
        return value

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        return (st.st_mtime_ns, st.st_size)

    def _helpers(self) -> list[Path]:
        if not self.services_dir.is_dir():
            return []
        return sorted(p for p in self.services_dir.glob("_*.py") if helper_name(p.stem))

    def _helpers_stamp(self) -> tuple[tuple[str, int, int], ...]:
        """What the helpers on disk look like: a change reloads every service (dev mode)."""
        return tuple((p.name, *(self._stamp(p) or (0, 0))) for p in self._helpers())

    def _forget_helpers(self) -> None:
        """Drop imported helpers so that the next import reads them again (dev mode)."""
        package = sys.modules.get(self.package)
        for modname in [m for m in sys.modules if m.startswith(f"{self.package}._")]:
            sys.modules.pop(modname, None)
            # `from . import _x` reads the package attribute before sys.modules.
            if package is not None and modname.count(".") == 1:
                package.__dict__.pop(modname.rpartition(".")[2], None)

    def _package(self) -> None:
        if self.package not in sys.modules:
            pkg = types.ModuleType(self.package)
            pkg.__path__ = [str(self.services_dir)]  # lets services import siblings relatively
            sys.modules[self.package] = pkg

    def _load(self, name: str, path: Path) -> ServiceSpec | Exception:
        """Import and check one module; the error is returned so it can be cached."""
        try:
            module = self._import(name, path)
            return self._spec(name, path, module)
        except (ServiceLoadFailed, ServiceInvalid) as exc:
            log.error("service %s unusable: %s", name, exc.detail,
                      extra={"error_id": exc.error_id, "service": name},
                      exc_info=exc.__cause__ if isinstance(exc, ServiceLoadFailed) else None)
            return exc

    def _import(self, name: str, path: Path) -> types.ModuleType:
        self._package()
        if self.dev:
            self._forget_helpers()
        modname = f"{self.package}.{name}"
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has one
            raise ServiceLoadFailed(f"{self.rel(path)}: cannot be loaded")
        module = importlib.util.module_from_spec(spec)
        # Registered so dataclasses and pickling inside the service find their module.
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(modname, None)
            raise self._import_failed(path, exc) from exc
        return module

    def _import_helper(self, path: Path) -> None:
        """Import one helper as the services do (through the package)."""
        self._package()
        try:
            importlib.import_module(f"{self.package}.{path.stem}")
        except (Exception, SystemExit) as exc:
            raise self._import_failed(path, exc) from exc

    def _import_failed(self, path: Path, exc: BaseException) -> ServiceLoadFailed:
        """The error for a module that raised on import: file, line, class, message."""
        line = _where(exc, path)
        at = f", line {line}" if line else ""
        reason = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        # The private package name means nothing to the tenant: say "services".
        reason = reason.replace(self.package, "services")[:200]
        return ServiceLoadFailed(
            f"{self.rel(path)}{at}: {type(exc).__name__} on import: {reason}")

    def _spec(self, name: str, path: Path, module: types.ModuleType) -> ServiceSpec:
        where = self.rel(path)
        handle = getattr(module, "handle", None)
        if not callable(handle):
            raise ServiceInvalid(f"{where}: no callable handle(context)")
        fallback = getattr(module, "fallback", None)
        if fallback is not None and not callable(fallback):
            raise ServiceInvalid(f"{where}: fallback is not callable")
        operations = getattr(module, "OPERATIONS", None) or ()
        if not isinstance(operations, (list, tuple)) or not all(
                isinstance(op, str) and OPERATION_RE.fullmatch(op) for op in operations):
            raise ServiceInvalid(
                f"{where}: OPERATIONS must be a list of names matching {OPERATION_RE.pattern}")
        mode = getattr(module, "MODE", "both")
        if mode not in MODES:
            raise ServiceInvalid(f"{where}: MODE must be one of {', '.join(MODES)}")
        timeout = getattr(module, "TIMEOUT", DEFAULT_TIMEOUT)
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout < math.inf):  # also refuses NaN: no deadline to wait for
            raise ServiceInvalid(f"{where}: TIMEOUT must be a positive number of seconds")
        validator = self._validator(where, getattr(module, "INPUT_SCHEMA", None))
        override = self.tenant.service(name)  # tenant.toml refuses inf/nan at load
        doc = (module.__doc__ or "").strip()
        return ServiceSpec(
            name=name,
            description=doc.splitlines()[0].strip() if doc else "",
            operations=tuple(operations),
            mode=override.mode or mode,
            timeout=float(override.timeout or timeout),
            validator=validator,
            handle=handle,
            fallback=fallback,
            path=path,
            doc=doc,
        )

    @staticmethod
    def _validator(where: str, schema: Any) -> Any:
        if schema is None:
            return None
        if not isinstance(schema, (dict, bool)):
            raise ServiceInvalid(f"{where}: INPUT_SCHEMA must be a JSON Schema object")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ServiceInvalid(f"{where}: INPUT_SCHEMA is not a valid schema: {exc.message}"
                                 ) from None
        return cls(schema)

    def names(self) -> list[str]:
        """Service names present on disk (well-formed file names only)."""
        if not self.services_dir.is_dir():
            return []
        return sorted(p.stem for p in self.services_dir.glob("*.py") if valid_name(p.stem))

    def available(self) -> list[ServiceSpec]:
        """Enabled services that load: what ``GET /services`` lists."""
        specs = []
        for name in self.names():
            try:
                specs.append(self.resolve(name))
            except (Forbidden, ServiceNotFound, ServiceLoadFailed, ServiceInvalid):
                continue
        return specs

    def problems(self) -> list[str]:
        """Every reason a service or helper module on disk is unusable (for ``mtp check``)."""
        found = []
        if self.services_dir.is_dir():
            for path in sorted(self.services_dir.glob("*.py")):
                if not (valid_name(path.stem) or helper_name(path.stem)
                        or path.stem == "__init__"):
                    found.append(f"{self.rel(path)}: not a valid service name "
                                 f"(must match {SERVICE_NAME_RE.pattern}) nor helper name "
                                 f"(_ then the same)")
        for path in self._helpers():
            # Imported on its own too: a broken helper no service imports yet must not ship.
            try:
                self._import_helper(path)
            except ServiceLoadFailed as exc:
                found.append(exc.detail)
        for name in self.names():
            # Disabled (or not entitled) services are checked too: they may be enabled later.
            loaded = self._load(name, self.services_dir / f"{name}.py")
            if isinstance(loaded, (ServiceLoadFailed, ServiceInvalid)):
                found.append(loaded.detail)
        for name in self.tenant.services:
            if not (self.services_dir / f"{name}.py").is_file():
                found.append(f"tenant.toml: services.{name}: no module services/{name}.py")
        return found
