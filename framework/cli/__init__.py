"""The ``mtp`` command. Subcommands load lazily so ``mtp token`` stays fast."""

from __future__ import annotations

import importlib
import sqlite3
import sys
from pathlib import Path

import click

from framework import __version__
from framework.tenant_config import ConfigError

# name -> (module:attribute, short help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("framework.cli.run:run", "Start sidecar and framework together, supervised."),
    "framework": ("framework.cli.serve:framework", "Run the framework (gunicorn) alone."),
    "sidecar": ("sidecar.cli:sidecar", "Run the security sidecar alone."),
    "worker": ("framework.cli.worker_command:worker",
               "Run async jobs from the shared Redis queue."),
    "assemble": ("framework.cli.assemble:assemble", "Check a tenant and build its runtime tree."),
    "check": ("framework.cli.dev:check", "Validate tenant.toml and every service module."),
    "new-service": ("framework.cli.dev:new_service", "Write a service module and its test."),
    "invoke": ("framework.cli.dev:invoke", "Call a service in-process, no servers."),
    "openapi": ("framework.cli.openapi:openapi", "Print the OpenAPI document (offline)."),
    "token": ("framework.cli.creds:token", "Print a development JWT."),
    "apikey": ("framework.cli.creds:apikey", "Create API keys."),
    "usage": ("framework.cli.ops:usage", "Usage and cost per tenant/service/operation."),
    "config": ("framework.cli.ops:config", "List and roll back config versions."),
    "control": ("framework.cli.control:control", "Serve the fleet's admin API (control plane)."),
    "tenants": ("framework.cli.control:tenants", "Manage fleet tenants through the admin API."),
    "events": ("framework.cli.events:events", "Publish events; list and replay dead letters."),
    "pool": ("framework.cli.pool:pool", "Serve many tenants: one sidecar, a process each."),
    "probe": ("framework.cli.probe:probe", "Ask a process's /healthz: exit 0 on 200 (probes)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, _ = COMMANDS[cmd_name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="mtp", message="%(prog)s %(version)s")
def cli() -> None:
    """mtp: multi-tenant Python service execution platform."""


def main() -> None:
    """Console entry point: config mistakes end with one clear line, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except ConfigError as exc:
        click.echo(f"mtp: config error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (OSError, sqlite3.Error) as exc:
        # A path or state store that cannot be used (e.g. MTP_DATA_DIR under a file, an
        # unreadable database): one line naming it, never a traceback.
        click.echo(f"mtp: error: {exc}", err=True)
        sys.exit(1)


def template_dir() -> Path:
    """The bundled tenant template: the source checkout's, else the installed package data."""
    checkout = Path(__file__).resolve().parents[2] / "tenant_template"
    if (checkout / "tenant.toml").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "_template"


def resolve_tenant_dir(option: str | None, environ: dict[str, str] | None = None) -> Path | None:
    """--tenant-dir, else MTP_TENANT_DIR, else the current directory if it has tenant.toml."""
    import os

    env = os.environ if environ is None else environ
    if option:
        return Path(option).resolve()
    if env.get("MTP_TENANT_DIR"):
        return Path(env["MTP_TENANT_DIR"]).resolve()
    if Path("tenant.toml").is_file():
        return Path.cwd()
    return None


def check_version_pin(framework_version: str, file: str) -> None:
    """Refuse a tenant pinned to another framework version, naming both."""
    if framework_version and framework_version != __version__:
        raise ConfigError(
            file, "tenant.framework_version",
            f"tenant pins framework {framework_version} but this is mtp {__version__}",
        )
