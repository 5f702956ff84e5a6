"""Sidecar metrics: labels only for services that exist, merged scrapes, rendering off the loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from framework import depstate
from framework.tenant_config import parse_tenant
from sidecar.metrics import UNKNOWN, Metrics, ServiceNames, declared_operations, merge
from tests.sidecar.support import token
from tests.sidecar.test_inprocess import TENANT, fixed, raw_upstream, serving, settings_for

SERVICES = {
    "orders.py": 'OPERATIONS = ["create", "get"]\n\ndef handle(context):\n    return 1\n',
    "plain.py": '"""No operations."""\n\ndef handle(context):\n    return 1\n',
    "typed.py": 'OPERATIONS: tuple = ("run",)\n\ndef handle(context):\n    return 1\n',
    "computed.py": 'OPERATIONS = [x for x in "ab"]\n\ndef handle(context):\n    return 1\n',
    "broken.py": 'OPERATIONS = [\n',
    "off.py": 'def handle(context):\n    return 1\n',
    "_helper.py": 'X = 1\n',
    "Bad-Name.py": 'def handle(context):\n    return 1\n',
}


def tenant_dir(root: Path) -> Path:
    (root / "services").mkdir(parents=True)
    for name, text in SERVICES.items():
        (root / "services" / name).write_text(text)
    (root / "services" / "dir.py").mkdir()  # not a file: not a service
    return root


def catalog(root: Path) -> ServiceNames:
    tenant = parse_tenant({"tenant": {"id": "acme"}, "services": {"off": {"enabled": False}}})
    return ServiceNames.from_tenant_dir(tenant_dir(root), tenant)


def label_sets(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every distinct (sample name, labels) of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_catalog_holds_enabled_services_with_valid_names(tmp_path: Path) -> None:
    found = catalog(tmp_path)
    assert set(found.services) == {"orders", "plain", "typed", "computed", "broken"}
    assert found.services["orders"] == {"create", "get"}
    assert found.services["plain"] == frozenset()
    assert found.services["typed"] == {"run"}
    # Not a literal, or not parseable: its operations are not known (tenant code never runs).
    assert found.services["computed"] is None and found.services["broken"] is None


def test_declared_operations_edge_cases(tmp_path: Path) -> None:
    path = tmp_path / "x.py"
    for text, expected in (('OPERATIONS = "create"\n', None),
                           ("OPERATIONS = [1, 2]\n", None),
                           ('OPERATIONS = ["a"]\nOPERATIONS = ["b"]\n', {"b"}),
                           ("import os\nX = 1\n", frozenset())):
        path.write_text(text)
        assert declared_operations(path) == expected, text
    assert declared_operations(tmp_path / "missing.py") is None
    assert ServiceNames.from_tenant_dir(tmp_path / "nowhere", TENANT).services == {}


@pytest.mark.parametrize(("service", "operation", "labels"), [
    ("orders", "create", ("orders", "create")),
    ("orders", "", ("orders", "")),
    ("orders", "made_up", ("orders", UNKNOWN)),
    ("plain", "", ("plain", "")),
    ("plain", "made_up", ("plain", UNKNOWN)),
    ("computed", "a", ("computed", UNKNOWN)),
    ("off", "", (UNKNOWN, "")),
    ("made_up", "", (UNKNOWN, "")),
    ("made_up", "x", (UNKNOWN, UNKNOWN)),
    ("_helper", "", (UNKNOWN, "")),
    ("", "", ("", "")),
])
def test_labels(tmp_path: Path, service: str, operation: str, labels: tuple[str, str]) -> None:
    assert catalog(tmp_path).labels(service, operation) == labels


def test_made_up_names_do_not_grow_the_series(tmp_path: Path) -> None:
    metrics = Metrics(catalog(tmp_path))
    metrics.observe("acme", "orders", "create", 200, 0.001)
    before = label_sets(metrics.render().decode())
    for i in range(1500):
        metrics.observe("acme", f"made_up_{i}", "", 403, 0.001)
        metrics.observe("acme", "orders", f"op_{i}", 404, 0.001)
        metrics.decision(Metrics.AUTHZ, "acme", f"made_up_{i}", f"op_{i}", "denied")
        metrics.decision(Metrics.RATELIMIT, "acme", "orders", f"op_{i}", "allowed")
    text = metrics.render().decode()
    assert "made_up" not in text and "op_" not in text
    # Each family gained at most one series per (_unknown label pair, status or decision).
    assert len(label_sets(text) - before) <= 2 * 20 + 2
    requests = {s.labels["service"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "mtp_sidecar_requests" for s in f.samples}
    assert requests[UNKNOWN] == 1500


def test_merge_joins_families_of_both_processes(tmp_path: Path) -> None:
    depstate.dependency("ldap")  # known, so exported
    metrics = Metrics(catalog(tmp_path))
    metrics.observe("acme", "orders", "get", 200, 0.002)
    framework = (b'# HELP process_open_fds Number of open file descriptors.\n'
                 b'# TYPE process_open_fds gauge\n'
                 b'process_open_fds{pid="7",process="framework-worker"} 9.0\n'
                 b'# HELP mtp_dependency_up up\n# TYPE mtp_dependency_up gauge\n'
                 b'mtp_dependency_up{dependency="redis_jobs"} 1.0\n'
                 b'# HELP mtp_sidecar_requests_total clash\n'
                 b'# TYPE mtp_sidecar_requests_total gauge\n'
                 b'mtp_sidecar_requests_total{x="1"} 5.0\n'
                 b'# HELP mtp_framework_requests_total r\n'
                 b'# TYPE mtp_framework_requests_total counter\n'
                 b'mtp_framework_requests_total{service="orders"} 3.0\n')
    text = metrics.scrape(framework).decode()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    by_name = {f.name: f for f in families}
    fds = {s.labels["process"] for s in by_name["process_open_fds"].samples}
    assert fds == {"sidecar", "framework-worker"}
    assert {s.labels["dependency"] for s in by_name["mtp_dependency_up"].samples} >= {
        "ldap", "redis_jobs"}
    # A family of another type under a sidecar name keeps the sidecar's.
    assert by_name["mtp_sidecar_requests"].type == "counter"
    assert all("x" not in s.labels for s in by_name["mtp_sidecar_requests"].samples)
    assert by_name["mtp_framework_requests"].samples[0].value == 3.0


def test_merge_without_or_with_unreadable_framework_text() -> None:
    own = list(Metrics().registry.collect())
    alone = merge(own, None).decode()
    assert "mtp_sidecar_requests" in alone and "unreadable" not in alone
    broken = merge(list(Metrics().registry.collect()), b"not { exposition\n").decode()
    assert broken.endswith("# framework metrics unreadable: ValueError\n")
    assert "mtp_sidecar_requests" in broken


FRAMEWORK_METRICS = (b"# HELP process_open_fds fds\n# TYPE process_open_fds gauge\n"
                     b'process_open_fds{pid="1",process="framework"} 3.0\n')


def test_the_scrape_renders_off_the_event_loop_while_health_answers(tmp_path: Path) -> None:
    """A collector that blocks until /healthz was answered: the loop must stay free."""
    health_answered = threading.Event()
    seen: dict[str, object] = {}

    class Blocking:
        def collect(self):
            seen["thread"] = threading.get_ident()
            seen["health_meanwhile"] = health_answered.wait(10)
            return []

    async def go() -> tuple[int, int, int, str]:
        server = await raw_upstream(tmp_path / "u.sock", fixed(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (len(FRAMEWORK_METRICS), FRAMEWORK_METRICS)))
        from sidecar.startup import create_app

        app = create_app(settings_for(tmp_path / "u.sock"), TENANT)
        try:
            async with serving(app, tmp_path / "s.sock") as (sidecar, client):
                seen["loop"] = threading.get_ident()
                sidecar.metrics.registry.register(Blocking())
                admin = {"Authorization": f"Bearer {token(roles=['admin'])}"}
                scrape = asyncio.ensure_future(client.get("http://sidecar/metrics",
                                                          headers=admin))
                while "thread" not in seen:  # the render has begun
                    await asyncio.sleep(0.01)
                health = (await client.get("http://sidecar/healthz")).status
                health_answered.set()
                reply = await scrape
                plain = await client.get("http://sidecar/metrics",
                                         headers={"Authorization": f"Bearer {token()}"})
                return health, reply.status, plain.status, await reply.text()
        finally:
            server.close()

    health, status, plain, text = asyncio.run(go())
    assert health == 200 and status == 200 and plain == 403
    assert seen["thread"] != seen["loop"] and seen["health_meanwhile"] is True
    fds = [s for f in text_string_to_metric_families(text) if f.name == "process_open_fds"
           for s in f.samples]
    assert {s.labels["process"] for s in fds} == {"sidecar", "framework"}


@pytest.mark.parametrize("framework", ["down", "503"])
def test_the_sidecar_answers_its_part_when_the_framework_cannot(tmp_path: Path,
                                                                framework: str) -> None:
    async def go() -> tuple[int, str]:
        server = None
        if framework == "503":
            server = await raw_upstream(tmp_path / "u.sock", fixed(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n{}"))
        from sidecar.startup import create_app

        app = create_app(settings_for(tmp_path / "u.sock"), TENANT)
        try:
            async with serving(app, tmp_path / "s.sock") as (_sidecar, client):
                admin = {"Authorization": f"Bearer {token(roles=['metrics'])}"}
                reply = await client.get("http://sidecar/metrics", headers=admin)
                return reply.status, await reply.text()
        finally:
            if server is not None:
                server.close()

    status, text = asyncio.run(go())
    assert status == 200 and "mtp_sidecar_requests_total" in text
    assert "\n# framework metrics unavailable: " in text
    assert ("HTTP 503" in text) == (framework == "503")
    assert {f.name for f in text_string_to_metric_families(text)} >= {"process_cpu_seconds"}
