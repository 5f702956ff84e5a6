"""The gateway's routing table (tenant -> pool or dedicated service) as an nginx config.

The control plane serves this at ``GET /admin/gateway?format=nginx``; a test runs it
in a real nginx. nginx cannot read credentials, so it routes by what a request says
in the clear, in this order: the path prefix ``/tenants/<id>/``, ``Host:
<id>.<domain>``, ``X-Tenant-ID``. A request naming no routed tenant goes to the
``default`` target when there is one (its pool still checks everything: a
credential-only request is identified there), else it is answered 403
``unknown-tenant`` by nginx itself. The pool behind it checks every method again.

Switching a tenant (migration): render with its new target, write the file, then
``nginx -s reload``: new workers route to the new target while the old ones finish
their requests in flight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from framework.tenant_config import TENANT_ID_RE

TARGET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ADDRESS_RE = re.compile(r"^(unix:/[A-Za-z0-9_./-]+|[A-Za-z0-9.-]+:[0-9]{1,5}"
                        r"|\[[0-9a-fA-F:]+\]:[0-9]{1,5})$")
UNKNOWN = ('{"type":"urn:mtp:problem:unknown-tenant","title":"Forbidden",'
           '"status":403,"detail":"unknown tenant","request_id":"$request_id"}')


def _upstream(name: str) -> str:
    return "mtp_" + name.replace("-", "_")


def render_nginx(routes: Mapping[str, str], targets: Mapping[str, Sequence[str]], *,
                 domain: str, listen: str = "8080", default: str = "",
                 keepalive: int = 32) -> str:
    """The ``http {}`` part of an nginx config: upstreams, tenant maps and one server.

    ``routes`` maps tenant id -> target name (a pool, or a dedicated tenant's
    service); ``targets`` maps target name -> its addresses (``host:port`` or
    ``unix:/path``). Names and addresses are checked: nothing a tenant chose is
    written into the config unchecked.
    """
    for tenant, target in routes.items():
        if not TENANT_ID_RE.match(tenant):
            raise ValueError(f"bad tenant id {tenant!r}")
        if target not in targets:
            raise ValueError(f"tenant {tenant!r} routed to unknown target {target!r}")
    if default and default not in targets:
        raise ValueError(f"unknown default target {default!r}")
    lines: list[str] = []
    for name in sorted(targets):
        if not TARGET_RE.match(name) or not targets[name]:
            raise ValueError(f"bad target {name!r}")
        lines.append(f"upstream {_upstream(name)} {{")
        for address in targets[name]:
            if not ADDRESS_RE.match(address):
                raise ValueError(f"bad address {address!r} of {name!r}")
            lines.append(f"    server {address};")
        lines += [f"    keepalive {keepalive};", "}", ""]
    host = re.escape(domain.strip(".").lower())
    lines += [
        "map $uri $mtp_path_tenant {",
        '    default "";',
        r'    "~^/tenants/(?<t>[a-z0-9][a-z0-9-]{0,62})(/|$)" $t;',
        "}",
        "map $host $mtp_host_tenant {",
        '    default "";',
        *([rf'    "~^(?<t>[a-z0-9][a-z0-9-]{{0,62}})\.{host}$" $t;'] if host else []),
        "}",
        # The first method present names the tenant: path, then Host, then header.
        'map "$mtp_path_tenant:$mtp_host_tenant:$http_x_tenant_id" $mtp_tenant {',
        '    default "";',
        r'    "~^(?<t>[a-z0-9][a-z0-9-]{0,62}):" $t;',
        r'    "~^:(?<t>[a-z0-9][a-z0-9-]{0,62}):" $t;',
        r'    "~^::(?<t>[a-z0-9][a-z0-9-]{0,62})$" $t;',
        "}",
        "map $mtp_tenant $mtp_target {",
        f'    default "{_upstream(default) if default else ""}";',
    ]
    lines += [f"    {tenant} {_upstream(target)};" for tenant, target in sorted(routes.items())]
    lines += [
        "}",
        "",
        "server {",
        f"    listen {listen};",
        "    location @mtp_unknown_tenant {",
        "        default_type application/problem+json;",
        f"        return 403 '{UNKNOWN}';",
        "    }",
        "    location / {",
        '        if ($mtp_target = "") {',
        "            return 418;  # answered by @mtp_unknown_tenant",
        "        }",
        "        error_page 418 = @mtp_unknown_tenant;",
        "        proxy_pass http://$mtp_target;",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        "        proxy_set_header Host $host;",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def render_gateway_api(routes: Mapping[str, str], services: Mapping[str, tuple[str, int]], *,
                       domain: str, gateway: str = "mtp-gateway",
                       namespace: str = "") -> str:
    """The same table as Gateway API HTTPRoutes (YAML documents, written as JSON).

    Per tenant two routes to its target's Service: one by hostname
    (``<tenant>.<domain>``), one on any host by path prefix ``/tenants/<tenant>`` or
    header ``X-Tenant-ID`` (hostnames apply to every rule of a route, hence two).
    ``services`` maps target name -> (Service name, port). Switching a tenant is
    re-applying its two routes with the new backend.
    """
    docs: list[str] = []
    for tenant, target in sorted(routes.items()):
        if not TENANT_ID_RE.match(tenant):
            raise ValueError(f"bad tenant id {tenant!r}")
        if target not in services:
            raise ValueError(f"tenant {tenant!r} routed to unknown target {target!r}")
        name, port = services[target]
        backend = [{"name": name, "port": port}]
        parent: dict[str, str] = {"name": gateway}
        meta: dict[str, object] = {"labels": {"app.kubernetes.io/name": "mtp",
                                              "mtp.dev/tenant": tenant}}
        if namespace:
            meta["namespace"] = namespace
        by_host = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": f"mtp-tenant-{tenant}-host", **meta},
                   "spec": {"parentRefs": [parent],
                            "hostnames": [f"{tenant}.{domain.strip('.').lower()}"],
                            "rules": [{"backendRefs": backend}]}}
        by_path = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                   "metadata": {"name": f"mtp-tenant-{tenant}", **meta},
                   "spec": {"parentRefs": [parent], "rules": [{
                       "matches": [
                           {"path": {"type": "PathPrefix", "value": f"/tenants/{tenant}"}},
                           {"headers": [{"type": "Exact", "name": "X-Tenant-ID",
                                         "value": tenant}]}],
                       "backendRefs": backend}]}}
        docs += [json.dumps(by_host, indent=2), json.dumps(by_path, indent=2)]
    return "---\n".join(d + "\n" for d in docs)
