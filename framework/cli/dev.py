"""Developer commands: ``mtp check``, ``mtp invoke``, ``mtp new-service``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from framework.cli import check_version_pin, resolve_tenant_dir
from framework.errors import FrameworkError
from framework.inputs import choose, parse_prefer
from framework.jwt_keys import load_public_key
from framework.problem import problem
from framework.registry import Registry, valid_name
from framework.settings import Settings
from framework.tenant_config import SERVICE_NAME_RE, ConfigError, TenantConfig, load_tenant

TENANT_DIR = click.option("--tenant-dir", type=click.Path(file_okay=False), default=None,
                          help="Tenant directory (default: MTP_TENANT_DIR, else the current "
                               "directory when it holds tenant.toml).")


def _tenant_dir(option: str | None) -> Path:
    directory = resolve_tenant_dir(option)
    if directory is None:
        raise click.UsageError("no tenant dir: pass --tenant-dir, set MTP_TENANT_DIR, "
                               "or run where tenant.toml is")
    return directory


@click.command("check")
@TENANT_DIR
def check(tenant_dir: str | None) -> None:
    """Validate tenant.toml and import every service module."""
    directory = _tenant_dir(tenant_dir)
    # Reasons are printed below, once; the registry's own log lines would repeat them.
    logging.getLogger("mtp").handlers[:] = [logging.NullHandler()]
    logging.getLogger("mtp").propagate = False
    problems: list[str] = []
    try:
        tenant = load_tenant(directory / "tenant.toml")
        check_version_pin(tenant.framework_version, tenant.source)
    except ConfigError as exc:
        problems.append(str(exc))
        tenant = None
    if tenant is not None:
        try:
            load_public_key(tenant)  # the sidecar's own loader: check and start cannot disagree
        except ConfigError as exc:
            problems.append(str(exc))
        registry = Registry(directory, tenant)
        problems.extend(registry.problems())
        names = set(registry.names())
        problems.extend(  # a route may only name a service of this tenant (on disk here)
            f"{tenant.source}: events.routes.{index}.service: no service {route.service!r}"
            for index, route in enumerate(tenant.events.routes)
            if route.service and route.service not in names)
    for reason in problems:
        click.echo(f"mtp check: {reason}", err=True)
    if problems:
        raise SystemExit(1)
    _fleet_warnings(tenant, directory)
    click.echo(f"ok: tenant {tenant.tenant_id}, {len(registry.names())} service(s)")


def _fleet_warnings(tenant: TenantConfig, directory: Path) -> None:
    """In a fleet the operator's plan overrides parts of tenant.toml: say which."""
    from framework.control.tenant_check import fleet_present, fleet_warnings

    settings = Settings.from_env(tenant_dir=directory)
    if fleet_present(settings.redis_url, settings.data_dir):
        for warning in fleet_warnings(tenant):
            click.echo(f"mtp check: warning: {warning}", err=True)


@click.command("invoke")
@click.argument("target")
@click.option("--data", default=None, help="JSON payload.")
@click.option("--async", "run_async", is_flag=True, help="Run as a job and wait for it.")
@click.option("--user", default="dev", show_default=True, help="User id of the caller.")
@click.option("--groups", default="", help="Comma-separated groups of the caller.")
@click.option("--roles", default="", help="Comma-separated roles of the caller.")
@TENANT_DIR
def invoke(target: str, data: str | None, run_async: bool, user: str, groups: str,
           roles: str, tenant_dir: str | None) -> None:
    """Call SERVICE[/OP] in-process and print its JSON result."""
    from framework.local import Caller, LocalRunner

    service, _, operation = target.partition("/")
    try:
        payload = json.loads(data) if data is not None else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
    settings = Settings.from_env(tenant_dir=_tenant_dir(tenant_dir))
    tenant = settings.load_tenant()
    runner = LocalRunner(settings, tenant)
    caller = Caller(user, _split(groups), _split(roles))
    try:
        # --async is ?mode=async: a MODE = "sync" service refuses it (400) as over HTTP.
        choose(runner.spec(service, operation or None), parse_prefer(()),
               "async" if run_async else None)
        outcome = runner.run(service, payload, operation or None, caller, run_async)
    except FrameworkError as exc:
        _fail(exc.status, problem(exc.status, exc.detail, "", kind=exc.kind, **exc.extra))
    if outcome.error is not None:
        err = outcome.error
        _fail(outcome.status, problem(outcome.status, err.detail, "", kind=err.kind,
                                      **err.extra))
    click.echo((outcome.body or b"null").decode())


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _fail(status: int, document: dict) -> None:
    click.echo(json.dumps(document), err=True)
    raise SystemExit(1)


SERVICE_TEMPLATE = '''"""{title}"""

# Optional: OPERATIONS = ["create", "get"], MODE = "sync" | "async" | "both",
# TIMEOUT = 30 (seconds), INPUT_SCHEMA = {{...}} (JSON Schema of the payload).
INPUT_SCHEMA = {{
    "type": "object",
    "properties": {{"name": {{"type": "string"}}}},
}}


def handle(context):
    """Answer one call; return any JSON-serialisable value."""
    name = context.payload.get("name") or context.user
    context.logger.info("{name} called", extra={{"caller": context.user}})
    return {{"service": context.service, "greeting": f"Hello, {{name}}!"}}
'''

TEST_TEMPLATE = '''"""Tests for the {name} service: called through the framework, in-process."""

from pathlib import Path

import pytest

from framework.local import ServiceError, call

TENANT_DIR = Path(__file__).resolve().parents[1]


def test_{name}_answers():
    result = call(TENANT_DIR, "{name}", {{"name": "Ada"}}, user="alice")
    assert result == {{"service": "{name}", "greeting": "Hello, Ada!"}}


def test_{name}_defaults_to_the_caller():
    assert call(TENANT_DIR, "{name}", user="alice")["greeting"] == "Hello, alice!"


def test_{name}_refuses_a_bad_payload():
    with pytest.raises(ServiceError) as err:
        call(TENANT_DIR, "{name}", {{"name": 42}})
    assert err.value.status == 400
'''


@click.command("new-service")
@click.argument("name")
@TENANT_DIR
def new_service(name: str, tenant_dir: str | None) -> None:
    """Write services/NAME.py and tests/test_NAME.py from a template."""
    if not valid_name(name):
        raise click.BadParameter(f"must match {SERVICE_NAME_RE.pattern}", param_hint="NAME")
    directory = resolve_tenant_dir(tenant_dir) or Path.cwd()
    module = directory / "services" / f"{name}.py"
    test = directory / "tests" / f"test_{name}.py"
    for path in (module, test):
        if path.exists():
            raise click.ClickException(f"{path} exists; not overwriting it")
    module.parent.mkdir(parents=True, exist_ok=True)
    test.parent.mkdir(parents=True, exist_ok=True)
    title = f"The {name.replace('_', ' ')} service."
    module.write_text(SERVICE_TEMPLATE.format(title=title, name=name))
    test.write_text(TEST_TEMPLATE.format(name=name))
    click.echo(f"wrote {module}")
    click.echo(f"wrote {test}")
