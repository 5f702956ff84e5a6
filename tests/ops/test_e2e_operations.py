"""Tenant operations end to end through the real `mtp run` (sidecar + gunicorn, 2 workers):
usage equals the calls made and is priced, the webhook gets each hour once, the live
overlay reaches both processes, the breaker degrades one service, composition obeys authz."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from framework.usage import HOUR, UsageStore, hour_of
from framework.webhook import idempotency_key
from tests.helpers import base_env, free_port, spawn, stop
from tests.ops.receiver import Receiver
from tests.ops.tenant import BILLING_SECRET, COOLDOWN, PRICES, SIDECAR_SECRET, make_tenant

pytestmark = pytest.mark.slow

JWT_SECRET = "ops-e2e-jwt-secret-0123456789abcdef"
PAST = [hour_of(time.time()) - k * HOUR for k in (7, 6, 5)]


def token(user: str = "alice", roles: tuple[str, ...] = ()) -> str:
    claims = {"sub": user, "tenant_id": "acme", "roles": list(roles),
              "exp": int(time.time()) + 600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    port: int
    env: dict[str, str]
    tenant: Path
    overlay: Path
    log: Path
    receiver: Receiver

    def call(self, method: str, path: str, body: Any = None, user: str = "alice",
             roles: tuple[str, ...] = (), headers: dict[str, str] | None = None) -> Reply:
        sent = {"Authorization": f"Bearer {token(user, roles)}"}
        sent.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            sent["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def mtp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "framework", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ops-e2e")
    receiver = Receiver(BILLING_SECRET.encode(), fail_first=3).start()
    tenant = make_tenant(tmp / "tenant", webhook_url=receiver.url)
    data = tmp / "data"
    UsageStore(data / "usage.db").add(
        [("acme", h, "hello", "", "old", 2, 1, 0.2, 0.1, 100, 200, 0.0) for h in PAST])
    port = free_port()
    env = base_env(MTP_LISTEN=f"127.0.0.1:{port}", MTP_DATA_DIR=str(data),
                   MTP_UPSTREAM=f"unix:{tmp / 'fw.sock'}", MTP_TENANT_DIR=str(tenant),
                   MTP_CONFIG_OVERLAY=str(tmp / "overlay.toml"), MTP_WORKERS="2",
                   MTP_THREADS="4", MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_JWT_SECRET=JWT_SECRET,
                   MTP_BILLING_SECRET=BILLING_SECRET, MTP_LOG_LEVEL="INFO")
    log = tmp / "run.log"
    proc = spawn([sys.executable, "-m", "framework", "run", "--tenant-dir", str(tenant)], env,
                 log=log)
    s = Stack(port, env, tenant, tmp / "overlay.toml", log, receiver)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")
        try:
            if s.call("GET", "/readyz").status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.1)
    yield s
    stop(proc)
    receiver.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def source(stack: Stack) -> str:
    """The id the stack's usage database exports under."""
    return UsageStore(Path(stack.env["MTP_DATA_DIR"]) / "usage.db").store_id[:12]


def write_overlay(path: Path, text: str) -> None:
    tmp = path.with_name(".overlay.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_usage_totals_equal_the_calls_made_and_match_the_price_table(stack: Stack) -> None:
    for i in range(6):
        assert stack.call("POST", "/services/echo", {"i": i}).status == 200
    for _ in range(2):
        assert stack.call("POST", "/services/boom", {}).status == 500
    jobs = [stack.call("POST", "/services/later", {"fail": i == 0}).json()["job_id"]
            for i in range(3)]
    assert eventually(lambda: all(
        stack.call("GET", f"/jobs/{j}").json()["status"] in ("succeeded", "failed")
        for j in jobs))
    since = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(time.time() - 60))

    def totals():
        answer = stack.call("GET", f"/usage?from={since}&group_by=service", roles=("admin",))
        assert answer.status == 200, answer.body
        rows = {r["service"]: r for r in answer.json()["rows"]}
        want = {"echo": 6, "boom": 2, "later": 3}
        return rows if all(rows.get(k, {}).get("calls") == v for k, v in want.items()) else None

    rows = eventually(totals)
    assert rows, "usage never matched the calls made"
    assert (rows["echo"]["errors"], rows["boom"]["errors"], rows["later"]["errors"]) == (0, 2, 1)
    for row in rows.values():
        price = (row["calls"] * PRICES["per_call"] + row["cpu_seconds"] * PRICES["per_cpu_second"]
                 + (row["bytes_in"] + row["bytes_out"]) / 1e9 * PRICES["per_gb"])
        assert row["cost"] == pytest.approx(price, rel=1e-4, abs=1e-6)
    assert stack.call("GET", "/usage").status == 403  # not an admin

    cli = stack.mtp("usage", "--format", "json", "--from", since, "--group-by", "service")
    assert cli.returncode == 0, cli.stderr
    by_cli = {r["service"]: r["calls"] for r in json.loads(cli.stdout)["rows"]}
    assert {k: by_cli[k] for k in ("echo", "boom", "later")} == {"echo": 6, "boom": 2, "later": 3}


def test_webhook_gets_every_finished_hour_exactly_once(stack: Stack) -> None:
    r = stack.receiver
    keys = {idempotency_key("acme", h, source(stack)) for h in PAST}
    assert eventually(lambda: keys <= set(r.accepted), timeout=20), r.requests
    time.sleep(1.5)  # further rounds in both workers send nothing again
    assert {k: r.deliveries[k] for k in keys} == dict.fromkeys(keys, 1)
    assert r.bad_signatures == 0 and r.requests >= 3 + len(keys)


def test_overlay_reaches_framework_and_sidecar_and_invalid_is_refused(stack: Stack) -> None:
    assert stack.call("POST", "/services/flagged", {}).json() == {"beta": False, "color": "blue"}
    write_overlay(stack.overlay, '[flags.beta]\nenabled = true\n'
                                 '[services.flagged.config]\ncolor = "red"\n')
    assert eventually(lambda: all(
        stack.call("POST", "/services/flagged", {}).json() == {"beta": True, "color": "red"}
        for _ in range(4)), timeout=5)

    write_overlay(stack.overlay, "[limits]\nrate = 'fast'\n")  # refused by both processes
    time.sleep(0.5)
    assert [stack.call("POST", "/services/flagged", {}).json()["color"] for _ in range(3)] == [
        "red"] * 3

    # authorization of a direct call is the sidecar's: a rule set without "flagged"
    write_overlay(stack.overlay, '[[authz.rules]]\nservice = "echo"\n')
    assert eventually(lambda: stack.call("POST", "/services/flagged", {}).status == 403,
                      timeout=5)
    assert stack.call("POST", "/services/echo", {}).status == 200
    write_overlay(stack.overlay, "")  # tenant.toml alone again
    assert eventually(lambda: stack.call("POST", "/services/flagged", {}).json() == {
        "beta": False, "color": "blue"}, timeout=5)

    versions = stack.call("GET", "/config/versions", roles=("admin",)).json()["versions"]
    assert len(versions) >= 3
    listed = stack.mtp("config", "versions", "--format", "json")
    assert json.loads(listed.stdout)["versions"][0]["id"] == versions[0]["id"]
    red = next(v["id"] for v in versions if v["id"] == versions[-1]["id"] + 1)
    rolled = stack.mtp("config", "rollback", str(red))
    assert rolled.returncode == 0, rolled.stderr
    assert eventually(lambda: stack.call("POST", "/services/flagged", {}).json() == {
        "beta": True, "color": "red"}, timeout=5)


def test_breaker_opens_falls_back_and_closes(stack: Stack) -> None:
    answers = []
    for _ in range(20):
        answers.append(stack.call("POST", "/services/flaky", {"fail": True}))
        if answers[-1].status == 200:
            break
    assert answers[0].status == 500
    assert answers[-1].json() == {"fallback": True, "user": "alice"}
    assert stack.call("POST", "/services/echo", {}).status == 200
    time.sleep(COOLDOWN + 0.1)
    assert [stack.call("POST", "/services/flaky", {}).json() for _ in range(4)] == [
        {"ok": True}] * 4


def test_composition_with_authz_and_depth_limit(stack: Stack) -> None:
    answer = stack.call("POST", "/services/composer", {"service": "echo", "payload": {"a": 1}},
                        headers={"X-Request-ID": "e2e-compose"})
    assert answer.status == 200
    assert answer.json()["inner"] == {"payload": {"a": 1}, "user": "alice",
                                      "request_id": "e2e-compose", "service": "echo"}
    assert stack.call("POST", "/services/composer", {"service": "secret"}).status == 403
    boss = stack.call("POST", "/services/composer", {"service": "secret"}, roles=("boss",))
    assert boss.status == 200 and boss.json()["inner"] == {"secret": 42}
    looped = stack.call("POST", "/services/loop", {})
    assert looped.status == 508
    assert looped.headers["Content-Type"] == "application/problem+json"
