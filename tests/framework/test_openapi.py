"""The OpenAPI document: built from the registry (pure), served per caller, printed offline."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from flask import Flask
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from framework import signing
from framework.app import create_app
from framework.cli import cli
from framework.openapi import accepts_empty, document, offer_all, rebase
from framework.openapi_parts import ERRORS
from framework.registry import Registry
from framework.settings import Settings
from framework.tenant_config import LdapSettings, load_tenant
from tests.framework.openapi_tenant import make_openapi_tenant
from tests.helpers import base_env

SECRET = "openapi-sidecar-secret-0123456789"


@pytest.fixture(scope="module")
def tenant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_openapi_tenant(tmp_path_factory.mktemp("openapi") / "tenant")


@pytest.fixture(scope="module")
def offline(tenant_dir: Path) -> dict[str, Any]:
    tenant = load_tenant(tenant_dir / "tenant.toml")
    return document(tenant, offer_all(Registry(tenant_dir, tenant).available()))


@pytest.fixture(scope="module")
def app(tenant_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SECRET,
                                  "MTP_DATA_DIR": str(tmp_path_factory.mktemp("data")),
                                  "MTP_TENANT_DIR": str(tenant_dir)})
    app = create_app(settings, settings.load_tenant(), background=False)
    yield app
    app.extensions["mtp.operations"].close()
    app.extensions["mtp"].close()


def signed(method: str, path: str, user: str = "alice", groups: str = "",
           roles: str = "") -> dict[str, str]:
    sent = {signing.REQUEST_ID: "openapi-test", signing.TENANT: "acme", signing.USER: user,
            signing.GROUPS: groups, signing.ROLES: roles, signing.AUTH_METHOD: "jwt"}
    sent.update(signing.sign(SECRET.encode(), method, path, sent))
    return sent


def fetch(app: Flask, path: str = "/openapi.json", **who: str) -> Any:
    return app.test_client().get(path, headers=signed("GET", path, **who))


def service_paths(doc: dict[str, Any]) -> set[str]:
    return {p for p in doc["paths"] if p.startswith("/services/")}


def component(doc: dict[str, Any], key: str) -> jsonschema.protocols.Validator:
    """A validator for one component schema, its $refs resolved inside the document."""
    return jsonschema.Draft202012Validator({**doc, "$ref": f"#/components/schemas/{key}"})


# -- the document itself ----------------------------------------------------------------


def test_the_offline_document_is_valid_openapi_3_1(offline: dict[str, Any]) -> None:
    validate(offline)
    assert offline["openapi"] == "3.1.0"
    # Every enabled service that loads; the disabled and the broken one are left out.
    assert service_paths(offline) == {"/services/whoami", "/services/tree",
                                      "/services/report", "/services/orders/create",
                                      "/services/orders/get"}


def test_the_validator_used_here_refuses_a_broken_document(offline: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(offline))
    broken["paths"]["/services/tree"]["post"]["responses"]["200"].pop("description")
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_request_bodies_are_the_input_schemas_with_refs_resolved(
        offline: dict[str, Any]) -> None:
    post = offline["paths"]["/services/orders/create"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/input.orders"}
    orders = component(offline, "input.orders")
    assert orders.is_valid({"item": "pen", "qty": 2})
    assert not orders.is_valid({"item": "", "qty": 2})  # the $defs item, found by its $ref
    tree = component(offline, "input.tree")  # "$ref": "#" is the tree, not the document
    assert tree.is_valid({"name": "a", "children": [{"name": "b", "children": []}]})
    assert not tree.is_valid({"name": "a", "children": [{"children": []}]})


def test_a_body_is_required_only_where_the_schema_refuses_an_empty_payload(
        offline: dict[str, Any]) -> None:
    paths = offline["paths"]
    assert paths["/services/orders/create"]["post"]["requestBody"]["required"] is True
    assert paths["/services/tree"]["get"]["requestBody"]["required"] is True
    assert paths["/services/whoami"]["post"]["requestBody"]["required"] is False
    assert paths["/services/whoami"]["post"]["requestBody"]["content"][
        "application/json"]["schema"] == {"description": "Any JSON value."}


def test_modes_decide_the_answers_and_parameters(offline: dict[str, Any]) -> None:
    paths = offline["paths"]
    sync, both, only_async = (paths["/services/tree"]["post"],
                              paths["/services/whoami"]["post"],
                              paths["/services/report"]["get"])
    assert "202" not in sync["responses"] and sync["x-mtp-mode"] == "sync"
    assert [p["name"] for p in sync["parameters"]] == ["mode"]
    assert sync["parameters"][0]["schema"]["enum"] == ["sync"]
    assert {"200", "202"} <= set(both["responses"])
    assert [p["name"] for p in both["parameters"]] == ["mode", "Prefer"]
    accepted = only_async["responses"]["202"]
    assert accepted["headers"]["Location"]["required"] is True
    assert accepted["links"]["GetJob"]["operationId"] == "get_job"
    assert "only with `Prefer: respond-async, wait=N`" in only_async["responses"]["200"][
        "description"]
    assert sync["x-mtp-timeout"] == 5.0 and "Deadline: 5 s" in sync["description"]


def test_the_docstring_is_the_summary_and_description(offline: dict[str, Any]) -> None:
    create = offline["paths"]["/services/orders/create"]["post"]
    assert create["summary"] == "Create and fetch orders."
    assert create["description"].startswith(
        "Create and fetch orders.\n\nAn order names an item and how many of it.\n\n")
    assert {"name": "orders", "description": "Create and fetch orders."} in offline["tags"]


def test_every_error_is_problem_json_with_its_headers(offline: dict[str, Any]) -> None:
    responses = offline["components"]["responses"]
    assert {int(s) for s in offline["paths"]["/services/whoami"]["post"]["responses"]} >= {
        400, 401, 403, 404, 413, 429, 500, 502, 503, 504}
    for name, _ in ERRORS.values():
        assert set(responses[name]["content"]) == {"application/problem+json"}
        assert responses[name]["headers"]["X-Request-ID"]
    assert set(responses["TooManyRequests"]["headers"]) >= {
        "Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}
    assert "WWW-Authenticate" in responses["Unauthenticated"]["headers"]
    problem = component(offline, "Problem")
    assert problem.is_valid({"type": "urn:mtp:problem:forbidden", "title": "Forbidden",
                             "status": 403, "detail": "not allowed", "request_id": "r-1"})
    assert not problem.is_valid({"type": "x", "title": "Forbidden", "status": 403})
    assert offline["paths"]["/jobs/{job_id}"]["delete"]["responses"]["409"]


def test_health_routes_need_no_credentials(offline: dict[str, Any]) -> None:
    assert offline["paths"]["/healthz"]["get"]["security"] == []
    assert offline["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in offline["paths"]["/services"]["get"]  # the global one applies


def test_security_schemes_follow_the_tenant(tenant_dir: Path) -> None:
    tenant = load_tenant(tenant_dir / "tenant.toml")
    plain = document(tenant, [])
    assert set(plain["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert plain["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "An API key of this tenant."}
    ldap = dataclasses.replace(tenant, ldap=LdapSettings(enabled=True, user_base="ou=p"))
    with_ldap = document(ldap, [])
    validate(with_ldap)
    assert with_ldap["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert {"basic": []} in with_ldap["security"]


def test_rebase_leaves_data_anchors_and_own_resources_alone() -> None:
    base = "#/components/schemas/x"
    schema = {"$ref": "#/$defs/a", "const": {"$ref": "#"}, "enum": [{"$ref": "#"}],
              "$defs": {"a": {"$ref": "#anchor"}, "b": {"$id": "urn:b", "$ref": "#"},
                        "c": {"items": [{"$ref": "#"}]}}}
    assert rebase(schema, base) == {
        "$ref": base + "/$defs/a", "const": {"$ref": "#"}, "enum": [{"$ref": "#"}],
        "$defs": {"a": {"$ref": "#anchor"}, "b": {"$id": "urn:b", "$ref": "#"},
                  "c": {"items": [{"$ref": base}]}}}
    own = {"$id": "urn:own", "items": {"$ref": "#"}}
    assert rebase(own, base) is own
    assert rebase(True, base) is True


def test_a_schema_that_cannot_be_checked_offers_a_required_body(tenant_dir: Path) -> None:
    tenant = load_tenant(tenant_dir / "tenant.toml")
    spec = Registry(tenant_dir, tenant).resolve("whoami")
    unresolvable = dataclasses.replace(spec, validator=jsonschema.Draft202012Validator(
        {"$ref": "urn:nowhere"}))
    assert accepts_empty(unresolvable) is False
    assert accepts_empty(spec) is True


# -- served per caller ------------------------------------------------------------------


def test_each_caller_sees_what_it_may_invoke_as_get_services_does(app: Flask) -> None:
    for who in ({}, {"groups": "sales"}, {"roles": "admin"}, {"user": "bob"}):
        r = fetch(app, **who)
        assert r.status_code == 200 and r.content_type == "application/json"
        doc = r.get_json()
        listed = fetch(app, "/services", **who).get_json()["services"]
        assert service_paths(doc) == {
            f"/services/{s['name']}" + (f"/{op}" if op else "")
            for s in listed for op in (s["operations"] or [None])}, who
    assert "/services/orders/create" in service_paths(fetch(app, groups="sales").get_json())
    assert "/services/orders/get" not in service_paths(fetch(app, groups="sales").get_json())
    admin = fetch(app, roles="admin").get_json()
    assert "/services/orders/get" in service_paths(admin)
    validate(admin)


def test_the_document_is_refused_without_the_sidecar_signature(app: Flask) -> None:
    r = app.test_client().get("/openapi.json")
    assert r.status_code == 401 and r.content_type == "application/problem+json"
    post = app.test_client().post("/openapi.json", headers=signed("POST", "/openapi.json"))
    assert post.status_code == 405 and post.content_type == "application/problem+json"


def test_the_served_document_for_admin_is_the_offline_one(app: Flask,
                                                         offline: dict[str, Any]) -> None:
    assert fetch(app, roles="admin").get_json() == offline


# -- mtp openapi ------------------------------------------------------------------------


def test_mtp_openapi_prints_the_offline_document(tenant_dir: Path,
                                                 offline: dict[str, Any]) -> None:
    done = CliRunner().invoke(cli, ["openapi", "--tenant-dir", str(tenant_dir)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == offline
    one_line = CliRunner().invoke(cli, ["openapi", "--tenant-dir", str(tenant_dir),
                                        "--indent", "0"])
    assert one_line.output.count("\n") == 1 and json.loads(one_line.output) == offline


def test_mtp_openapi_help_says_it_is_every_enabled_service() -> None:
    done = CliRunner().invoke(cli, ["openapi", "--help"])
    assert "every enabled service" in done.output
    assert "openapi" in CliRunner().invoke(cli, ["--help"]).output


def test_mtp_openapi_without_a_tenant_is_a_usage_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTP_TENANT_DIR", raising=False)
    done = CliRunner().invoke(cli, ["openapi"])
    assert done.exit_code == 2 and "no tenant dir" in done.output


def test_mtp_openapi_refuses_another_pinned_version(tmp_path: Path) -> None:
    root = make_openapi_tenant(tmp_path / "t")
    toml = root / "tenant.toml"
    toml.write_text(toml.read_text().replace('framework_version = "0.1.0"',
                                             'framework_version = "9.9.9"'))
    done = subprocess.run([sys.executable, "-m", "framework", "openapi", "--tenant-dir",
                           str(root)], capture_output=True, text=True, timeout=60,
                          env=base_env())
    assert done.returncode == 2 and done.stdout == ""
    assert "9.9.9" in done.stderr and "Traceback" not in done.stderr
