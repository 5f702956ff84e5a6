"""DESIGN.md's HTTP contract through the real `mtp run` (sidecar + framework on loopback)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run
from tests.sidecar.support import API_KEY, JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow

SERVICES = {
    "hello": '"""Says hello."""\n\n\ndef handle(context):\n    return {"hi": context.user}\n',
    "orders": '"""Orders."""\nOPERATIONS = ["create", "get", "purge"]\nMODE = "sync"\n\n\n'
              'def handle(context):\n    return {"op": context.operation}\n',
    "report": '"""Reports."""\nMODE = "async"\n\n\ndef handle(context):\n'
              '    return {"rows": 1}\n',
    "audit": '"""Admins only."""\n\n\ndef handle(context):\n    return {}\n',
}

TOML = f"""
[tenant]
id = "acme"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]
leeway = 0

[auth.api_keys.ci-bot]
hash = "sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}"
roles = ["deployer"]

[authz]
enabled = true

[[authz.rules]]
service = "hello"
operations = ["*"]

[[authz.rules]]
service = "orders"
operations = ["create", "get"]
groups = ["sales"]

[[authz.rules]]
service = "report"
operations = ["*"]
users = ["ci-bot"]

[[authz.rules]]
service = "*"
operations = ["*"]
roles = ["admin"]

[limits]
rate = 10000
burst = 10000
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    root: Path = tmp_path_factory.mktemp("conformance-http")
    tdir = root / "tenant"
    (tdir / "services").mkdir(parents=True)
    (tdir / "tenant.toml").write_text(TOML)
    for name, source in SERVICES.items():
        (tdir / "services" / f"{name}.py").write_text(source)
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET)
    stack = start_run(root, tdir, env)
    try:
        yield stack
    finally:
        stop(stack.proc)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def listing(run: RunStack, headers: dict[str, str]) -> dict[str, list[str]]:
    reply = run.call("GET", "/services", headers)
    assert reply.status == 200
    return {s["name"]: s["operations"] for s in reply.json()["services"]}


def test_service_list_holds_only_what_the_caller_may_invoke(run: RunStack):
    # Everyone may call hello; sales may create and get orders (not purge).
    assert listing(run, bearer(token("bob"))) == {"hello": []}
    assert listing(run, bearer(token("sam", groups=["sales"]))) == {
        "hello": [], "orders": ["create", "get"]}
    assert listing(run, {"X-API-Key": API_KEY}) == {"hello": [], "report": []}
    assert listing(run, bearer(token("root", roles=["admin"]))) == {
        "audit": [], "hello": [], "orders": ["create", "get", "purge"], "report": []}
    # What is listed can be called; what is not listed is refused.
    sam = bearer(token("sam", groups=["sales"]))
    assert run.call("POST", "/services/orders/get", sam, b"{}").status == 200
    assert run.call("POST", "/services/orders/purge", sam, b"{}").status == 403
    assert run.call("POST", "/services/audit", sam, b"{}").status == 403


def test_request_id_kept_when_well_formed_else_replaced(run: RunStack):
    good = "a.Z-9_" * 21 + "xy"  # 128 characters
    for headers in ({}, bearer(token("bob"))):  # an error (401) and a success
        kept = run.call("GET", "/services/hello", {**headers, "X-Request-ID": good})
        assert kept.headers["X-Request-ID"] == good
        for bad in (good + "x", "has space", "semi;colon"):
            fresh = run.call("GET", "/services/hello", {**headers, "X-Request-ID": bad})
            rid = fresh.headers["X-Request-ID"]
            assert rid != bad and 1 <= len(rid) <= 128
            if fresh.status >= 400:
                assert fresh.json()["request_id"] == rid


def test_sync_and_async_modes(run: RunStack):
    sam = bearer(token("sam", groups=["sales"]))
    ignored = run.call("POST", "/services/orders/get", {**sam, "Prefer": "respond-async"}, b"{}")
    assert ignored.status == 200 and ignored.headers.get("Preference-Applied") is None
    refused = run.call("POST", "/services/orders/get?mode=async", sam, b"{}")
    assert refused.status == 400
    assert refused.headers["Content-Type"] == "application/problem+json"
    key = {"X-API-Key": API_KEY}
    job = run.call("POST", "/services/report", key, b"{}")
    assert job.status == 202
    body = job.json()
    assert body == {"job_id": body["job_id"], "status": "queued"}
    assert job.headers["Location"] == f"/jobs/{body['job_id']}"
    # A job is the creator's (and admin's): 404 to anyone else.
    assert run.call("GET", job.headers["Location"], bearer(token("bob"))).status == 404
    assert run.call("GET", job.headers["Location"], key).status == 200
    assert run.call("GET", job.headers["Location"],
                    bearer(token("root", roles=["admin"]))).status == 200


def test_health_and_metrics_routes_answer_get_only(run: RunStack):
    admin = bearer(token("root", roles=["admin"]))
    for path in ("/healthz", "/readyz", "/metrics"):
        assert run.call("GET", path, admin).status == 200
        assert run.call("HEAD", path, admin).status == 200
        for method in ("POST", "DELETE", "PUT"):
            refused = run.call(method, path, {**admin, "X-Request-ID": "m-1"}, b"{}")
            assert refused.status == 405, (method, path)
            assert refused.headers["Content-Type"] == "application/problem+json"
            assert refused.headers["Allow"] == "GET, HEAD"
            assert refused.headers["X-Request-ID"] == "m-1"
            assert refused.json()["status"] == 405 and refused.json()["request_id"] == "m-1"
