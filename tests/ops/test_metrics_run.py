"""`GET /metrics` through the real `mtp run` (sidecar + gunicorn, 2 workers): who may scrape,
bounded labels under 1,500 made-up paths, one valid exposition with process_* of every process."""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, Reply, token

SCRAPER_KEY = "scraper-key-0123456789"
DEPLOYER_KEY = "deployer-key-0123456789"

ORDERS = '''"""Orders."""
OPERATIONS = ["create", "get"]


def handle(context):
    return {"op": context.operation}
'''
HELLO = '''"""Hello."""


def handle(context):
    return {"hello": context.user}
'''


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


TENANT = f"""
[tenant]
id = "acme"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]

[auth.api_keys.prometheus]
hash = "{digest(SCRAPER_KEY)}"
roles = ["metrics"]

[auth.api_keys.ci-bot]
hash = "{digest(DEPLOYER_KEY)}"
roles = ["deployer"]

[authz]
enabled = true

[[authz.rules]]
service = "hello"

[[authz.rules]]
service = "*"
roles = ["admin"]

[limits]
rate = 100000
burst = 100000
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunStack]:
    root = tmp_path_factory.mktemp("metrics-run")
    tdir = root / "tenant"
    (tdir / "services").mkdir(parents=True)
    (tdir / "tenant.toml").write_text(TENANT)
    (tdir / "services" / "orders.py").write_text(ORDERS)
    (tdir / "services" / "hello.py").write_text(HELLO)
    env = {**run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                     MTP_JWT_SECRET=JWT_SECRET), "MTP_WORKERS": "2"}
    stack = start_run(root, tdir, env)
    try:
        yield stack
    finally:
        stop(stack.proc)


def bearer(roles: tuple[str, ...] = ()) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles=list(roles))}"}


def admin() -> dict[str, str]:
    """A fresh admin token (one built at import expires in a long suite)."""
    return bearer(("admin",))


def scrape(run: RunStack, headers: dict[str, str] | None = None) -> str:
    reply = run.call("GET", "/metrics", headers or {"X-API-Key": SCRAPER_KEY})
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return reply.body.decode()


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Distinct label sets per family (a histogram's buckets are one set)."""
    return {(family.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")))
            for family in text_string_to_metric_families(text) for s in family.samples}


def problem(reply: Reply, status: int) -> dict:
    assert reply.status == status
    assert reply.headers["Content-Type"] == "application/problem+json"
    doc = json.loads(reply.body)
    assert doc["status"] == status and doc["request_id"] == reply.headers["X-Request-ID"]
    return doc


def test_only_roles_admin_and_metrics_may_scrape(run: RunStack) -> None:
    problem(run.call("GET", "/metrics"), 401)
    problem(run.call("GET", "/metrics", bearer()), 403)
    problem(run.call("GET", "/metrics", {"X-API-Key": DEPLOYER_KEY}), 403)
    problem(run.call("GET", "/metrics", bearer(("deployer", "metrics-reader"))), 403)
    assert "mtp_sidecar_requests_total" in scrape(run)  # an API key with role metrics
    assert "mtp_framework_requests_total" in scrape(run, admin())
    assert "mtp_sidecar_requests_total" in scrape(run, bearer(("metrics",)))


def test_made_up_paths_do_not_grow_the_series(run: RunStack) -> None:
    assert run.call("POST", "/services/orders/create", admin(), b"{}").status == 200
    assert run.call("GET", "/services/hello", bearer()).status == 200
    before = series(scrape(run))
    statuses: collections.Counter[int] = collections.Counter()
    headers = admin()
    for i in range(500):
        # As admin: authorized by "*", so they reach the framework (404 there).
        statuses[run.call("GET", f"/services/made_up_{i}", headers).status] += 1
        statuses[run.call("POST", f"/services/orders/op_{i}", headers, b"{}").status] += 1
        # As anyone else: refused by the sidecar's authz (403).
        statuses[run.call("GET", f"/services/nope_{i}/x{i}", bearer()).status] += 1
    assert statuses == {404: 1000, 403: 500}
    text = scrape(run)
    after = series(text)
    assert "made_up" not in text and "op_" not in text and "nope_" not in text
    # A handful of new series (the _unknown pairs per status and decision), not thousands.
    assert len(after - before) <= 30, sorted(after - before)
    labelled = {(dict(labels).get("service"), dict(labels).get("operation"))
                for _name, labels in after}
    assert {("orders", "create"), ("hello", ""), ("_unknown", ""), ("orders", "_unknown"),
            ("_unknown", "_unknown")} <= labelled


def test_one_valid_exposition_with_process_metrics_of_every_process(run: RunStack) -> None:
    text = scrape(run)
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    samples = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
    assert len(samples) == len(set(samples))  # no series twice either
    by_name = {f.name: f for f in families}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        roles = collections.Counter(s.labels["process"] for s in by_name[name].samples)
        assert roles == {"sidecar": 1, "framework-master": 1, "framework-worker": 2}, name
    pids = {s.labels["pid"] for s in by_name["process_cpu_seconds"].samples}
    assert len(pids) == 4 and all(Path(f"/proc/{pid}").exists() for pid in pids)
