"""`mtp pool`: LRU stop at MTP_POOL_MAX_PROCS; bundles added, replaced, removed live."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pool.support import DOMAIN, Pool, Tenant, publish, start_pool, stop_pool
from tests.pool.test_pool import bearer, gone, problem_type

pytestmark = pytest.mark.slow

ACME, GLOBEX, INITECH, HOOLI = Tenant("acme"), Tenant("globex"), Tenant("initech"), \
    Tenant("hooli")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[Pool]:
    # hooli's secrets are in the pool's environment, its bundle is not (yet).
    running = start_pool(tmp_path_factory.mktemp("pool-b"), "beta", [ACME, GLOBEX, INITECH],
                         MTP_POOL_MAX_PROCS="2", **HOOLI.env())
    running.tenants["hooli"] = HOOLI
    try:
        yield running
    finally:
        stop_pool(running)


def whoami(pool: Pool, tenant: Tenant) -> dict:
    r = pool.call("POST", "/services/whoami", bearer(tenant.token()), b"{}")
    assert r.status == 200, r.body
    return r.json()


def test_at_most_max_procs_run_and_the_least_recently_used_stops(pool: Pool) -> None:
    acme = whoami(pool, ACME)["pid"]
    globex = whoami(pool, GLOBEX)["pid"]
    whoami(pool, ACME)  # acme is now the more recently used one
    initech = whoami(pool, INITECH)["pid"]
    assert gone(globex), "the least recently used process is stopped"
    assert whoami(pool, ACME)["pid"] == acme
    assert whoami(pool, INITECH)["pid"] == initech
    assert whoami(pool, GLOBEX)["pid"] != globex  # comes back (stopping acme, the LRU)
    assert gone(acme)


class Loop(threading.Thread):
    """Calls one tenant's whoami until stopped; counts failures and versions seen."""

    def __init__(self, pool: Pool, tenant: Tenant) -> None:
        super().__init__(daemon=True)
        self.pool, self.tenant = pool, tenant
        self.stop_at = threading.Event()
        self.ok, self.failed, self.versions = 0, [], []

    def run(self) -> None:
        while not self.stop_at.is_set():
            r = self.pool.call("POST", "/services/whoami", {
                "Host": f"{self.tenant.id}.{DOMAIN}", **bearer(self.tenant.token())}, b"{}")
            if r.status == 200:
                self.ok += 1
                version = r.json()["version"]
                if not self.versions or self.versions[-1] != version:
                    self.versions.append(version)
            else:
                self.failed.append((r.status, r.body[:200]))
            time.sleep(0.01)


def test_bundles_added_replaced_and_removed_while_serving(pool: Pool) -> None:
    loop = Loop(pool, ACME)
    loop.start()
    try:
        time.sleep(0.5)
        r = pool.call("POST", "/services/whoami", bearer(HOOLI.token()), b"{}")
        assert r.status == 403 and problem_type(r).endswith("unknown-tenant")
        publish(pool.bundles, HOOLI)  # added
        assert whoami(pool, HOOLI)["tenant"] == "hooli"
        publish(pool.bundles, ACME, version="v2")  # replaced by an atomic rename
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and loop.versions[-1:] != ["v2"]:
            time.sleep(0.1)
        assert loop.versions == ["v1", "v2"]
        (pool.bundles / "hooli").unlink()  # removed
        r = pool.call("POST", "/services/whoami", bearer(HOOLI.token()), b"{}")
        assert r.status == 403 and problem_type(r).endswith("unknown-tenant")
        time.sleep(0.5)
    finally:
        loop.stop_at.set()
        loop.join(30)
    assert loop.failed == []
    assert loop.ok > 20


def test_a_broken_bundle_is_503_and_the_others_keep_serving(pool: Pool) -> None:
    impostor = pool.bundles / "badco"
    impostor.mkdir()
    (impostor / "tenant.toml").write_text('[tenant]\nid = "acme"\nname = "Not badco"\n')
    r = pool.call("POST", "/services/whoami", {"X-Tenant-ID": "badco"}, b"{}")
    assert r.status == 503 and problem_type(r)
    (impostor / "tenant.toml").write_text("[tenant\n")
    r = pool.call("POST", "/services/whoami", {"X-Tenant-ID": "badco"}, b"{}")
    assert r.status == 503
    assert whoami(pool, GLOBEX)["tenant"] == "globex"
    # A bundle pinned to another framework version: its process refuses to start, 503.
    pinned = publish(pool.bundles, HOOLI, version="pinned")
    toml = pinned / "tenant.toml"
    toml.write_text(toml.read_text().replace('name = "Tenant hooli"',
                                             'name = "Tenant hooli"\nframework_version = "9.9.9"'))
    r = pool.call("POST", "/services/whoami", bearer(HOOLI.token()), b"{}")
    assert r.status == 503 and problem_type(r)
    (pool.bundles / "hooli").unlink()
    # An IPv6 literal Host names no tenant.
    r = pool.call("POST", "/services/whoami", {"Host": "[::1]:8080", **bearer(GLOBEX.token())},
                  b"{}")
    assert r.status == 200
    # A tenant whose secrets the pool lacks (HS256 without MTP_JWT_SECRET__<ID>): 503.
    publish(pool.bundles, Tenant("umbrella"))
    r = pool.call("POST", "/services/whoami", {"X-Tenant-ID": "umbrella"}, b"{}")
    assert r.status == 503


def test_all_processes_busy_is_503_saturated(pool: Pool) -> None:
    results: dict[str, int] = {}

    def slow(tenant: Tenant) -> None:
        r = pool.call("POST", "/services/slow", bearer(tenant.token()),
                      b'{"seconds": 3}')
        results[tenant.id] = r.status

    whoami(pool, ACME)
    whoami(pool, GLOBEX)  # both processes up: the slow calls below hold them
    threads = [threading.Thread(target=slow, args=(t,)) for t in (ACME, GLOBEX)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    r = pool.call("POST", "/services/whoami", bearer(INITECH.token()), b"{}")
    for t in threads:
        t.join(30)
    assert r.status == 503, r.body
    assert problem_type(r) and r.headers["Retry-After"] == "1"
    assert results == {"acme": 200, "globex": 200}
    assert whoami(pool, INITECH)["tenant"] == "initech"  # free again: LRU stopped


def test_a_tenant_process_that_died_is_started_again(pool: Pool) -> None:
    import os
    import signal

    master = whoami(pool, GLOBEX)["pid"]
    os.killpg(master, signal.SIGKILL)
    assert gone(master)
    deadline = time.monotonic() + 30
    while True:
        r = pool.call("POST", "/services/whoami", bearer(GLOBEX.token()), b"{}")
        if r.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # a 502 while the killed worker's connection is dropped
    assert r.status == 200 and r.json()["pid"] != master


def test_a_host_outside_the_pool_domain_names_no_tenant(pool: Pool) -> None:
    r = pool.call("POST", "/services/whoami", {"Host": "acme.elsewhere.test",
                                                **bearer(ACME.token())}, b"{}")
    assert r.status == 200 and r.json()["tenant"] == "acme"


def ppid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("PPid:")[1].split()[0])


def test_one_worker_has_no_master_and_several_have_one(pool: Pool, tmp_path) -> None:
    # The pool default (MTP_WORKERS=1): the worker's parent is the warm parent.
    alone = whoami(pool, ACME)["pid"]
    assert ppid(ppid(alone)) == pool.proc.pid
    running = start_pool(tmp_path, "gamma", [ACME], MTP_WORKERS="2")
    try:
        pids = {whoami(running, ACME)["pid"] for _ in range(10)}
        # With a master: worker -> gunicorn master -> warm parent -> pool.
        assert {ppid(ppid(ppid(p))) for p in pids} == {running.proc.pid}
    finally:
        stop_pool(running)


def test_admission_is_per_tenant_process(tmp_path) -> None:
    # One thread per tenant process: acme's second call waits, then 503; globex's runs.
    running = start_pool(tmp_path, "delta", [ACME, GLOBEX], MTP_THREADS="1")
    try:
        whoami(running, ACME)
        whoami(running, GLOBEX)
        held: list[int] = []
        slow = threading.Thread(target=lambda: held.append(running.call(
            "POST", "/services/slow", bearer(ACME.token()), b'{"seconds": 3}').status))
        slow.start()
        time.sleep(0.5)
        r = running.call("POST", "/services/whoami", bearer(ACME.token()), b"{}")
        assert r.status == 503 and problem_type(r).endswith("saturated")
        assert whoami(running, GLOBEX)["tenant"] == "globex"
        slow.join(30)
        assert held == [200]
        assert whoami(running, ACME)["tenant"] == "acme"
    finally:
        stop_pool(running)
