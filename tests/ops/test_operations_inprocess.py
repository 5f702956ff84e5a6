"""Operations in one worker, in-process (one breaker per service, so every path is exact)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from framework import signing
from framework.app import create_app
from framework.operations import MAX_CALL_DEPTH
from framework.settings import Settings
from tests.ops.tenant import SIDECAR_SECRET, TENANT, make_tenant


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    tmp = tmp_path_factory.mktemp("inproc")
    root = make_tenant(tmp / "tenant")
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_DATA_DIR": str(tmp / "data"),
                                  "MTP_TENANT_DIR": str(root)})
    app = create_app(settings, settings.load_tenant(), background=False)
    yield app
    app.extensions["mtp.operations"].close()
    app.extensions["mtp"].close()


def call(client: FlaskClient, method: str, path: str, body: Any = None,
         roles: str = "", headers: dict[str, str] | None = None) -> Any:
    sent = {signing.REQUEST_ID: "inproc", signing.TENANT: TENANT, signing.USER: "alice",
            signing.GROUPS: "", signing.ROLES: roles, signing.AUTH_METHOD: "jwt"}
    data = json.dumps(body).encode() if body is not None else None  # the signed bytes
    sent.update(signing.sign(SIDECAR_SECRET.encode(), method, path, sent, body=data))
    sent.update(headers or {})
    return client.open(path, method=method, data=data, headers=sent,
                       content_type="application/json" if data is not None else None)


def open_breaker(client: FlaskClient, service: str) -> None:
    for _ in range(2):
        assert call(client, "POST", f"/services/{service}", {"fail": True}).status_code == 500


def test_open_breaker_answers_jobs_and_nested_calls_with_the_fallback(app: Flask) -> None:
    client = app.test_client()
    open_breaker(client, "flaky")
    job = call(client, "POST", "/services/flaky", {"fail": True},
               headers={"Prefer": "respond-async, wait=5"})
    assert job.status_code == 200 and job.get_json() == {"fallback": True, "user": "alice"}
    nested = call(client, "POST", "/services/composer", {"service": "flaky", "payload": {}})
    assert nested.get_json()["inner"] == {"fallback": True, "user": "alice"}


def test_open_breaker_without_fallback_refuses_nested_calls_too(app: Flask) -> None:
    client = app.test_client()
    open_breaker(client, "nofallback")
    direct = call(client, "POST", "/services/nofallback", {})
    assert direct.status_code == 503 and int(direct.headers["Retry-After"]) >= 1
    nested = call(client, "POST", "/services/composer", {"service": "nofallback"})
    assert nested.status_code == 503
    assert nested.get_json()["type"].endswith("circuit-open")
    job = call(client, "POST", "/services/nofallback", {},
               headers={"Prefer": "respond-async, wait=5"})
    assert job.status_code == 503


def test_depth_limit_meters_every_level(app: Flask) -> None:
    ops = app.extensions["mtp.operations"]
    looped = call(app.test_client(), "POST", "/services/loop", {})
    assert looped.status_code == 508 and str(MAX_CALL_DEPTH) in looped.get_json()["detail"]
    ops.meter.flush()
    rows = ops.store.query(TENANT, ops.rt.tenant.billing, group_by=("service",))
    loop = next(r for r in rows if r["service"] == "loop")
    # the request's run plus MAX_CALL_DEPTH nested ones, each answered 508
    assert loop["calls"] == MAX_CALL_DEPTH + 1 and loop["errors"] == MAX_CALL_DEPTH + 1


def test_rollback_without_overlay_is_a_conflict(app: Flask) -> None:
    client = app.test_client()
    versions = call(client, "GET", "/config/versions?diff=1", roles="admin").get_json()
    assert len(versions["versions"]) == 1 and "diff" in versions["versions"][0]
    first = versions["versions"][0]["id"]
    refused = call(client, "POST", f"/config/versions/{first}/rollback", roles="admin")
    assert refused.status_code == 409
    assert "MTP_CONFIG_OVERLAY is not set" in refused.get_json()["detail"]


def test_usage_flush_on_read_and_range(app: Flask) -> None:
    client = app.test_client()
    assert call(client, "POST", "/services/hello", {}).status_code == 200
    now = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime())
    rows = call(client, "GET", f"/usage?from={now}&group_by=service", roles="admin").get_json()
    assert any(r["service"] == "hello" and r["calls"] >= 1 for r in rows["rows"])
    empty = call(client, "GET", "/usage?from=2000-01-01&to=2000-01-02", roles="admin")
    assert empty.get_json()["rows"] == []
