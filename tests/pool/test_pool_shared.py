"""Isolation `shared`: tenants whose plan says so share one process of the pool.

A real `mtp control` (SQLite registry) and a real `mtp pool`: acme and initech are on
a `shared` plan, globex on a `process` plan. The shared tenants are answered by one
process, each by its own code and with its own jobs and usage; the shared group's key
signs for no process tenant, nor a process tenant's key for the shared process; a plan
change moves a tenant between the two; the shared process is reaped when idle.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from framework import signing
from framework.assemble import assemble
from framework.pool.shared import SHARED, SharedApps, shared_key
from tests.control.fleet import ControlPlane
from tests.helpers import eventually
from tests.pool.support import (
    POOL_SECRET,
    Pool,
    Tenant,
    fleet_pool,
    publish,
    write_source,
)
from tests.pool.test_pool import bearer, gone, problem_type

ACME, GLOBEX, INITECH = Tenant("acme"), Tenant("globex"), Tenant("initech")
DOMAIN = "fleet.test"  # the control plane's MTP_POOL_DOMAIN in tests/control/fleet.py
SHARED_KEY = shared_key(POOL_SECRET.encode()).decode()

PLANS = """
[plans.trusted]
isolation = "shared"
services = ["*"]
limits = { rate = 1000, burst = 1000 }

[plans.std]
isolation = "process"
services = ["*"]
limits = { rate = 1000, burst = 1000 }
"""

# A shared tenant's code that tries every key it finds in its process's memory (and
# the pool secret, were it there) on another tenant's unix socket.
FORGE = '''"""Signs a request to another socket with every key this process holds."""
import re
import socket

from framework import signing

HEX = re.compile(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])|pool-secret-[0-9a-f]{16}")


def found_keys():
    found = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1] or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                found.update(HEX.findall(mem.read(end - start)))
            except (OSError, ValueError, OverflowError):
                continue
    return sorted(k.decode() for k in found)


def status(path, key, tenant):
    body = b"{}"
    ident = {signing.REQUEST_ID: "forge", signing.TENANT: tenant, signing.USER: "mallory",
             signing.GROUPS: "", signing.ROLES: "admin", signing.AUTH_METHOD: "jwt"}
    target = "/services/whoami"
    headers = {**ident, **signing.sign(key.encode(), "POST", target, ident, body=body),
               "Host": "framework", "Content-Type": "application/json",
               "Content-Length": str(len(body)), "Connection": "close"}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(path)
        head = "".join(f"{k}: {v}\\r\\n" for k, v in headers.items())
        s.sendall(f"POST {target} HTTP/1.1\\r\\n{head}\\r\\n".encode() + body)
        return int(s.recv(4096).split(b" ", 2)[1])


FOUND = []  # kept from the scan (slow), tried by the next call (fast)


def handle(context):
    if not context.payload.get("socket"):
        FOUND[:] = found_keys()
        return {"keys": FOUND}
    keys = FOUND
    statuses = {k: status(context.payload["socket"], k, context.payload["tenant"])
                for k in keys[:400]}
    return {"keys": keys, "accepted": [k for k, s in statuses.items() if s != 401]}
'''


def publish_with_forge(root: Path, tenant: Tenant) -> None:
    """The tenant's bundle with the forge service too (swapped in as support.publish does)."""
    source = write_source(root.parent / "src" / f"{tenant.id}-forge", tenant, "v1")
    (source / "services" / "forge.py").write_text(FORGE)
    release = root.parent / "releases" / f"{tenant.id}-forge"
    assemble(source, release, run_tests=False, when=datetime.now(UTC), report=lambda _l: None)
    tmp = root / f".{tenant.id}.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(release)
    os.replace(tmp, root / tenant.id)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[Pool, ControlPlane]]:
    base: Path = tmp_path_factory.mktemp("pool-shared")
    (base / "overlays").mkdir()
    with fleet_pool(base, PLANS, [(ACME, "trusted", "pool:alpha"),
                                  (INITECH, "trusted", "pool:alpha"),
                                  (GLOBEX, "std", "pool:alpha")],
                    [ACME, GLOBEX, INITECH], MTP_POOL_DOMAIN=DOMAIN, MTP_POOL_IDLE="4",
                    MTP_LOG_LEVEL="INFO", MTP_CONFIG_OVERLAY=str(base / "overlays")) as started:
        publish_with_forge(started[0].bundles, ACME)
        yield started


def call(pool: Pool, tenant: Tenant, service: str = "whoami", payload: dict | None = None,
         **headers: str):
    return pool.call("POST", f"/services/{service}",
                     {"Host": f"{tenant.id}.{DOMAIN}", **bearer(tenant.token()), **headers},
                     json.dumps(payload or {}).encode())


def pid_of(pool: Pool, tenant: Tenant) -> int:
    reply = call(pool, tenant)
    assert reply.status == 200, reply.body
    assert reply.json()["tenant"] == tenant.id
    return int(reply.json()["pid"])


def shared_socket(pool: Pool) -> str:
    return str(pool.socket_of(SHARED))


def raw_call(sock: str, method: str, path: str, headers: dict[str, str],
             body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        "Host": "framework", "Connection": "close", "Content-Length": str(len(body)),
        **headers}.items())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, content = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    parsed = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), parsed, content


def signed(key: str, tenant: str, path: str = "/services/whoami", method: str = "POST",
           body: bytes = b"{}") -> dict[str, str]:
    ident = {signing.REQUEST_ID: "probe-1", signing.TENANT: tenant, signing.USER: "mallory",
             signing.GROUPS: "", signing.ROLES: "admin", signing.AUTH_METHOD: "jwt"}
    return {**ident, **signing.sign(key.encode(), method, path, ident, body=body),
            "Content-Type": "application/json"}


def test_shared_tenants_share_one_process_and_keep_their_own_code(fleet) -> None:
    pool, _cp = fleet
    eventually(lambda: call(pool, ACME).status == 200, timeout=60)
    pid_of(pool, INITECH)
    # Each shared tenant with a webhook secret joined the process once (replacing it);
    # from now on both are in the same one.
    acme, initech, globex = pid_of(pool, ACME), pid_of(pool, INITECH), pid_of(pool, GLOBEX)
    assert acme == initech
    assert globex != acme
    assert pid_of(pool, ACME) == acme  # still the same process
    # Each tenant's answer from its own code: acme's bundle has `forge`, initech's not.
    assert call(pool, INITECH, "forge").status == 404
    # The shared process holds each shared tenant's webhook secret, not a process
    # tenant's (those stay in their own process).
    seen = call(pool, ACME, "spy").json()
    assert ACME.webhook_secret in seen["found"] and INITECH.webhook_secret in seen["found"]
    assert GLOBEX.webhook_secret not in seen["found"]
    assert POOL_SECRET not in seen["found"] and POOL_SECRET not in seen["proc_environ"]
    assert ACME.signing_key not in seen["found"] and GLOBEX.signing_key not in seen["found"]
    assert seen["environ"].get("MTP_DATA_DIR", "").endswith("/shared")


def test_shared_tenants_keep_their_own_jobs_usage_and_log_lines(fleet) -> None:
    pool, _cp = fleet
    r = call(pool, ACME, "slow?mode=async", {"seconds": 0.1})
    assert r.status == 202, r.body
    job = r.json()["job_id"]
    eventually(lambda: pool.call("GET", f"/jobs/{job}", {
        "Host": f"acme.{DOMAIN}", **bearer(ACME.token())}).json()["status"] == "succeeded",
        timeout=30)
    theirs = pool.call("GET", f"/jobs/{job}", {"Host": f"initech.{DOMAIN}",
                                               **bearer(INITECH.token())})
    assert theirs.status == 404 and problem_type(theirs).endswith("not-found")

    def usage(tenant: Tenant) -> list[dict]:
        reply = pool.call("GET", "/usage", {"Host": f"{tenant.id}.{DOMAIN}",
                                            **bearer(tenant.token())})
        assert reply.status == 200, reply.body
        return reply.json()["rows"]

    eventually(lambda: any(x["service"] == "slow" for x in usage(ACME)), timeout=30)
    assert not any(x["service"] == "slow" for x in usage(INITECH))
    # Every line the shared process writes names the tenant of its request.
    for tenant in (ACME, INITECH):
        assert call(pool, tenant, **{"X-Request-ID": f"shared-log-{tenant.id}"}).status == 200

    def lines() -> list[dict]:
        out = []
        for line in pool.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"shared-log-' in line:
                out.append(json.loads(line))
        return out

    eventually(lambda: {d["request_id"] for d in lines() if d.get("msg") == "request"}
               >= {"shared-log-acme", "shared-log-initech"}, timeout=10)
    for doc in lines():
        assert doc["tenant"] == doc["request_id"].rsplit("-", 1)[1], doc


def test_the_shared_key_signs_for_no_process_tenant(fleet) -> None:
    pool, _cp = fleet
    assert call(pool, GLOBEX).status == 200 and call(pool, ACME).status == 200
    # acme's code tries every key its process holds on globex's socket: none works.
    assert call(pool, ACME, "forge").status == 200  # the scan of its memory (slow)
    assert call(pool, GLOBEX).status == 200  # globex's process is up for the tries
    globex_sock = str(pool.socket_of("globex"))
    reply = call(pool, ACME, "forge", {"socket": globex_sock, "tenant": "globex"})
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert SHARED_KEY in doc["keys"]  # it does find the shared group's key...
    assert doc["accepted"] == []  # ...which globex's process refuses, as every other
    status, _h, _b = raw_call(globex_sock, "POST", "/services/whoami",
                              signed(SHARED_KEY, "globex"), b"{}")
    assert status == 401
    # The shared process refuses a process tenant's key, and the pool secret.
    sock = shared_socket(pool)
    for key in (GLOBEX.signing_key, ACME.signing_key, POOL_SECRET):
        status, headers, body = raw_call(sock, "POST", "/services/whoami",
                                         signed(key, "acme"), b"{}")
        assert status == 401 and headers["Content-Type"] == "application/problem+json"
        assert json.loads(body)["request_id"]
    status, _h, body = raw_call(sock, "POST", "/services/whoami", signed(SHARED_KEY, "acme"),
                                b"{}")
    assert status == 200 and json.loads(body)["tenant"] == "acme"
    # Identity forgery among shared tenants is NOT prevented (docs/pools.md): the
    # shared key signs for initech too.
    status, _h, body = raw_call(sock, "POST", "/services/whoami",
                                signed(SHARED_KEY, "initech"), b"{}")
    assert status == 200 and json.loads(body)["tenant"] == "initech"


def test_metrics_and_overlays_stay_with_their_shared_tenant(fleet) -> None:
    pool, _cp = fleet
    assert call(pool, INITECH).status == 200 and call(pool, ACME).status == 200
    reply = pool.call("GET", "/metrics", {"Host": f"acme.{DOMAIN}", **bearer(ACME.token())})
    assert reply.status == 200, reply.body
    text = reply.body.decode()
    assert 'tenant="acme"' in text and 'tenant="initech"' not in text
    overlay = pool.bundles.parent.parent / "overlays" / "initech.toml"
    overlay.write_text("[limits]\nrate = 77\n")

    def versions(tenant: Tenant) -> str:
        reply = pool.call("GET", "/config/versions?diff=1", {
            "Host": f"{tenant.id}.{DOMAIN}", **bearer(tenant.token())})
        assert reply.status == 200, reply.body
        return json.dumps([v["diff"] for v in reply.json()["versions"]])

    try:
        # The shared process applies initech's own overlay file to initech's app only.
        eventually(lambda: '"limits.rate"' in versions(INITECH), timeout=20)
        assert '"limits.rate"' not in versions(ACME)
    finally:
        overlay.unlink()


@pytest.mark.parametrize("tenant", ["nosuch", "../acme", "-acme", "~shared", "ACME", "",
                                    "a" * 70])
def test_a_bad_tenant_name_at_the_shared_process_is_403(fleet, tenant: str) -> None:
    pool, _cp = fleet
    assert call(pool, ACME).status == 200
    status, headers, body = raw_call(shared_socket(pool), "POST", "/services/whoami",
                                     signed(SHARED_KEY, tenant), b"{}")
    assert status == 403, body
    assert headers["Content-Type"] == "application/problem+json"
    doc = json.loads(body)
    assert doc["type"].endswith("unknown-tenant") and doc["request_id"]
    assert "Traceback" not in body.decode()


def test_unsigned_requests_to_the_shared_process_are_refused(fleet) -> None:
    pool, _cp = fleet
    assert call(pool, ACME).status == 200
    sock = shared_socket(pool)
    status, headers, body = raw_call(sock, "POST", "/services/whoami",
                                     {"X-Tenant-ID": "acme"}, b"{}")
    assert status == 401 and headers["Content-Type"] == "application/problem+json"
    status, _h, body = raw_call(sock, "GET", "/healthz", {})
    assert status == 200 and json.loads(body)["shared"] is True
    # The sidecar's own calls name the tenant in a header of theirs: a client's is
    # stripped, so readiness through the pool still works.
    ready = pool.call("GET", "/readyz", {"Host": f"acme.{DOMAIN}",
                                         "X-Sidecar-Route-Tenant": "initech"})
    assert ready.status == 200 and ready.json()["tenant"] == "acme"


def test_a_plan_change_moves_a_tenant_between_shared_and_process(fleet) -> None:
    pool, cp = fleet
    shared = pid_of(pool, ACME)
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "std"}).status == 200
    eventually(lambda: pid_of(pool, ACME) != pid_of(pool, INITECH), timeout=20)
    own = pid_of(pool, ACME)
    assert own != pid_of(pool, GLOBEX)
    assert pool.socket_of("acme").exists()
    # The shared process dropped acme's webhook secret: it was replaced (docs/pools.md).
    assert pid_of(pool, INITECH) != own and gone(shared)
    assert cp.call("PATCH", "/admin/tenants/acme", {"plan": "trusted"}).status == 200
    eventually(lambda: pid_of(pool, ACME) == pid_of(pool, INITECH), timeout=20)
    assert gone(own), "its own process drained and stopped"


def test_the_idle_shared_process_is_reaped_and_comes_back(fleet) -> None:
    pool, _cp = fleet
    pid = pid_of(pool, INITECH)
    assert gone(pid, 30), "MTP_POOL_IDLE=4: the idle shared process stops"
    again = pid_of(pool, INITECH)
    assert again != pid
    assert pid_of(pool, ACME) == again


# -- the shared process's app in this process (the LRU, rebuilds, refusals) --------------


def whoami_headers(tenant: str, key: str = SHARED_KEY) -> dict[str, str]:
    return signed(key, tenant)


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[SharedApps]:
    from framework.settings import Settings

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for tenant in ("t1", "t2", "t3"):
        publish(bundles, Tenant(tenant))
    base = Settings.from_env(environ={"MTP_SIDECAR_SECRET": SHARED_KEY,
                                      "MTP_DATA_DIR": str(tmp_path / "shared"),
                                      "MTP_GRACE_SECONDS": "6"}, tenant_dir=bundles)
    made = SharedApps(base, bundles=bundles, tenants_dir=tmp_path / "tenants",
                      overlay_dir="", max_apps=2, idle=300)
    try:
        yield made
    finally:
        made.close()


def post(apps: SharedApps, tenant: str, key: str = SHARED_KEY):
    from werkzeug.test import Client

    return Client(apps).post("/services/whoami", headers=whoami_headers(tenant, key),
                             data=b"{}")


def test_the_shared_app_keeps_the_most_recently_used_tenant_apps(apps: SharedApps) -> None:
    before = threading.active_count()
    for tenant in ("t1", "t2"):
        reply = post(apps, tenant)
        assert reply.status_code == 200 and reply.json["tenant"] == tenant
    assert list(apps.apps) == ["t1", "t2"] and apps.builds == 2
    grown = threading.active_count() - before
    assert post(apps, "t1").status_code == 200  # t1 is now the most recent
    assert post(apps, "t3").status_code == 200  # over the bound: t2, the LRU, goes
    assert list(apps.apps) == ["t1", "t3"]
    # The evicted app's threads (reaper, events, usage, watchdog) stop.
    eventually(lambda: threading.active_count() - before <= grown, timeout=20)
    assert post(apps, "t2").status_code == 200 and apps.builds == 4  # built again
    # Each tenant's data in its own data dir.
    assert (apps.tenants_dir / "t1" / "jobs.sqlite3").exists()


def test_a_replaced_or_removed_bundle_is_noticed(apps: SharedApps, monkeypatch) -> None:
    import framework.pool.shared as shared

    monkeypatch.setattr(shared, "RECHECK", 0.0)
    assert post(apps, "t1").json["version"] == "v1"
    publish(apps.bundles, Tenant("t1"), "v2")
    assert post(apps, "t1").json["version"] == "v2"
    (apps.bundles / "t1").unlink()
    reply = post(apps, "t1")
    assert reply.status_code == 403 and reply.json["type"].endswith("unknown-tenant")
    assert reply.headers["Content-Type"] == "application/problem+json"


def test_the_shared_app_refuses_what_the_shared_key_did_not_sign(apps: SharedApps) -> None:
    reply = post(apps, "t1", Tenant("t1").signing_key)
    assert reply.status_code == 401 and reply.json["request_id"]
    assert apps.builds == 0  # refused before any tenant's code was loaded
    stale = signed(SHARED_KEY, "t1")
    stale.update(signing.sign(SHARED_KEY.encode(), "POST", "/services/whoami",
                              stale, now=time.time() - 3600, body=b"{}"))
    from werkzeug.test import Client

    assert Client(apps).post("/services/whoami", headers=stale,
                             data=b"{}").status_code == 503


def test_a_broken_bundle_is_503_and_idle_apps_close(apps: SharedApps, tmp_path: Path) -> None:
    broken = apps.bundles / "t9"
    broken.mkdir()
    (broken / "tenant.toml").write_text('[tenant]\nid = "other"\nname = "x"\n')
    reply = post(apps, "t9")
    assert reply.status_code == 503 and reply.json["type"].endswith("service-unavailable")
    assert post(apps, "t1").status_code == 200
    apps.idle = 0.0
    assert apps.sweep() == ["t1"] and not apps.apps
    apps.start()
    apps.stop_accepting()


def test_metrics_lines_of_other_tenants_are_dropped() -> None:
    from framework.pool.shared import _own_metrics

    text = (b'# HELP x\nmtp_requests_total{tenant="t1",service="a"} 1.0\n'
            b'mtp_requests_total{tenant="t2",service="a"} 2.0\nprocess_cpu 3.0\n')
    assert _own_metrics(text, "t1") == (b'# HELP x\nmtp_requests_total{tenant="t1",'
                                         b'service="a"} 1.0\nprocess_cpu 3.0\n')


def test_an_idle_app_with_an_event_delivery_due_soon_stays(apps: SharedApps) -> None:
    from tests.pool.test_wake import PENDING, delivery

    assert post(apps, "t1").status_code == 200 and post(apps, "t2").status_code == 200
    apps.idle = 1000.0
    for loaded in apps.apps.values():
        loaded.used -= 2000  # both idle for longer than that
    delivery(apps.tenants_dir, "t1", PENDING, time.time() + 100)  # due within the idle time
    assert apps.sweep() == ["t2"]
    assert list(apps.apps) == ["t1"]


def test_log_lines_name_the_request_tenant_or_the_thread_owner() -> None:
    import io
    import logging

    from framework import logs

    saved, handlers = dict(logs._process), list(logging.getLogger("mtp").handlers)
    stream = io.StringIO()
    try:
        logs.share(SHARED)
        log = logs.setup("INFO", "t1", stream=stream)  # a tenant app's setup: no effect
        assert logs.current_tenant() == SHARED
        token = logs.TENANT.set("t2")
        try:
            log.info("in a request of t2")
        finally:
            logs.TENANT.reset(token)
        stop = threading.Event()
        before = {t.ident for t in threading.enumerate() if t.ident is not None}
        thread = threading.Thread(target=lambda: (stop.wait(10), log.info("t3's thread")))
        thread.start()
        logs.claim_threads(before, "t3")  # started while t3's app was built
        stop.set()
        thread.join()
        log.info("the process itself")
        logs.claim_threads(before, "t4")  # no new thread; forgets the one that ended
        assert thread.ident not in logs._thread_tenants
    finally:
        logs._process.update(saved)
        logging.getLogger("mtp").handlers[:] = handlers
        logs._thread_tenants.clear()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["msg"], x["tenant"]) for x in lines] == [
        ("in a request of t2", "t2"), ("t3's thread", "t3"), ("the process itself", SHARED)]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_mtp_workers_apply_to_the_shared_process(tmp_path: Path) -> None:
    with fleet_pool(tmp_path, PLANS, [(ACME, "trusted", "pool:alpha"),
                                      (INITECH, "trusted", "pool:alpha")],
                    [ACME, INITECH], MTP_WORKERS="2", MTP_POOL_DOMAIN=DOMAIN) as (pool, _cp):
        eventually(lambda: call(pool, ACME).status == 200, timeout=60)
        pid_of(pool, INITECH)  # its webhook secret replaced the process once
        masters = {parent_of(pid_of(pool, tenant)) for tenant in (ACME, INITECH, ACME)}
        # A gunicorn master and its workers: every answer from a worker of one master.
        assert len(masters) == 1
        assert len(list(pool.run_dir.glob(f"{SHARED}-*.sock"))) == 1
