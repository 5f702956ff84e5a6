"""Where the gateway (and the control plane's readiness probes) reach each backend.

A placement routes to a backend name: ``mtp-pool-<name>`` for ``pool:<name>``,
``mtp-<tenant>`` for ``dedicated`` (the Kubernetes Services of deploy/). By default
its address is ``<name>:8080`` (the Service's DNS name). Off Kubernetes, and in tests,
``MTP_GATEWAY_FILE`` names a TOML file that maps names to ``host:port``, and says
where the rendered nginx server listens::

    listen = "127.0.0.1:8088"          # nginx's listen (default 80)

    [backends]
    mtp-pool-alpha = "10.0.0.5:8080"
    mtp-acme = "127.0.0.1:9001"

The file is read once at start; a mistake stops ``mtp control`` with the file, the key
and the reason. The rendered nginx config and the migration's readiness probes use
the same addresses, so what the control plane checked is what the gateway reaches.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from framework.tenant_config import ConfigError

PORT = 8080
NAME_RE = re.compile(r"^mtp-[a-z0-9][a-z0-9-]{0,70}$")
ADDRESS_RE = re.compile(r"^([A-Za-z0-9.-]{1,253}|\[[0-9a-fA-F:]{2,39}\]):[0-9]{1,5}$")
LISTEN_RE = re.compile(r"^(([A-Za-z0-9.-]{1,253}|\[[0-9a-fA-F:]{2,39}\]):)?[0-9]{1,5}$")


def backend_name(placement: str, tenant_id: str) -> str:
    """The backend (Service) a placement routes to."""
    if placement.startswith("pool:"):
        return f"mtp-pool-{placement[len('pool:'):]}"
    return f"mtp-{tenant_id}"


@dataclass(frozen=True)
class Backends:
    """Backend name -> address, with the Kubernetes default; the nginx listen."""

    addresses: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    listen: str = "80"

    def address(self, name: str) -> str:
        """``host:port`` of a backend (its Service on port 8080 unless the file says)."""
        return self.addresses.get(name, f"{name}:{PORT}")


def _port_ok(text: str) -> bool:
    return 1 <= int(text.rsplit(":", 1)[-1]) <= 65535


def load_backends(path: str) -> Backends:
    """The gateway file (``MTP_GATEWAY_FILE``); '' means the defaults."""
    if not path:
        return Backends()
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not TOML: {exc}") from None
    unknown = sorted(set(doc) - {"listen", "backends"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown key (listen, backends)")
    listen = doc.get("listen", "80")
    if not isinstance(listen, str) or not LISTEN_RE.match(listen) or not _port_ok(listen):
        raise ConfigError(path, "listen", 'expected "port" or "host:port"')
    table = doc.get("backends", {})
    if not isinstance(table, dict):
        raise ConfigError(path, "backends", "expected a table of name = \"host:port\"")
    addresses: dict[str, str] = {}
    for name, address in table.items():
        key = f"backends.{name}"
        if not NAME_RE.match(name):
            raise ConfigError(path, key, "a backend is mtp-pool-<name> or mtp-<tenant>")
        if not isinstance(address, str) or not ADDRESS_RE.match(address) \
                or not _port_ok(address):
            raise ConfigError(path, key, 'expected "host:port"')
        addresses[name] = address
    return Backends(MappingProxyType(addresses), listen)
