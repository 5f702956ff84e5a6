"""Plan entitlements and disabled services: hidden from /services, 403 on call."""

from __future__ import annotations

import json
import textwrap
import tomllib
from collections.abc import Iterator

import pytest
from flask import Flask

from framework import signing
from framework.app import create_app
from framework.settings import Settings
from framework.tenant_config import ConfigError, parse_tenant

SECRET = "entitlement-sidecar-secret-0123456789"
TOML = """
[tenant]
id = "acme"
plan = "basic"

[plans.basic]
services = ["hello", "composer"]

[plans.pro]
services = ["*"]

[services.off]
enabled = false
"""
SERVICES = {
    "hello": "def handle(context):\n    return {'hi': context.user}\n",
    "premium": "def handle(context):\n    return {'premium': True}\n",
    "off": "def handle(context):\n    return {'off': True}\n",
    "composer": "def handle(context):\n    return context.call(context.payload['service'])\n",
}


def tenant(plan: str = "basic") -> dict:
    return tomllib.loads(TOML.replace('plan = "basic"', f'plan = "{plan}"'))


def test_plan_tables_are_checked() -> None:
    cfg = parse_tenant(tenant())
    assert cfg.entitled("hello") and not cfg.entitled("premium")
    assert parse_tenant(tenant("pro")).entitled("premium")
    assert parse_tenant({"tenant": {"id": "x"}}).entitled("anything")  # no plans: all
    with pytest.raises(ConfigError, match=r"tenant\.plan: must name one of"):
        parse_tenant(tenant("gold"))
    with pytest.raises(ConfigError, match=r"plans\.basic\.extra: unknown key"):
        parse_tenant({**tenant(), "plans": {"basic": {"services": [], "extra": 1}}})
    with pytest.raises(ConfigError, match=r"plans\.basic\.services"):
        parse_tenant({**tenant(), "plans": {"basic": {}}})


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    root = tmp_path_factory.mktemp("plans")
    (root / "services").mkdir()
    (root / "tenant.toml").write_text(textwrap.dedent(TOML))
    for name, body in SERVICES.items():
        (root / "services" / f"{name}.py").write_text(body)
    settings = Settings.from_env({"MTP_SIDECAR_SECRET": SECRET, "MTP_TENANT_DIR": str(root),
                                  "MTP_DATA_DIR": str(root / "data")})
    app = create_app(settings, settings.load_tenant(), background=False)
    yield app
    app.extensions["mtp.operations"].close()
    app.extensions["mtp"].close()


def call(app: Flask, method: str, path: str, body: object = None):
    headers = {signing.REQUEST_ID: "plan", signing.TENANT: "acme", signing.USER: "alice",
               signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt"}
    data = json.dumps(body).encode() if body is not None else None  # the signed bytes
    headers.update(signing.sign(SECRET.encode(), method, path, headers, body=data))
    return app.test_client().open(path, method=method, data=data, headers=headers,
                                  content_type="application/json" if data is not None else None)


def test_not_entitled_or_disabled_is_hidden_and_refused(app: Flask) -> None:
    listed = {s["name"] for s in call(app, "GET", "/services").get_json()["services"]}
    assert listed == {"hello", "composer"}
    assert call(app, "POST", "/services/hello").status_code == 200
    premium = call(app, "POST", "/services/premium")
    assert premium.status_code == 403 and "plan 'basic'" in premium.get_json()["detail"]
    assert call(app, "POST", "/services/off").status_code == 403
    nested = call(app, "POST", "/services/composer", {"service": "premium"})
    assert nested.status_code == 403
