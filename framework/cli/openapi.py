"""``mtp openapi``: the OpenAPI document of a tenant, offline (no servers, no credentials)."""

from __future__ import annotations

import json
import logging

import click

from framework.cli import check_version_pin
from framework.cli.dev import TENANT_DIR, _tenant_dir
from framework.openapi import document, offer_all
from framework.registry import Registry
from framework.tenant_config import load_tenant


@click.command("openapi")
@TENANT_DIR
@click.option("--indent", type=click.IntRange(0, 8), default=2, show_default=True,
              help="JSON indentation (0: one line).")
def openapi(tenant_dir: str | None, indent: int) -> None:
    """Print the OpenAPI 3.1 document of the tenant's HTTP API.

    Offline there is no caller: the document lists every enabled service that loads,
    with all its operations. GET /openapi.json through the sidecar answers the same
    document limited to what the calling identity may invoke.
    """
    directory = _tenant_dir(tenant_dir)
    # A broken service is left out of the document (as GET /services leaves it out);
    # `mtp check` is the command that names it. Its log line would only clutter stderr.
    logging.getLogger("mtp").handlers[:] = [logging.NullHandler()]
    logging.getLogger("mtp").propagate = False
    tenant = load_tenant(directory / "tenant.toml")
    check_version_pin(tenant.framework_version, tenant.source)
    specs = Registry(directory, tenant).available()
    doc = document(tenant, offer_all(specs))
    click.echo(json.dumps(doc, indent=indent or None))
