"""In-process routes (Flask test client) for what is cheaper to prove without gunicorn."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask import Flask

from framework.app import create_app
from framework.errors import BadRequest
from framework.inputs import Prefer, choose, parse_payload, parse_prefer
from framework.local import Caller, LocalRunner, ServiceError, call
from framework.registry import Registry
from framework.settings import Settings
from framework.tenant_config import load_tenant
from tests.framework.client import signed_headers
from tests.framework.tenant import SECRET, make_tenant


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    root = make_tenant(tmp_path / "t")
    settings = Settings.from_env({
        "MTP_SIDECAR_SECRET": SECRET, "MTP_DATA_DIR": str(tmp_path / "d"),
        "MTP_JOB_WORKERS": "1", "MTP_JOB_QUEUE": "2", "MTP_LOG_LEVEL": "WARNING",
        "MTP_MAX_BODY": "4096",
    }, tenant_dir=root)
    app = create_app(settings, settings.load_tenant(), background=False)
    yield app
    app.extensions["mtp"].close()


def send(app: Flask, method: str, path: str, **kw):
    who = {k: kw.pop(k) for k in ("user", "roles") if k in kw}
    if "json" in kw:  # serialised here: the signature covers the body's bytes
        kw["data"], kw["content_type"] = json.dumps(kw.pop("json")).encode(), "application/json"
    body = kw.get("data")
    headers = signed_headers(method, path, body=body.encode() if isinstance(body, str) else body,
                             **who)
    headers.update(kw.pop("headers", {}))
    return app.test_client().open(path, method=method, headers=headers, **kw)


def test_a_queued_job_can_be_cancelled_and_never_runs(app: Flask):
    first = send(app, "POST", "/services/slow", json={"seconds": 1})
    queued = send(app, "POST", "/services/slow", json={"seconds": 0})
    assert first.status_code == 202 and queued.status_code == 202
    location = queued.headers["Location"]
    deadline = time.monotonic() + 5
    while send(app, "GET", first.headers["Location"]).json["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled = send(app, "DELETE", location)
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert cancelled.json["finished_at"]
    again = send(app, "DELETE", location)
    assert again.status_code == 409 and again.json["job_status"] == "cancelled"
    running = send(app, "DELETE", first.headers["Location"])
    assert running.status_code == 409 and "is running" in running.json["detail"]
    deadline = time.monotonic() + 10
    while send(app, "GET", first.headers["Location"]).json["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert send(app, "GET", location).json["status"] == "cancelled"
    assert send(app, "GET", first.headers["Location"], roles="admin",
                user="root").json["status"] == "succeeded"


GATE = '''"""Async: runs until the test opens the gate."""
import time
from pathlib import Path

MODE = "async"


def handle(context):
    here = Path(__file__).parent
    (here / "gate.started").write_text("x")
    for _ in range(3000):
        if (here / "gate.open").exists():
            return {"opened": True}
        time.sleep(0.01)
    return {"opened": False}
'''


def test_only_half_the_request_threads_may_wait_for_a_job(tmp_path: Path):
    root = make_tenant(tmp_path / "t")
    services = root / "services"
    (services / "gate.py").write_text(GATE)
    settings = Settings.from_env({
        "MTP_SIDECAR_SECRET": SECRET, "MTP_DATA_DIR": str(tmp_path / "d"), "MTP_THREADS": "2",
        "MTP_JOB_WORKERS": "1", "MTP_JOB_QUEUE": "2", "MTP_LOG_LEVEL": "WARNING",
    }, tenant_dir=root)
    app = create_app(settings, settings.load_tenant(), background=False)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(send, app, "POST", "/services/gate",
                                headers={"Prefer": "respond-async, wait=60"})
            deadline = time.monotonic() + 10
            while not (services / "gate.started").exists():  # the one waiter holds its slot
                assert time.monotonic() < deadline and not first.done()
                time.sleep(0.01)
            # 2 request threads: 1 may wait. The second is told its job at once.
            second = send(app, "POST", "/services/gate",
                          headers={"Prefer": "respond-async, wait=5"})
            assert second.status_code == 202 and second.headers["Location"]
            assert second.headers["Preference-Applied"] == "respond-async"
            (services / "gate.open").write_text("x")
            done = first.result(timeout=30)
        assert done.status_code == 200 and done.json == {"opened": True}
        assert done.headers["Preference-Applied"] == "wait=60"
    finally:
        app.extensions["mtp"].close()


def test_readiness_fails_closed_when_the_job_store_is_unusable(app: Flask, monkeypatch):
    assert send(app, "GET", "/readyz").status_code == 200
    monkeypatch.setattr(app.extensions["mtp"].jobs, "usable", lambda: False)
    answer = send(app, "GET", "/readyz")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.content_type == "application/problem+json"


def test_a_broken_job_store_is_503_on_the_job_routes(app: Flask):
    rt = app.extensions["mtp"]
    rt.jobs.close()  # this thread's connection: the next one opens the broken file
    for suffix in ("-wal", "-shm"):
        rt.jobs.path.with_name(rt.jobs.path.name + suffix).unlink(missing_ok=True)
    rt.jobs.path.write_bytes(b"not a database " * 100)
    path = "/jobs/" + "a" * 32
    for method in ("GET", "DELETE"):
        answer = send(app, method, path)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.content_type == "application/problem+json"
    assert send(app, "GET", "/metrics").status_code == 503
    assert send(app, "GET", "/readyz").status_code == 503


def test_an_unexpected_error_is_500_with_an_id_and_no_traceback(app: Flask, monkeypatch):
    def explode(name):
        raise RuntimeError("framework bug with secret detail")

    monkeypatch.setattr(app.extensions["mtp"].registry, "resolve", explode)
    answer = send(app, "POST", "/services/echo", json={})
    assert answer.status_code == 500 and answer.json["error_id"]
    assert b"secret detail" not in answer.data and b"Traceback" not in answer.data


def test_metrics_and_health_in_process(app: Flask):
    send(app, "GET", "/services/echo")
    text = send(app, "GET", "/metrics").data.decode()
    assert "mtp_framework_requests_total" in text and "mtp_framework_jobs{" in text
    assert app.test_client().get("/healthz").json == {"status": "ok"}


def test_payload_edge_cases(app: Flask):
    deep = send(app, "POST", "/services/echo", data=b"[" * 2000 + b"]" * 2000)
    assert deep.status_code == 400 and "nested" in deep.json["detail"]
    long = send(app, "POST", "/services/ops/create", json={"x" * 1000: 1})
    assert long.status_code == 400 and long.json["detail"].endswith("...")


def test_odd_client_input_is_400_or_ignored_never_500(app: Flask):
    odd_wait = send(app, "POST", "/services/echo", json={},
                    headers={"Prefer": "respond-async, wait=\u00b2"})
    assert odd_wait.status_code == 202
    long_wait = send(app, "POST", "/services/echo", json={},
                     headers={"Prefer": "respond-async, wait=" + "9" * 5000})
    assert long_wait.status_code in (200, 202)
    latin1 = send(app, "POST", "/services/echo", data=b'{"a": "\xff"}')
    assert latin1.status_code == 400 and latin1.json["detail"].endswith("not UTF-8 text")
    with pytest.raises(BadRequest, match="a number is too long"):
        parse_payload(b"1" * 5000)  # past int()'s digit limit (over MTP_MAX_BODY here)


def test_a_payload_too_deep_for_a_recursive_schema_is_400(app: Flask):
    services = app.extensions["mtp"].settings.tenant_dir / "services"
    (services / "tree.py").write_text(
        '"""Trees."""\nINPUT_SCHEMA = {"type": "array", "items": {"$ref": "#"}}\n\n'
        'def handle(context):\n    return {}\n')
    assert send(app, "POST", "/services/tree", json=[[[]]]).status_code == 200
    deep = send(app, "POST", "/services/tree", data=b"[" * 800 + b"]" * 800)
    assert deep.status_code == 400 and deep.content_type == "application/problem+json"
    assert "nested too deeply" in deep.json["detail"]


def test_a_huge_timeout_is_no_limit_and_an_infinite_one_is_named(app: Flask):
    services = app.extensions["mtp"].settings.tenant_dir / "services"
    for name, value in (("forever", "10 ** 10"), ("endless", 'float("inf")')):
        (services / f"{name}.py").write_text(
            f'"""Long."""\nTIMEOUT = {value}\n\ndef handle(context):\n    return 1\n')
    assert send(app, "POST", "/services/forever").status_code == 200
    endless = send(app, "POST", "/services/endless")
    assert endless.status_code == 500 and endless.json["type"].endswith("service-invalid")
    assert "TIMEOUT" in endless.json["detail"]


def test_the_signature_covers_the_path_even_without_raw_uri(app: Flask):
    headers = signed_headers("GET", "/services/echo?a=%20b")
    answer = app.test_client().get("/services/echo", query_string="a=%20b", headers=headers,
                                   environ_overrides={"RAW_URI": "", "REQUEST_URI": ""})
    assert answer.status_code == 200 and answer.json["params"] == {"a": " b"}


def test_the_live_config_can_be_swapped(app: Flask):
    rt = app.extensions["mtp"]
    newer = load_tenant(rt.settings.tenant_dir / "tenant.toml")
    rt.set_tenant(newer)
    assert rt.registry.tenant is newer and rt.tenant is newer


@pytest.mark.parametrize(("headers", "expected"), [
    ([], Prefer(False, None)),
    (["respond-async"], Prefer(True, None)),
    (["RESPOND-ASYNC, wait=5"], Prefer(True, 5)),
    (["wait=5", "respond-async"], Prefer(True, 5)),
    (['respond-async; x="y", wait="7"'], Prefer(True, 7)),
    (["respond-async, wait=9999"], Prefer(True, 60)),
    (["respond-async, wait=soon, handling=lenient"], Prefer(True, None)),
    (["respond-async, wait=\u00b2"], Prefer(True, None)),  # isdigit() yet not int()-able
    (["respond-async, wait=" + "9" * 5000], Prefer(True, 60)),  # past int()'s digit limit
])
def test_prefer_parsing(headers, expected):
    assert parse_prefer(headers) == expected


def test_choose_applies_mode_rules(tmp_path: Path):
    root = make_tenant(tmp_path)
    reg = Registry(root, load_tenant(root / "tenant.toml"))
    both, only_async = reg.resolve("echo"), reg.resolve("slow")
    assert not choose(both, Prefer(), None).run_async
    assert choose(both, Prefer(), "async").applied is None
    d = choose(both, Prefer(True, 3), None)
    assert d.run_async and d.wait == 3 and d.applied == "respond-async, wait=3"
    assert not choose(both, Prefer(True), "sync").run_async
    assert choose(only_async, Prefer(), "sync").run_async


def test_local_call_api_for_tenant_tests(tmp_path: Path, monkeypatch):
    root = make_tenant(tmp_path / "t")
    monkeypatch.setenv("MTP_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MTP_LOG_LEVEL", "WARNING")
    assert call(root, "echo", {"a": 1}, user="zed")["user"] == "zed"
    assert call(root, "ops", {"qty": 2}, operation="get") == {"op": "get",
                                                              "payload": {"qty": 2}}
    with pytest.raises(ServiceError) as err:
        call(root, "boom")
    assert err.value.status == 500 and err.value.problem["error_id"]
    with pytest.raises(ServiceError) as err:
        call(root, "ops", operation="nope")
    assert err.value.status == 404
    before = set(threading.enumerate())
    for _ in range(5):
        call(root, "echo", {})
    started = [t for t in threading.enumerate() if t not in before]
    for thread in started:  # each call's handler thread ends with the call
        thread.join(timeout=5)
    assert not [t for t in started if t.is_alive()]
    settings = Settings.from_env({"MTP_DATA_DIR": str(tmp_path / "d"),
                                  "MTP_LOG_LEVEL": "WARNING"}, tenant_dir=root)
    runner = LocalRunner(settings, settings.load_tenant())
    outcome = runner.run("slow", {"seconds": 0}, caller=Caller("amy"), run_async=True)
    assert outcome.ok and b'"by":"amy"' in outcome.body


def test_a_malformed_request_id_is_replaced(app: Flask):
    answer = send(app, "GET", "/healthz", headers={"X-Request-ID": "bad id!" + "x" * 200})
    rid = answer.headers["X-Request-ID"]
    assert rid != "bad id!" and len(rid) == 32 and rid.isalnum()
    kept = app.test_client().get("/healthz", headers={"X-Request-ID": "a.b-c_9"})
    assert kept.headers["X-Request-ID"] == "a.b-c_9"
