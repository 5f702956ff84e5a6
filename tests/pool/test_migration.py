"""Migration without interruption, driven by `mtp control` (issue 16, "Migration").

Real processes: redis-server, `mtp control`, two `mtp pool`s (alpha, beta) holding
the same bundle of tenant acme, one dedicated `mtp run` for acme, a real nginx whose
routes come from `GET /admin/gateway?format=nginx`, kept current by
scripts/gateway-sync.py (the operator's sync job). Under a steady request loop
through nginx, acme moves pool:alpha -> pool:beta -> dedicated by PATCHes alone:
no request fails, the serving process changes as expected, a job submitted before
the moves is fetched after them, usage rows and the quota counter are all there.
A target that is down stays `warming` with the traffic on the source, and a PATCH
back cancels. The source refuses the tenant only once the migration is cleared.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.control.fleet import OPERATOR_KEY, ControlPlane
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.pool.support import Pool, Tenant, publish, start_pool, stop_pool
from tests.pool.test_gateway import Nginx, start_nginx
from tests.pool.test_pool import bearer, gone, problem_type
from tests.redis.stack import Replica, call

ACME = Tenant("acme")
DOMAIN = "fleet.test"  # the control plane's MTP_POOL_DOMAIN (tests/control/fleet.py)
GRACE = "6"  # MTP_GRACE_SECONDS: the drain after a switch (the least the stop budget allows)
SYNC = Path(__file__).resolve().parents[2] / "scripts" / "gateway-sync.py"

PLANS = """
[plans.std]
isolation = "process"
services = ["*"]
limits = { rate = 1000, burst = 1000, daily_quota = 1000000 }
"""


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.05)


@dataclass
class Fleet:
    cp: ControlPlane
    alpha: Pool
    beta: Pool
    dedicated: Replica
    nginx: Nginx
    sync: subprocess.Popen
    redis_url: str

    def record(self) -> dict[str, Any]:
        reply = self.cp.call("GET", "/admin/tenants/acme")
        assert reply.status == 200, reply.body
        return reply.json()

    def move(self, placement: str) -> dict[str, Any]:
        reply = self.cp.call("PATCH", "/admin/tenants/acme", {"placement": placement})
        assert reply.status == 200, reply.body
        return reply.json()

    def settled(self) -> dict[str, Any] | None:
        rec = self.record()
        return rec if "migration" not in rec else None


def acme_call(port: int, service: str = "whoami", body: Any = None, query: str = "") -> Any:
    return call(port, "POST", f"/services/{service}{query}",
                {"Host": f"acme.{DOMAIN}", **bearer(ACME.token()),
                 "Content-Type": "application/json"}, body if body is not None else {})


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory) -> Iterator[Fleet]:
    from redis import Redis

    Redis.from_url(redis_server.url).flushdb()
    base: Path = tmp_path_factory.mktemp("migration")
    url = redis_server.url
    nginx_port = free_port()
    ports = {"mtp-pool-gamma": free_port()}  # a pool that never comes up
    started: list[Callable[[], None]] = []
    try:
        # The tenant's processes (in either pool) use the fleet's Redis for jobs and usage.
        pool_env = {"MTP_REDIS_URL": url, "MTP_REDIS_URL__ACME": url,
                    "MTP_POOL_DOMAIN": DOMAIN, "MTP_GRACE_SECONDS": GRACE}
        (base / "dedicated" / "bundles").mkdir(parents=True)
        release = publish(base / "dedicated" / "bundles", ACME)
        dedicated = Replica("acme", base / "dedicated", release, url, extra_env={
            "MTP_JWT_SECRET": ACME.jwt_secret, "MTP_BILLING_SECRET": ACME.webhook_secret,
            "MTP_GRACE_SECONDS": GRACE,
            # RQ's keys under the tenant's prefix, as the pools' tenant processes use them
            # (framework/rq_keys.py): one queue of acme's jobs in every placement.
            "RQ_KEY_PREFIX": "mtp:acme:rq"})
        dedicated.launch()
        started.append(dedicated.stop)
        alpha = start_pool(base / "alpha", "alpha", [ACME], **pool_env)
        started.append(lambda: stop_pool(alpha))
        beta = start_pool(base / "beta", "beta", [ACME], **pool_env)
        started.append(lambda: stop_pool(beta))
        dedicated.ready(60)
        ports |= {"mtp-pool-alpha": alpha.port, "mtp-pool-beta": beta.port,
                  "mtp-acme": dedicated.port}
        gateway_file = base / "gateway.toml"
        gateway_file.write_text(f'listen = "127.0.0.1:{nginx_port}"\n[backends]\n' + "".join(
            f'{name} = "127.0.0.1:{port}"\n' for name, port in sorted(ports.items())))
        cp = ControlPlane(base / "control", redis_url=url, plans=PLANS, extra_env={
            "MTP_GATEWAY_FILE": str(gateway_file), "MTP_GRACE_SECONDS": GRACE})
        cp.start()
        started.append(cp.stop)
        assert cp.call("POST", "/admin/tenants", {"id": "acme", "name": "Acme", "plan": "std",
                                                  "placement": "pool:alpha"}).status == 201
        table = cp.call("GET", "/admin/gateway?format=nginx")
        assert table.status == 200 and table.headers["ETag"]
        nginx = start_nginx(base / "nginx", table.body.decode())
        nginx.port = nginx_port
        started.append(lambda: stop(nginx.proc, sig=3))
        wait_for_port(nginx_port, nginx.proc)
        reload = f"{nginx.binary} -p {nginx.directory} -c {nginx.directory / 'nginx.conf'} " \
                 "-s reload"
        sync = spawn([sys.executable, str(SYNC), "--control", cp.url, "--out",
                      str(nginx.directory / "routes.conf"), "--reload", reload,
                      "--interval", "0.2"],
                     base_env(MTP_CONTROL_API_KEY=OPERATOR_KEY), log=base / "sync.log")
        started.append(lambda: stop(sync))
        yield Fleet(cp, alpha, beta, dedicated, nginx, sync, url)
    finally:
        for stopper in reversed(started):
            stopper()


@dataclass(eq=False)
class Loop(threading.Thread):
    """A steady request loop through nginx: every answer, its latency, its process."""

    port: int
    halt: threading.Event = field(default_factory=threading.Event)
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)  # t, s, status, pid
    failed: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)

    def run(self) -> None:
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                reply = acme_call(self.port)
            except OSError as exc:
                self.failed.append(repr(exc))
                continue
            took = time.monotonic() - started
            pid = reply.json().get("pid", 0) if reply.status == 200 else 0
            self.samples.append((started, took, reply.status, pid))
            if reply.status != 200:
                self.failed.append((reply.status, reply.body[:300]))
            time.sleep(0.02)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.samples if s[2] == 200)

    def last_pid(self) -> int:
        return self.samples[-1][3] if self.samples else 0

    def first_seen(self) -> list[int]:
        order: list[int] = []
        for _t, _s, _status, pid in self.samples:
            if pid and pid not in order:
                order.append(pid)
        return order

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def routed_to(fleet: Fleet) -> str:
    table = fleet.cp.call("GET", "/admin/gateway?format=nginx").body.decode()
    line = next(x for x in table.splitlines() if x.strip().startswith(f"acme.{DOMAIN} "))
    return line.split()[-1].rstrip(";")


def test_a_target_that_is_down_keeps_the_traffic_on_the_source(fleet: Fleet) -> None:
    loop = Loop(fleet.nginx.port)
    loop.start()
    try:
        wait_until(lambda: loop.ok >= 10, what="traffic through nginx")
        source = loop.last_pid()
        rec = fleet.move("pool:gamma")  # its backend address accepts no connection
        assert rec["placement"] == "pool:gamma"
        assert rec["migration"]["from"] == "pool:alpha" and rec["migration"]["state"] == "warming"
        rec = wait_until(lambda: (r := fleet.record())["migration"]["attempts"] >= 2 and r,
                         what="two failed readiness probes")
        assert rec["migration"]["state"] == "warming"
        assert rec["migration"]["last_error"].startswith("127.0.0.1:"), rec["migration"]
        assert routed_to(fleet) == "mtp-pool-alpha"
        served = loop.ok
        wait_until(lambda: loop.ok >= served + 10, what="more traffic")
        assert loop.last_pid() == source  # still alpha's process
        # Back to the source: cancelled (nothing was switched).
        rec = fleet.move("pool:alpha")
        assert rec["placement"] == "pool:alpha" and "migration" not in rec
        assert routed_to(fleet) == "mtp-pool-alpha"
        served = loop.ok
        wait_until(lambda: loop.ok >= served + 10, what="traffic after the cancel")
    finally:
        loop.stop()
    assert loop.failed == []
    assert set(loop.first_seen()) == {source}


def test_acme_moves_alpha_beta_dedicated_and_back_with_no_failed_request(fleet: Fleet) -> None:
    from redis import Redis

    loop = Loop(fleet.nginx.port)
    loop.start()
    switches: list[float] = []
    try:
        wait_until(lambda: loop.ok >= 20, what="traffic through nginx")
        alpha_pid = loop.last_pid()
        # A job submitted on alpha before the moves (acme's job worker in alpha runs it
        # from the shared Redis; it is fetched through the gateway after the moves).
        job = acme_call(fleet.nginx.port, "slow", {"seconds": 0.2}, "?mode=async")
        assert job.status == 202, job.body
        job_id = job.json()["job_id"]

        # 1. pool:alpha -> pool:beta
        rec = fleet.move("pool:beta")
        assert rec["migration"]["state"] == "warming" and routed_to(fleet) in (
            "mtp-pool-alpha", "mtp-pool-beta")
        rec = wait_until(lambda: (r := fleet.record()).get("migration", {}).get(
            "state") == "switched" and r, what="beta ready")
        # A new placement while the switch drains (6 s) is refused, not queued behind it.
        busy = fleet.cp.call("PATCH", "/admin/tenants/acme", {"placement": "pool:alpha"})
        assert busy.status == 409 and busy.json()["type"].endswith("migration-in-progress")
        assert int(busy.headers["Retry-After"]) >= 1
        # Switched: the table routes to beta, and alpha still serves acme while it drains.
        assert routed_to(fleet) == "mtp-pool-beta"
        assert acme_call(fleet.alpha.port).status == 200
        beta_pid = acme_call(fleet.beta.port).json()["pid"]
        wait_until(lambda: loop.last_pid() == beta_pid, what="traffic on beta")
        switches.append(time.monotonic())
        wait_until(fleet.settled, what="the migration to beta cleared")
        cleared = len(loop.samples)
        # Cleared: alpha refuses acme (its process drains and goes).
        refused = acme_call(fleet.alpha.port)
        assert refused.status == 403 and problem_type(refused).endswith("unknown-tenant")
        assert gone(alpha_pid)  # acme's process in alpha stopped
        assert acme_call(fleet.beta.port).status == 200

        # 2. pool:beta -> dedicated
        fleet.move("dedicated")
        wait_until(lambda: fleet.record().get("migration", {}).get("state") == "switched",
                   what="the dedicated stack ready")
        assert routed_to(fleet) == "mtp-acme"
        dedicated_pid = acme_call(fleet.dedicated.port).json()["pid"]
        wait_until(lambda: loop.last_pid() == dedicated_pid, what="traffic on dedicated")
        switches.append(time.monotonic())
        assert acme_call(fleet.beta.port).status == 200  # draining
        rec = wait_until(fleet.settled, what="the migration to dedicated cleared")
        assert rec["placement"] == "dedicated"
        refused = acme_call(fleet.beta.port)
        assert refused.status == 403 and problem_type(refused).endswith("unknown-tenant")
        assert gone(beta_pid)

        # 3. dedicated -> pool:alpha: the dedicated stack drains, then refuses acme.
        fleet.move("pool:alpha")
        wait_until(lambda: fleet.record().get("migration", {}).get("state") == "switched",
                   what="alpha ready again")
        assert acme_call(fleet.dedicated.port).status == 200  # draining
        back_pid = acme_call(fleet.alpha.port).json()["pid"]
        wait_until(lambda: loop.last_pid() == back_pid, what="traffic on alpha again")
        switches.append(time.monotonic())
        wait_until(fleet.settled, what="the migration to alpha cleared")
        refused = wait_until(lambda: (r := acme_call(fleet.dedicated.port)).status == 403
                             and r, what="the dedicated stack refuses acme")
        assert problem_type(refused).endswith("unknown-tenant")
        served = loop.ok
        wait_until(lambda: loop.ok >= served + 20, what="traffic after the moves")
    finally:
        loop.stop()

    assert loop.failed == []
    assert loop.first_seen() == [alpha_pid, beta_pid, dedicated_pid, back_pid]
    assert {s[3] for s in loop.samples[cleared:]} <= {beta_pid, dedicated_pid, back_pid}
    assert loop.samples[-1][3] == back_pid

    # The job submitted on alpha is there, done, through the gateway.
    def fetched() -> Any:
        reply = call(fleet.nginx.port, "GET", f"/jobs/{job_id}",
                     {"Host": f"acme.{DOMAIN}", **bearer(ACME.token())})
        return reply.status == 200 and reply.json()["status"] == "succeeded" and reply
    assert wait_until(fetched, what="the job").json()["result"] == {"tenant": "acme"}

    # Every call through nginx was counted once: usage rows and the daily quota counter
    # (the Redis limiter shared by both pools and the dedicated sidecar) lost none.
    total = loop.ok + 1 + 7  # the loop, the job, the direct calls answered 200
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    redis = Redis.from_url(fleet.redis_url)
    quota = int(redis.get(f"mtp:rl:acme\x00quota\x00{day}") or 0)
    assert quota >= total, (quota, total)
    calls = wait_until(lambda: (n := fleet.record()["usage"]["calls"]) >= total and n,
                       timeout=20, what="the usage rows")
    assert calls >= total

    # Audit: both switches and both ends, by the control plane.
    actions = [(x["action"], x["fields"].get("to")) for x in fleet.cp.audit_lines()
               if x["action"].startswith("tenant.migration")]
    assert actions == [("tenant.migration.switched", "pool:beta"),
                       ("tenant.migration.done", "pool:beta"),
                       ("tenant.migration.switched", "dedicated"),
                       ("tenant.migration.done", "dedicated"),
                       ("tenant.migration.switched", "pool:alpha"),
                       ("tenant.migration.done", "pool:alpha")]
    report(loop, switches)


def report(loop: Loop, switches: list[float]) -> None:
    """The run's requests, errors and latency, overall and within 2 s of each switch."""
    def line(name: str, samples: list[tuple[float, float, int, int]]) -> str:
        ms = sorted(s[1] * 1000 for s in samples)
        if not ms:
            return f"{name}: no requests"
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return (f"{name}: {len(ms)} requests, {sum(1 for s in samples if s[2] != 200)} errors, "
                f"latency p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, "
                f"max {ms[-1]:.1f} ms")
    print("\nmigration run:", line("all", loop.samples), sep="\n  ")
    for i, at in enumerate(switches, 1):
        near = [s for s in loop.samples if abs(s[0] - at) <= 2.0]
        print(" ", line(f"within 2 s of switch {i}", near))
