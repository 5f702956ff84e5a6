"""A real nginx in front of two pools: routing by Host, path and header; a tenant
moved from pool alpha to pool beta with `nginx -s reload` under a steady request
loop, with no failed request (issue 16, migration)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from framework.pool.gateway import render_nginx
from tests.helpers import free_port, require_binary, stop, wait_for_port
from tests.pool.support import DOMAIN, Pool, Tenant, start_pool, stop_pool
from tests.pool.test_pool import bearer, problem_type

ACME, GLOBEX = Tenant("acme"), Tenant("globex")


def test_the_rendering_refuses_what_it_cannot_write_safely() -> None:
    targets = {"alpha": ["127.0.0.1:8081"]}
    with pytest.raises(ValueError, match="tenant id"):
        render_nginx({"Acme;": "alpha"}, targets, domain=DOMAIN)
    with pytest.raises(ValueError, match="unknown target"):
        render_nginx({"acme": "beta"}, targets, domain=DOMAIN)
    with pytest.raises(ValueError, match="bad address"):
        render_nginx({"acme": "alpha"}, {"alpha": ["1.2.3.4:80; include /etc/passwd"]},
                     domain=DOMAIN)
    with pytest.raises(ValueError, match="bad target"):
        render_nginx({}, {"al pha": ["127.0.0.1:1"]}, domain=DOMAIN)
    with pytest.raises(ValueError, match="default"):
        render_nginx({}, targets, domain=DOMAIN, default="beta")
    text = render_nginx({"acme": "alpha"}, {**targets, "dedicated-globex": ["unix:/run/g.sock"]},
                        domain=DOMAIN, default="alpha")
    assert "server unix:/run/g.sock;" in text and 'default "mtp_alpha";' in text


@dataclass
class Nginx:
    """A private nginx (its own config, pid, logs and temp paths)."""

    directory: Path
    port: int
    proc: subprocess.Popen
    binary: str

    def write(self, routes: str) -> None:
        (self.directory / "routes.conf").write_text(routes)

    def workers(self) -> set[int]:
        """The master's worker processes now."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                if f"\nPPid:\t{self.proc.pid}\n" in status:
                    found.add(int(entry.name))
        return found

    def reload(self) -> set[int]:
        """Reload gracefully; the old workers (they finish what they hold, then exit)."""
        old = self.workers()
        subprocess.run([self.binary, "-p", str(self.directory), "-c",
                        str(self.directory / "nginx.conf"), "-s", "reload"], check=True,
                       capture_output=True, timeout=30)
        return old


def start_nginx(directory: Path, routes: str) -> Nginx:
    binary = require_binary("nginx", "run `make servers` (nginx-light)")
    (directory / "tmp").mkdir(parents=True)
    d = directory
    user = "user root;\n" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(f"""{user}worker_processes 1;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    access_log {d}/access.log;
    include {d}/routes.conf;
}}
""")
    (d / "routes.conf").write_text(routes)
    proc = subprocess.Popen([binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-g",
                             "daemon off;"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return Nginx(d, 0, proc, binary)


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> Iterator[tuple[Pool, Pool]]:
    base = tmp_path_factory.mktemp("gateway")
    alpha = start_pool(base / "alpha", "alpha", [ACME, GLOBEX])
    try:
        beta = start_pool(base / "beta", "beta", [ACME])
    except BaseException:
        stop_pool(alpha)
        raise
    try:
        yield alpha, beta
    finally:
        stop_pool(beta)
        stop_pool(alpha)


@pytest.fixture
def nginx(pools, tmp_path) -> Iterator[Nginx]:
    alpha, beta = pools
    port = free_port()
    routes = render_nginx({"acme": "alpha", "globex": "alpha"},
                          {"alpha": [f"127.0.0.1:{alpha.port}"],
                           "beta": [f"127.0.0.1:{beta.port}"]},
                          domain=DOMAIN, listen=f"127.0.0.1:{port}")
    server = start_nginx(tmp_path / "nginx", routes)
    server.port = port
    try:
        wait_for_port(port, server.proc)
        yield server
    finally:
        stop(server.proc, sig=3)  # SIGQUIT: graceful


def via(nginx: Nginx, pool: Pool) -> Pool:
    """A client of the gateway (the Pool's call() with nginx's port)."""
    return Pool(pool.name, nginx.port, pool.bundles, pool.proc, pool.log, pool.run_dir)


def test_nginx_routes_by_host_path_and_header(pools, nginx: Nginx) -> None:
    alpha, _beta = pools
    gw = via(nginx, alpha)
    for headers, path in (({"Host": f"acme.{DOMAIN}"}, "/services/whoami"),
                          ({}, "/tenants/acme/services/whoami"),
                          ({"X-Tenant-ID": "acme"}, "/services/whoami")):
        r = gw.call("POST", path, {**headers, **bearer(ACME.token())}, b"{}")
        assert r.status == 200, r.body
        assert r.json()["tenant"] == "acme"
    r = gw.call("POST", "/services/whoami", {"Host": f"globex.{DOMAIN}",
                                              **bearer(GLOBEX.token())}, b"{}")
    assert r.status == 200 and r.json()["tenant"] == "globex"
    r = gw.call("POST", "/services/whoami", {"Host": f"nobody.{DOMAIN}"}, b"{}")
    assert r.status == 403 and problem_type(r).endswith("unknown-tenant")


class Loop(threading.Thread):
    """A steady request loop through the gateway; records failures and serving masters."""

    def __init__(self, gw: Pool) -> None:
        super().__init__(daemon=True)
        self.gw = gw
        self.halt = threading.Event()
        self.ok, self.failed, self.masters = 0, [], []

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                r = self.gw.call("POST", "/services/whoami", {
                    "Host": f"acme.{DOMAIN}", **bearer(ACME.token())}, b"{}", timeout=30)
            except OSError as exc:
                self.failed.append(repr(exc))
                continue
            if r.status == 200:
                self.ok += 1
                master = r.json()["pid"]
                if not self.masters or self.masters[-1] != master:
                    self.masters.append(master)
            else:
                self.failed.append((r.status, r.body[:200]))
            time.sleep(0.02)


def test_a_tenant_moves_between_pools_with_no_failed_request(pools, nginx: Nginx) -> None:
    alpha, beta = pools
    loop = Loop(via(nginx, alpha))
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and loop.ok < 20:
            time.sleep(0.05)
        source = loop.masters[-1]
        # 1. The target loads and warms the tenant (its /readyz starts the process).
        r = beta.call("GET", "/readyz", {"Host": f"acme.{DOMAIN}"})
        assert r.status == 200 and r.json()["tenant"] == "acme"
        target = beta.call("POST", "/services/whoami", bearer(ACME.token()), b"{}"
                           ).json()["pid"]
        assert target != source
        # 2. The gateway switches.
        nginx.write(render_nginx({"acme": "beta", "globex": "alpha"},
                                 {"alpha": [f"127.0.0.1:{alpha.port}"],
                                  "beta": [f"127.0.0.1:{beta.port}"]},
                                 domain=DOMAIN, listen=f"127.0.0.1:{nginx.port}"))
        old_workers = nginx.reload()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and loop.masters[-1] != target:
            time.sleep(0.05)
        assert loop.masters[-1] == target
        # 3. The gateway's old workers finish their requests and exit; then the source
        # stops serving the tenant (its process drains: calls in flight finish).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and old_workers & nginx.workers():
            time.sleep(0.05)
        assert not old_workers & nginx.workers()
        served, switched = loop.ok, len(loop.masters)
        (alpha.bundles / "acme").unlink()
        r = alpha.call("POST", "/services/whoami", bearer(ACME.token()), b"{}")
        assert r.status == 403 and problem_type(r).endswith("unknown-tenant")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and loop.ok < served + 20:
            time.sleep(0.05)
    finally:
        loop.halt.set()
        loop.join(30)
    assert loop.failed == []
    # While old and new gateway workers overlap both pools answer; after it, only beta.
    assert set(loop.masters) == {source, target}
    assert loop.masters[-1] == target and set(loop.masters[switched:]) <= {target}


def test_the_table_renders_as_gateway_api_routes() -> None:
    import yaml

    from framework.pool.gateway import render_gateway_api

    text = render_gateway_api({"acme": "alpha", "globex": "beta"},
                              {"alpha": ("mtp-pool-alpha", 80), "beta": ("mtp-pool-beta", 80)},
                              domain=DOMAIN, namespace="mtp")
    docs = list(yaml.safe_load_all(text))
    assert [d["metadata"]["name"] for d in docs] == [
        "mtp-tenant-acme-host", "mtp-tenant-acme", "mtp-tenant-globex-host",
        "mtp-tenant-globex"]
    assert docs[0]["spec"]["hostnames"] == [f"acme.{DOMAIN}"]
    assert docs[1]["spec"]["rules"][0]["matches"][0]["path"]["value"] == "/tenants/acme"
    assert docs[3]["spec"]["rules"][0]["backendRefs"] == [{"name": "mtp-pool-beta",
                                                           "port": 80}]
    with pytest.raises(ValueError, match="tenant id"):
        render_gateway_api({"A": "alpha"}, {"alpha": ("s", 80)}, domain=DOMAIN)
    with pytest.raises(ValueError, match="unknown target"):
        render_gateway_api({"acme": "x"}, {"alpha": ("s", 80)}, domain=DOMAIN)
